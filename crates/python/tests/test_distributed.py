"""Shared loads over torch.distributed (gloo on 127.0.0.1) and tensor-parallel slice plans,
with ranks started as torchrun starts them (see dist_worker.py): every rank's tensors are the
single-process load's bytes, the ranks read the checkpoint once between them, slice plans
give exactly the slices, and a rank that fails, disagrees or dies makes every rank raise."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch without gloo", allow_module_level=True)
from safetensors.torch import load_file as st_load_file  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from dist_worker import tp_slices  # noqa: E402

# A rank that has not finished by then hangs: the test fails instead of waiting on it.
DEADLINE = 240
WORLDS = {
    2: ["shared", "shared-np", "sliced", "shared-sliced", "missing-shard", "bad-header",
        "other-filter", "other-path", "too-big", "shared-drop", "killed"],
    4: ["shared", "sliced", "shared-sliced", "missing-shard", "other-path", "killed"],
}


def digest(t):
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return [str(t.dtype).removeprefix("torch."), list(t.shape), hashlib.sha256(raw).hexdigest()]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Three shards with an index: matrices split by rows (``.row``) and columns (``.col``),
    norms, bf16 experts, int8 scales; plus a copy missing a shard, a copy with a broken
    header, and an identical copy elsewhere."""
    root = tmp_path_factory.mktemp("dist")
    path = root / "model"
    path.mkdir()
    gen = torch.Generator().manual_seed(7)
    shards, weight_map = [{} for _ in range(3)], {}
    for layer in range(9):
        shard = shards[layer // 3]
        p = f"layers.{layer}."
        shard[p + "attn.row"] = torch.randn(96, 64, generator=gen)
        shard[p + "mlp.col"] = torch.randn(64, 90, generator=gen).to(torch.float16)
        shard[p + "norm"] = torch.randn(64, generator=gen)
        shard[p + "experts.row"] = torch.randn(12, 32, 48, generator=gen).to(torch.bfloat16)
        shard[p + "scale"] = torch.randint(-128, 127, (7, 5), generator=gen, dtype=torch.int8)
    shards[2]["embed.col"] = torch.randn(1000, 256, generator=gen)
    for i, tensors in enumerate(shards):
        file = f"model-{i + 1:05}-of-00003.safetensors"
        save_file(tensors, path / file)
        weight_map.update({name: file for name in tensors})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )

    missing = root / "missing"
    shutil.copytree(path, missing)
    (missing / "model-00002-of-00003.safetensors").unlink()
    bad = root / "bad"
    shutil.copytree(path, bad)
    with open(bad / "model-00003-of-00003.safetensors", "r+b") as f:
        f.write((1 << 40).to_bytes(8, "little"))
    copy = root / "copy"
    shutil.copytree(path, copy)

    full = {}
    for file in sorted(path.glob("*.safetensors")):
        # Copies: a mapping of the files kept here would keep their pages in the page cache.
        full.update({k: v.clone() for k, v in st_load_file(file).items()})
    # Written back, so that the page cache can drop the files' pages when asked to.
    os.sync()
    return {"path": path, "missing": missing, "bad": bad, "copy": copy, "full": full}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world, checkpoint, scenarios, out):
    """Starts `world` ranks running `scenarios`; returns ({rank: results}, {rank: exit code})."""
    out.mkdir()
    env = dict(
        os.environ,
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WL_MISSING=str(checkpoint["missing"]),
        WL_BAD=str(checkpoint["bad"]),
        WL_COPY=str(checkpoint["copy"]),
        OMP_NUM_THREADS="1",
    )
    worker = os.path.join(HERE, "dist_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(out), str(checkpoint["path"]), *scenarios],
            env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(world)
    ]
    deadline = time.monotonic() + DEADLINE
    codes, logs = {}, {}
    for rank, p in enumerate(procs):
        try:
            logs[rank], _ = p.communicate(timeout=max(1, deadline - time.monotonic()))
            codes[rank] = p.returncode
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"rank {rank} of {world} hung (no exit within {DEADLINE} s)")
    results = {}
    for rank in range(world):
        file = out / f"rank{rank}.json"
        assert file.exists(), f"rank {rank} wrote nothing:\n{logs[rank].decode()}"
        results[rank] = json.loads(file.read_text())
    return results, codes, logs


@pytest.fixture(scope="module", params=sorted(WORLDS), ids=lambda w: f"world{w}")
def world(request, checkpoint, tmp_path_factory):
    w = request.param
    out = tmp_path_factory.mktemp(f"world{w}") / "out"
    results, codes, logs = run_world(w, checkpoint, WORLDS[w], out)
    return {"world": w, "results": results, "codes": codes, "logs": logs}


def nbytes(t):
    return t.numel() * t.element_size()


def expected_slices(full, pick):
    out = {}
    for name, t in full.items():
        index = pick(name, list(t.shape))
        out[name] = t if index is None else t[index]
    return out


