"""``safetensors.numpy.load_file`` of every shard given (imports done first)."""

import sys
import time

try:
    import ml_dtypes  # noqa: F401 (bfloat16 arrays)
except ImportError:
    pass
from safetensors.numpy import load_file

from sample import emit, start

t = start()
d = [load_file(p) for p in sys.argv[1:]]
emit(time.perf_counter() - t)
