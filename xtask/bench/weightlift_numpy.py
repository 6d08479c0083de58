"""``weightlift.load_checkpoint`` of the checkpoint directory (imports done first, as for
safetensors: numpy and ml_dtypes cost ~0.1 s each to import)."""

import sys
import time

import numpy  # noqa: F401

try:
    import ml_dtypes  # noqa: F401
except ImportError:
    pass
import weightlift

from sample import emit, start

t = start()
d = weightlift.load_checkpoint(sys.argv[1])
emit(time.perf_counter() - t)
