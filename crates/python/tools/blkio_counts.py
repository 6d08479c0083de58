"""What a block-I/O cgroup has read from the disks: the counters the bench's storage profiles
report, read by the tests' groups (`tests/cgroups.py`) and by the vLLM worker around its
load (`vllm_worker.py`)."""

import os


def reads(directory, version, device=None):
    """(requests, bytes) the group at `directory` (cgroup `version` 1 or 2) read so far from
    `device` (``MAJ:MIN``), or from every disk where `device` is None."""
    def ours(dev):
        return device is None or dev == device

    if version == 1:
        counts = []
        for name in ("blkio.throttle.io_serviced", "blkio.throttle.io_service_bytes"):
            # Lines `MAJ:MIN Read N` (and Write, Sync, ..., Total).
            with open(os.path.join(directory, name)) as f:
                counts.append(sum(
                    int(fields[2]) for fields in (line.split() for line in f)
                    if len(fields) == 3 and ours(fields[0]) and fields[1] == "Read"
                ))
        return tuple(counts)
    requests = read = 0
    with open(os.path.join(directory, "io.stat")) as f:
        # Lines `MAJ:MIN rbytes=N wbytes=N rios=N ...`.
        for line in f:
            fields = line.split()
            if fields and ours(fields[0]):
                kv = dict(x.split("=", 1) for x in fields[1:] if "=" in x)
                requests += int(kv.get("rios", 0))
                read += int(kv.get("rbytes", 0))
    return requests, read


def own_group_reads():
    """(requests, bytes) the block-I/O cgroup this process runs in has read from every disk
    so far, or None outside such a group (the root group) or where its counters cannot be
    read (v1 mounted at /sys/fs/cgroup/blkio, v2 at /sys/fs/cgroup)."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if path == "/":
            continue
        if "blkio" in controllers.split(","):
            where = ("/sys/fs/cgroup/blkio" + path, 1)
        elif controllers == "":
            where = ("/sys/fs/cgroup" + path, 2)
        else:
            continue
        try:
            return reads(*where)
        except (OSError, ValueError):
            if where[1] == 1:
                return None
    return None
