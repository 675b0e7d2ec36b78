"""The streamed merge: `merge_files(method, base, models, out, max_memory)`.

Memory is bounded by one block, not the model: a byte budget
`max_memory` picks how many rows of a tensor form a block (`reader.plan`),
each pass reads the blocks from the memory-mapped inputs, and only the
statistics a method needs survive between passes (`recipes`, `stats`).
The last pass writes each merged block straight into the output shards
(`writer`), inside `atomic_files.atomic_write`, so the output appears
whole, under its name, only at the end. Compute is float32 per block;
outputs keep the base's dtypes (bf16 stays bf16).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Sequence

import jax
import numpy as np

from mtmerge import atomic_files
from mtmerge import checkpoint_io
from mtmerge.streaming import atomic
from mtmerge.streaming import placement
from mtmerge.streaming import reader
from mtmerge.streaming import recipes
from mtmerge.streaming import writer

DEFAULT_MAX_MEMORY = 2 << 30


def bytes_per_entry(inputs: reader.Inputs) -> int:
  """What one tensor entry costs while its block is processed.

  T + 1 input copies (stored dtype) for this block and as many for the
  prefetched next one, float32 task vectors and one more float32
  temporary per task (DARE masks, histogram indices), and the float32
  output: the executor's accounting, a bound on its own buffers.
  """
  item = max(checkpoint_io.np_dtype(d).itemsize
             for d in inputs.layout.dtypes.values())
  for m in inputs.model_layouts:
    item = max(item, max(checkpoint_io.np_dtype(d).itemsize
                         for d in m.dtypes.values()))
  T = inputs.num_models
  return 2 * (T + 1) * item + 8 * T + 8


def parse_size(text: str) -> int:
  """Bytes from `'4G'`, `'512M'`, `'1.5GiB'`, `'100000'` (powers of 1024)."""
  t = str(text).strip().upper().removesuffix("B").removesuffix("I")
  mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
  scale = mult.get(t[-1:], 1)
  try:
    n = float(t[:-1] if t[-1:] in mult else t) * scale
  except ValueError:
    n = -1
  if not n >= 1:
    raise ValueError(f"--max-memory expects a size such as 4G or 512M, got "
                     f"{text!r}")
  return int(n)


class Executor:
  """Runs passes over blocks: reads, checks once, calls, accounts bytes.

  Attributes:
    peak_bytes: the largest sum of block-sized buffers held at once (inputs
      as read, float32 task vectors and output), by this accounting.
    passes: labels of the passes run, in order.
  """

  def __init__(self, inputs: reader.Inputs, progress: bool = True,
               place: placement.Placement | None = None):
    self.inputs, self.place = inputs, place
    self.progress = progress and sys.stderr.isatty() and (
        jax.process_index() == 0)
    self.checked: set = set()
    self.peak_bytes = 0
    self.passes: list[str] = []

  def _check(self, blk) -> bool:
    """True the first time a block is read: test it for NaN/Inf then."""
    key = (blk.name, blk.r0)
    if key in self.checked:
      return False
    self.checked.add(key)
    return True

  def run(self, p: recipes.Pass) -> None:
    """Runs one pass: `p.fn(block, base rows, model rows)` per block.

    On a mesh (`self.place`) this process reads only its rows of each
    block and `p.fn` gets global arrays sharded over the mesh.
    """
    from tqdm import tqdm  # local: keeps imports light
    T = self.inputs.num_models
    lays = [self.inputs.layout] + self.inputs.model_layouts
    sizes = [blk.numel * sum(checkpoint_io.np_dtype(
        lay.dtypes[blk.name]).itemsize for lay in lays) for blk in p.blocks]
    self.passes.append(p.label)
    bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, file=sys.stderr,
               desc=f"pass {len(self.passes)} ({p.label})", leave=False,
               disable=not self.progress)
    names = sorted({blk.name for blk in p.blocks})
    done: set = set()
    place = self.place
    reads = p.blocks if place is None else [place.local_block(blk)
                                            for blk in p.blocks]
    with bar:
      for (_, b, ms), blk, size in zip(self.inputs.prefetch(
          reads, self._check), p.blocks, sizes):
        if place is None:
          # Aligned host buffers: adopted by the CPU backend without a copy.
          b, ms = jax.device_put(b), jax.device_put(ms)
        else:
          b, ms = place.put(blk, b, ms)
        # This block's and the prefetched next block's inputs, the float32
        # task vectors and output (all devices of this process together).
        held = 2 * (b.nbytes + ms.nbytes) + 4 * (T + 1) * blk.numel
        self.peak_bytes = max(self.peak_bytes, held)
        p.fn(blk, b, ms)
        del b, ms
        if blk.r1 == (blk.shape[0] if len(blk.shape) >= 2 else 1):
          done.add(blk.name)
        bar.set_postfix_str(f"{len(done)}/{len(names)} tensors",
                            refresh=False)
        bar.update(size)


def merge_files(method: str, base: str, models: Sequence[str], out: str,
                max_memory: int = DEFAULT_MAX_MEMORY, progress: bool = True,
                layout: checkpoint_io.Layout | None = None, mesh: Any = None,
                **hparams) -> dict[str, Any]:
  """Merges checkpoints on disk into `out`, streamed block by block.

  Args:
    method: a registered method with a streamed form (`recipes.supported`);
      others raise ValueError naming the method.
    base: the pretrained checkpoint (file, dir, or sharded HF dir).
    models: T fine-tuned checkpoints, in task order.
    out: the destination (replaced atomically if present), written in the
      base's layout, names and dtypes.
    max_memory: byte budget for one block's buffers (see `bytes_per_entry`);
      tensors larger than that are processed in row blocks.
    progress: a tqdm bar per pass on stderr (when it is a terminal).
    layout: the output's layout (default: the base's own); e.g.
      `cli_output.output_layout(...)` to write a sharded base as one file.
    mesh: where blocks are computed (`placement.make`): None = all devices
      when there are several, a `Mesh` or a spec like `'data:-1'`, False =
      one device. With several JAX processes every process must call this
      with the same arguments; each reads and writes only its rows, and
      `out` must be on a filesystem they all share.
    **hparams: the method's hyperparameters, as `methods.merge`.

  Returns:
    `{"out", "bytes", "passes", "blocks", "peak_block_bytes", "seconds",
    "devices", "processes"}`.

  Raises:
    ValueError (CheckpointError): bad hparams, an unstreamable method, bad
      or mismatched checkpoints, NaN/Inf in an input, a mesh that does not
      fit the devices.
  """
  from mtmerge import methods
  t0 = time.time()
  spec = methods.get(method)
  if spec.compressed:  # TALL masks, EMR: a compressed directory
    from mtmerge.streaming import recipes_masks
    return recipes_masks.compress_files(method, base, models, out,
                                        max_memory, progress, mesh=mesh,
                                        **hparams)
  full = spec.check(hparams, len(models))
  place = placement.make(mesh)
  recipe = recipes.for_method(method, full, len(models), place)
  inputs = reader.Inputs(base, models)
  if max_memory <= 0:
    raise ValueError(f"max_memory must be positive, got {max_memory}")
  olayout = layout or inputs.layout
  if sorted(olayout.weight_map) != sorted(inputs.layout.weight_map):
    raise ValueError("the output layout must hold the base's tensors")
  blocks = reader.plan(inputs, bytes_per_entry(inputs), int(max_memory),
                       olayout, place.size if place else 1)
  blocks = recipe.blocks(blocks)
  ex = Executor(inputs, progress, place)
  for p in recipe.passes(blocks):
    ex.run(p)

  def fill(name):
    return np.asarray(inputs.whole(name))

  streamed = {blk.name for blk in blocks}
  multi = place is not None and place.multi
  main = jax.process_index() == 0

  def write(tmp):
    if multi and not main:  # the files exist once process 0 made them
      atomic.barrier("mtmerge-output-created")
    w = writer.Output(olayout, tmp, fill, streamed, create=main,
                      single=not multi)
    try:
      if multi and main:
        atomic.barrier("mtmerge-output-created")

      def one(blk, b, ms):
        if place is None:
          w.write(blk.name, blk.first, np.asarray(
              recipe.apply(blk, b, ms)))
          return
        y = recipe.apply(blk, b, ms, out_sharding=place.shardings(blk)[0])
        for first, data in place.pieces(blk, y):
          w.write(blk.name, first, data)
      ex.run(recipes.Pass("merge", blocks, one))
      info["bytes"] = w.close()
    except BaseException:
      w.abort()
      raise

  info: dict[str, Any] = {}
  is_dir = olayout.kind != "file"
  try:
    if multi:
      dest = atomic.write(out, write, is_dir)
    else:
      dest = atomic_files.atomic_write(out, write, is_dir=is_dir)
  finally:
    inputs.close()
  info.update(out=dest, passes=ex.passes, blocks=len(blocks),
              peak_block_bytes=ex.peak_bytes, seconds=time.time() - t0,
              devices=place.size if place else 1,
              processes=jax.process_count())
  return info


