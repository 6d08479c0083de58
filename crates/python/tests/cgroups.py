"""Cgroups the tests make: a memory cgroup (a host or container with less memory than the
model) and a block-I/O cgroup (storage that limits requests and bandwidth, and counts what
reached the disk). v1, else v2; where none can be made (not root, no controller), the test
using it is skipped with the reason."""

import os
import subprocess
import sys
import uuid

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import blkio_counts  # noqa: E402 (the tools' directory first)


def mountpoint(fstype, option=None):
    with open("/proc/self/mountinfo") as f:
        for line in f:
            before, _, after = line.partition(" - ")
            fields, tail = before.split(), after.split()
            if tail and tail[0] == fstype and (option is None or option in tail[2].split(",")):
                return fields[4]
    return None


class _Group:
    """What every group here does: write a control file, run a command inside, go away."""

    path = None

    def write(self, name, value):
        with open(os.path.join(self.path, name), "w") as f:
            f.write(str(value))

    def run(self, argv, env=None):
        """Runs `argv` inside the group."""
        return subprocess.run(
            ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', self.path, *argv],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )

    def close(self):
        if self.path:
            try:
                os.rmdir(self.path)
            except OSError:
                pass
            self.path = None


class Cgroup(_Group):
    """A memory cgroup with a limit (v1, else v2), removed on close."""

    def __init__(self, limit):
        name = f"weightlift-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path = None
        v1 = mountpoint("cgroup", "memory")
        v2 = mountpoint("cgroup2")
        why = []
        if v1:
            try:
                path = os.path.join(v1, name)
                os.mkdir(path)
                self.path, self.version = path, 1
                self.write("memory.limit_in_bytes", limit)
                return
            except OSError as e:
                why.append(f"v1 at {v1}: {e}")
                self.close()
        if v2:
            try:
                with open(os.path.join(v2, "cgroup.controllers")) as f:
                    if "memory" not in f.read().split():
                        raise OSError("no memory controller")
                path = os.path.join(v2, name)
                os.mkdir(path)
                self.path, self.version = path, 2
                self.write("memory.max", limit)
                return
            except OSError as e:
                why.append(f"v2 at {v2}: {e}")
                self.close()
        pytest.skip("no memory cgroup can be made here: " + ("; ".join(why) or "no cgroup fs"))

    def oom_kills(self):
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            with open(os.path.join(self.path, name)) as f:
                for line in f:
                    if line.startswith("oom_kill "):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0


def evict(files):
    """Drops `files` from the page cache, for a cold run (written just now: dirty pages are
    not dropped, so they are synced first)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def device_of(path):
    """The disk holding `path`, as ``MAJ:MIN``."""
    dev = os.stat(path).st_dev
    return f"{os.major(dev)}:{os.minor(dev)}"


class IoCgroup(_Group):
    """A block-I/O cgroup whose reads from the disk holding `path` are limited to `iops`
    requests/s and `bps` bytes/s (None: no limit); `reads()` says what reached the disk."""

    def __init__(self, path, iops=None, bps=None):
        name = f"weightlift-test-io-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.device, self.path = device_of(path), None
        v1 = mountpoint("cgroup", "blkio")
        v2 = mountpoint("cgroup2")
        why = []
        if v1:
            try:
                self.path, self.version = os.path.join(v1, name), 1
                os.mkdir(self.path)
                if bps:
                    self.write("blkio.throttle.read_bps_device", f"{self.device} {bps}")
                if iops:
                    self.write("blkio.throttle.read_iops_device", f"{self.device} {iops}")
                return
            except OSError as e:
                why.append(f"v1 at {v1}: {e}")
                self.close()
        if v2:
            try:
                with open(os.path.join(v2, "cgroup.controllers")) as f:
                    if "io" not in f.read().split():
                        raise OSError("no io controller")
                self.path, self.version = os.path.join(v2, name), 2
                os.mkdir(self.path)
                limits = (f" rbps={bps}" if bps else "") + (f" riops={iops}" if iops else "")
                self.write("io.max", self.device + limits)
                return
            except OSError as e:
                why.append(f"v2 at {v2}: {e}")
                self.close()
        pytest.skip("no block-I/O cgroup can be made here: " + ("; ".join(why) or "no cgroup fs"))

    def set_readahead(self, kib):
        """Sets the disk's readahead to `kib` KiB until `close()` (the disk's setting, seen by
        every reader meanwhile): a cloud volume's kernel keeps the default 128 KiB where this
        VM's disk reads ahead 8 MiB, and the requests a load makes depend on it. Skips the
        test where the setting cannot be written."""
        file = f"/sys/dev/block/{self.device}/queue/read_ahead_kb"
        try:
            with open(file) as f:
                was = f.read().strip()
            with open(file, "w") as f:
                f.write(str(kib))
        except OSError as e:
            self.close()
            pytest.skip(f"the disk's readahead cannot be set: {e}")
        self._readahead = (file, was)

    def close(self):
        file, was = getattr(self, "_readahead", (None, None))
        if file:
            with open(file, "w") as f:
                f.write(was)
            self._readahead = (None, None)
        super().close()

    def reads(self):
        """(requests, bytes) the group's processes read from the disk so far."""
        return blkio_counts.reads(self.path, self.version, self.device)
