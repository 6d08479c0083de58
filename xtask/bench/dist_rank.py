"""One rank of ``cargo xtask bench-dist``, started as torchrun would (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``/``MASTER_PORT`` in the environment; gloo): timed from a barrier to the last
page of its tensors touched. ``sys.argv[1]`` is the mode: ``each`` (the rank loads everything
itself), ``shared`` (``group=``: a share each, then broadcast) or ``sliced`` (``slices=``: its
rows of every matrix); ``sys.argv[2]`` the checkpoint (a directory or a URL). The sample adds
the bytes the rank read from storage and the bytes of the tensors it had to load."""

import datetime
import sys
import time

import torch
import torch.distributed as dist

import weightlift
from sample import disk_reads, emit, start

mode, path = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
rank, world = dist.get_rank(), dist.get_world_size()


def rows(name, shape):
    if len(shape) < 2:
        return None
    n = shape[0]
    return (slice(rank * n // world, (rank + 1) * n // world),)


# The ranks share one block-I/O group: its counters taken before the barrier and after every
# rank has finished are the world's reads during the load (each rank reports the same).
before = disk_reads()
dist.barrier()
t = start(before)
if mode == "each":
    state = weightlift.load_checkpoint(path, framework="pt")
elif mode == "shared":
    state = weightlift.load_checkpoint(path, framework="pt", group=True)
else:
    state = weightlift.load_checkpoint(path, framework="pt", slices=rows)
seen, total = set(), 0
for v in state.values():
    s = v.untyped_storage()
    if s.nbytes() == 0 or s.data_ptr() in seen:
        continue
    seen.add(s.data_ptr())
    total += int(torch.empty(0, dtype=torch.uint8).set_(s)[::4096].sum())
secs = time.perf_counter() - t
needed = sum(v.numel() * v.element_size() for v in state.values())
read = sum(f["bytes_read"] for f in state.report)
dist.barrier()
emit(secs, disk=disk_reads(), read_bytes=read, needed=needed)
dist.destroy_process_group()
