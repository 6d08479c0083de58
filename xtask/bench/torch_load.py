"""Loads to torch tensors (imports done first), then reads one byte of every 4 KiB page of
every storage, as ``load_state_dict`` or a forward pass would touch them: for a mapped file
that is where the page faults happen. ``sys.argv[1]`` says who loads: ``safetensors``
(``safetensors.torch.load_file`` per shard), ``weightlift`` (``weightlift.torch.load_file`` per
shard) or ``weightlift-checkpoint`` (``weightlift.load_checkpoint`` of the directory)."""

import sys
import time

import torch

from sample import emit, start

mode, paths = sys.argv[1], sys.argv[2:]
if mode == "safetensors":
    from safetensors.torch import load_file
else:
    import weightlift
    import weightlift.torch

    load_file = weightlift.torch.load_file
t = start()
if mode == "weightlift-checkpoint":
    dicts = [weightlift.load_checkpoint(paths[0], framework="pt")]
else:
    dicts = [load_file(p) for p in paths]
seen, total = set(), 0
for d in dicts:
    for v in d.values():
        s = v.untyped_storage()
        if s.nbytes() == 0 or s.data_ptr() in seen:
            continue
        seen.add(s.data_ptr())
        total += int(torch.empty(0, dtype=torch.uint8).set_(s)[::4096].sum())
emit(time.perf_counter() - t)
