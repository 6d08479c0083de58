"""Every shard opened with ``safetensors.safe_open`` first (stock, or under
``weightlift.patch()``: prefetching), then each tensor read in file order, one byte of each
page touched, and dropped: how transformers and vLLM's default loader read."""

import sys
import time

import safetensors
import torch

from sample import emit, start

mode, paths = sys.argv[1], sys.argv[2:]
if mode == "weightlift":
    import weightlift

    weightlift.patch()
t = start()
handles = [safetensors.safe_open(p, framework="pt") for p in paths]
total = 0
for h in handles:
    for name in h.offset_keys():
        v = h.get_tensor(name)
        if v.numel():
            total += int(v.reshape(-1).view(torch.uint8)[::4096].sum())
        del v
for h in handles:
    h.__exit__(None, None, None)
emit(time.perf_counter() - t)