def outcome(world, scenario):
    """Every live rank's result of `scenario`."""
    got = {}
    for rank, results in world["results"].items():
        if scenario in results:
            got[rank] = results[scenario]
    return got


def test_every_rank_gets_the_whole_checkpoint_and_reads_a_share(world, checkpoint):
    full = checkpoint["full"]
    want = {name: digest(t) for name, t in full.items()}
    total = sum(nbytes(t) for t in full.values())
    n = world["world"]
    got = outcome(world, "shared")
    assert len(got) == n
    for rank, r in got.items():
        assert r["ok"], (rank, r)
        assert r["tensors"] == want, f"rank {rank} differs from a single-process load"
    read = [got[rank]["bytes_read"] for rank in range(n)]
    # Once between them, and balanced: a share ends on a request boundary, and a shared
    # load's requests are at most 1/64 of a share or 64 KiB.
    assert sum(read) == total, read
    for rank, b in enumerate(read):
        assert b <= total / n * 1.05 + (64 << 10), (rank, read, total)


def test_numpy_shared_loads_match(world, checkpoint):
    got = outcome(world, "shared-np")
    if not got:
        pytest.skip("numpy is run with world 2 only")
    full = checkpoint["full"]
    for rank, r in got.items():
        assert r["ok"], (rank, r)
        # numpy names bfloat16 through ml_dtypes; the bytes are what matter.
        assert {k: v[1:] for k, v in r["tensors"].items()} == {
            name: digest(t)[1:] for name, t in full.items()
        }


def test_tensor_parallel_slices_are_exactly_the_slices_and_read_only_them(world, checkpoint):
    n = world["world"]
    got = outcome(world, "sliced")
    assert len(got) == n
    for rank, r in got.items():
        assert r["ok"], (rank, r)
        want = expected_slices(checkpoint["full"], tp_slices(rank, n))
        assert r["tensors"] == {k: digest(v) for k, v in want.items()}, f"rank {rank}"
        needed = sum(nbytes(t) for t in want.values())
        # Between a rank's runs, coalescing reads the other ranks' parts of the same tensors
        # (up to LoadOptions::max_gap) to save requests: never more than the tensors hold.
        full = sum(nbytes(t) for t in checkpoint["full"].values())
        assert needed <= r["bytes_read"] <= full, (rank, r["bytes_read"], needed)


def test_a_group_shares_a_slice_plan(world, checkpoint):
    n = world["world"]
    got = outcome(world, "shared-sliced")
    want = expected_slices(checkpoint["full"], tp_slices(1, n))
    needed = sum(nbytes(t) for t in want.values())
    for rank, r in got.items():
        assert r["ok"], (rank, r)
        assert r["tensors"] == {k: digest(v) for k, v in want.items()}, f"rank {rank}"
    read = sum(r["bytes_read"] for r in got.values())
    assert needed <= read <= sum(nbytes(t) for t in checkpoint["full"].values()), (read, needed)


@pytest.mark.parametrize(
    "scenario, words",
    [
        ("missing-shard", ["rank 1", "model-00002-of-00003.safetensors"]),
        ("bad-header", ["model-00003-of-00003.safetensors", "header"]),
        ("other-filter", ["different loads"]),
        ("other-path", ["different loads"]),
        ("too-big", ["more than its budget", "WEIGHTLIFT_MEMORY_BUDGET"]),
    ],
)
def test_a_rank_that_fails_or_disagrees_fails_every_rank(world, scenario, words):
    got = outcome(world, scenario)
    if not got:
        pytest.skip(f"{scenario} is run with world 2 only")
    assert len(got) == world["world"]
    for rank, r in got.items():
        assert not r["ok"], f"rank {rank} loaded: {scenario} should fail everywhere"
        assert r["type"] == "SafetensorError", (rank, r)
        for word in words:
            assert word in r["error"], (rank, word, r["error"])


def test_a_shared_load_can_leave_the_page_cache_as_it_found_it(world, checkpoint):
    got = outcome(world, "shared-drop")
    if not got:
        pytest.skip("shared-drop is run with world 2 only")
    want = {name: digest(t) for name, t in checkpoint["full"].items()}
    for rank, r in got.items():
        assert r["ok"], (rank, r)
        assert r["tensors"] == want
        if r["cached"] is not None:
            # What every rank read is dropped once all are done (headers' pages may stay).
            assert r["cached"] <= 3 * (64 << 10), (rank, r["cached"])


def test_a_killed_rank_ends_every_other_rank_with_an_error(world):
    n = world["world"]
    got = outcome(world, "killed")
    # The last rank exited on purpose; the others must have raised, not hung or crashed.
    assert world["codes"][n - 1] == 3
    assert sorted(got) == list(range(n - 1))
    for rank, r in got.items():
        assert not r["ok"] and r["type"] == "SafetensorError", (rank, r)
        assert "failed" in r["error"], r["error"]
        assert r["seconds"] < 60, r
        assert world["codes"][rank] == 0, world["logs"][rank].decode()
