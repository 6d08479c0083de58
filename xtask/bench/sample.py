"""The one sample every timing child of ``cargo xtask bench`` (and ``bench-dist``) prints: a
JSON object on the last line of its output (``secs``, ``peak_rss`` in bytes, and whatever else
the child measured, e.g. ``read_bytes``). Under a storage profile (the child runs in a
block-I/O cgroup) it adds the requests and bytes the group read from the disk between
:func:`start` and :func:`emit` (``load_disk_requests``, ``load_disk_bytes``): the load's own,
where the group's count for the whole child also holds what its imports read."""

import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "crates", "python", "tools"))
from blkio_counts import own_group_reads  # noqa: E402

_disk_at_start = None


# (requests, bytes) this process's block-I/O cgroup has read so far, or None outside one: for
# children that take the counters themselves (the ranks of `bench-dist`).
disk_reads = own_group_reads


def start(disk=None):
    """Starts the timed load: returns ``time.perf_counter()`` and takes the group's disk
    counters as they are now, or `disk` where the caller took them earlier (the ranks of
    ``bench-dist`` take them before their barrier)."""
    global _disk_at_start
    _disk_at_start = disk if disk is not None else own_group_reads()
    return time.perf_counter()


def emit(secs, disk=None, **extra):
    """Prints the sample: `secs` timed, this process's peak resident memory, and `extra`; in a
    block-I/O cgroup, the disk reads since :func:`start` (up to `disk` where given: counters
    the caller took when its load ended)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"secs": secs, "peak_rss": peak, **extra}
    end = disk if disk is not None else own_group_reads()
    if _disk_at_start is not None and end is not None:
        out["load_disk_requests"] = end[0] - _disk_at_start[0]
        out["load_disk_bytes"] = end[1] - _disk_at_start[1]
    print(json.dumps(out), flush=True)
