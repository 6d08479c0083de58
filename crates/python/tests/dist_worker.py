"""One rank of the shared-load tests (test_distributed.py), started as torchrun would: RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the environment. Runs the scenarios named on the
command line in order and writes what each one gave to ``{out}/rank{RANK}.json``:
``{scenario: {"ok": bool, "error": str, "tensors": {name: [dtype, shape, sha256]},
"bytes_read": int, "seconds": float}}``.

Usage: dist_worker.py OUT CHECKPOINT SCENARIO...
"""

import datetime
import hashlib
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import weightlift

# Bounds how long a rank waits for a dead peer: the fault scenarios must end, not hang.
TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("WL_DIST_TIMEOUT", "20")))


def digest(t):
    if isinstance(t, torch.Tensor):
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return [str(t.dtype).removeprefix("torch."), list(t.shape), hashlib.sha256(raw).hexdigest()]
    raw = t.tobytes() if t.flags.c_contiguous else t.copy().tobytes()
    return [str(t.dtype), list(t.shape), hashlib.sha256(raw).hexdigest()]


def cached(path):
    """Bytes of the checkpoint's files in the page cache (``fincore``), or None."""
    import subprocess

    files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
    out = subprocess.run(["fincore", "--bytes", "--noheadings", *files], capture_output=True, text=True)
    if out.returncode != 0:
        return None
    return sum(int(line.split()[0]) for line in out.stdout.splitlines() if line.strip())


def tp_slices(rank, world):
    """Rows of matrices named ``*.row``, columns of those named ``*.col``: a tensor-parallel
    rank's slices."""

    def pick(name, shape):
        if name.endswith(".row"):
            n = shape[0]
            return (slice(rank * n // world, (rank + 1) * n // world),)
        if name.endswith(".col"):
            m = shape[1]
            return (slice(None), slice(rank * m // world, (rank + 1) * m // world))
        return None

    return pick


def scenario(name, path, rank, world):
    """The load each scenario makes on this rank."""
    group = dist.group.WORLD
    if name == "shared":
        return weightlift.load_checkpoint(path, framework="pt", group=group)
    if name == "shared-np":
        return weightlift.load_checkpoint(path, framework="np", group=group, threads=2)
    if name == "sliced":
        # Tensor parallel: each rank its own slices, no exchange.
        return weightlift.load_checkpoint(path, framework="pt", slices=tp_slices(rank, world))
    if name == "shared-sliced":
        # A data-parallel group whose ranks all need tensor-parallel rank 1's slices.
        return weightlift.load_checkpoint(
            path, framework="pt", group=group, slices=tp_slices(1, world)
        )
    if name == "missing-shard":
        # Rank 1 sees a copy of the checkpoint that lacks a shard.
        return weightlift.load_checkpoint(
            os.environ["WL_MISSING"] if rank == 1 else path, framework="pt", group=group
        )
    if name == "bad-header":
        return weightlift.load_checkpoint(
            os.environ["WL_BAD"] if rank == world - 1 else path, framework="pt", group=group
        )
    if name == "other-filter":
        return weightlift.load_checkpoint(
            path, framework="pt", group=group, prefix="layers.0." if rank == 0 else None
        )
    if name == "other-path":
        return weightlift.load_checkpoint(
            os.environ["WL_COPY"] if rank == world - 1 else path, framework="pt", group=group
        )
    if name == "too-big":
        # A budget smaller than the checkpoint: refused at planning, on every rank together.
        os.environ["WEIGHTLIFT_MEMORY_BUDGET"] = "64KiB"
        try:
            return weightlift.load_checkpoint(path, framework="pt", group=group)
        finally:
            del os.environ["WEIGHTLIFT_MEMORY_BUDGET"]
    if name == "shared-drop":
        state = weightlift.load_checkpoint(path, framework="pt", group=group, drop_cache=True)
        # Every rank has dropped its share before any looks at the page cache, and every
        # rank has looked before any goes on to the next scenario, which reads the files
        # again (a rank digesting its tensors once saw the next scenario's first reads).
        dist.barrier(group=group)
        state.cached = cached(path)
        dist.barrier(group=group)
        return state
    if name == "killed":
        if rank == world - 1:
            os._exit(3)
        return weightlift.load_checkpoint(path, framework="pt", group=group)
    raise SystemExit(f"unknown scenario {name}")


def main():
    out, path, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    dist.init_process_group("gloo", timeout=TIMEOUT)
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}

    def save():
        tmp = os.path.join(out, f"rank{rank}.json.tmp")
        with open(tmp, "w") as f:
            json.dump(results, f)
        os.replace(tmp, os.path.join(out, f"rank{rank}.json"))

    for name in names:
        start = time.perf_counter()
        try:
            state = scenario(name, path, rank, world)
            results[name] = {
                "ok": True,
                "tensors": {k: digest(v) for k, v in state.items()},
                "bytes_read": sum(f["bytes_read"] for f in state.report),
                "cached": getattr(state, "cached", None),
            }
        except Exception as e:  # noqa: BLE001 (the test checks the type)
            results[name] = {"ok": False, "type": type(e).__name__, "error": str(e)}
        results[name]["seconds"] = time.perf_counter() - start
        save()
    save()
    # A group whose peer died cannot be torn down collectively.
    if "killed" in names:
        os._exit(0)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
