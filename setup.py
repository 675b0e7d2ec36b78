"""mtmerge: accelerator-native multi-task model merging in JAX."""

from setuptools import find_packages, setup

setup(
    name="mtmerge",
    version="0.1.0",
    description="Multi-task model merging as sharded, jitted pytree transforms",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mtmerge", "mtmerge.*"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "tensorflow-datasets>=4.9",
        "ml_collections>=1.0",
        "safetensors>=0.4",
        "numpy>=1.26",
        "tqdm>=4.60",
        "pyyaml>=6",  # mtmerge merge --config (mergekit's YAML files)
        "absl-py>=2.0",
        "tokenizers>=0.15",
        "pillow>=10",
        "scikit-learn>=1.3",  # only its bundled digits data file is read
        "scipy>=1.10",  # exact assignment for hard OT fusion (fusion/ot_align)
        "matplotlib>=3.7",
        "treescope>=0.1",  # pytree rendering in the notebook (flax needs it too)
        # JAX compresses its persistent compilation cache with zstandard when
        # installed, else zlib: the runlocal job 108 -> 86 s wall on 2 cores.
        "zstandard>=0.22",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3"],
        # Peers for parity tests (tests/peers: torch, mergekit, fusion_bench)
        # and benchmarks; never needed at run time.
        # torch is pinned to the CPU build available offline on this machine.
        "peers": ["torch==2.13.0", "fusion-bench", "mergekit", "psutil",
                  "transformers", "sentence-transformers"],
    },
    entry_points={"console_scripts": ["mtmerge=mtmerge.cli:main"]},
)
