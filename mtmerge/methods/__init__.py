"""Merge methods, registered by FusionBench name.

    params = methods.merge("ties_merging", base, tvs, threshold=0.2)

Every method is a pure, jittable function `fn(base, tvs, **hparams)`.
"""

from mtmerge.methods import arithmetic, interpolate, masks, pcb, sparse, tsv
from mtmerge.methods.compressed import (Compressed, compress, reconstruct,
                                        storage_bytes)
from mtmerge.methods.registry import (MethodSpec, get, merge, names, parse,
                                      parse_call, register)

del arithmetic, interpolate, masks, pcb, sparse, tsv
