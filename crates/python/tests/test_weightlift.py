"""weightlift's Python API against safetensors' own, on files safetensors writes.

The installed ``safetensors`` package is the oracle: every behaviour the two share (keys and
their order, metadata, dtypes, values, slicing, errors) is compared call by call.
"""

import gc
import os
import sys
import threading

import numpy as np
import pytest
import safetensors
from safetensors.numpy import load as st_load
from safetensors.numpy import load_file as st_load_file
from safetensors.numpy import save_file

import weightlift
import weightlift.numpy

ml_dtypes = pytest.importorskip("ml_dtypes")


@pytest.fixture
def files(tmp_path):
    """A file with every numpy dtype and some ml_dtypes ones, one without metadata, and a
    sharded checkpoint with an index."""
    rng = np.random.default_rng(7)
    tensors = {
        "f64": rng.standard_normal((3, 5)),
        "f32": rng.standard_normal((4, 6, 5)).astype(np.float32),
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "i64": rng.integers(-9, 9, (2, 3)).astype(np.int64),
        "u64": rng.integers(0, 9, (2, 3)).astype(np.uint64),
        "i32": rng.integers(-9, 9, (5,)).astype(np.int32),
        "u32": rng.integers(0, 9, (5,)).astype(np.uint32),
        "i16": rng.integers(-9, 9, (5,)).astype(np.int16),
        "u16": rng.integers(0, 9, (5,)).astype(np.uint16),
        "i8": rng.integers(-9, 9, (5, 1)).astype(np.int8),
        "u8": rng.integers(0, 9, (9,)).astype(np.uint8),
        "bool": rng.integers(0, 2, (4,)).astype(bool),
        "c64": (rng.standard_normal(3) + 1j).astype(np.complex64),
        "bf16": rng.standard_normal((3, 4)).astype(ml_dtypes.bfloat16),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
    full = tmp_path / "all.safetensors"
    save_file(tensors, str(full), metadata={"format": "np", "note": "weightlift test"})
    bare = tmp_path / "bare.safetensors"
    save_file({"x": np.arange(10, dtype=np.float32)}, str(bare))

    shards = tmp_path / "sharded"
    shards.mkdir()
    weight_map = {}
    for i, part in enumerate([["a.w", "a.b"], ["b.w", "b.b", "c"]]):
        name = f"model-{i + 1:05}-of-00002.safetensors"
        save_file(
            {k: rng.standard_normal((8, 4)).astype(np.float32) for k in part},
            str(shards / name),
            metadata={"format": "pt"},
        )
        weight_map.update({k: name for k in part})
    total = sum(4 * 32 for _ in weight_map)
    import json

    (shards / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return {"full": str(full), "bare": str(bare), "sharded": str(shards), "tensors": tensors}


def same(a, b):
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.tobytes() == b.tobytes()


def test_load_file_matches_safetensors(files):
    ours = weightlift.load_file(files["full"])
    theirs = st_load_file(files["full"])
    assert list(ours) == list(theirs), "same key order (file order)"
    assert set(ours) == set(files["tensors"])
    for name, array in files["tensors"].items():
        same(ours[name], array)
        if name in theirs:
            same(ours[name], theirs[name])
    same_dicts = weightlift.numpy.load_file(files["full"])
    assert set(same_dicts) == set(ours)


def test_safe_open_keys_metadata_and_tensors(files):
    with weightlift.safe_open(files["full"], framework="np") as ours, safetensors.safe_open(
        files["full"], framework="np"
    ) as theirs:
        assert ours.keys() == theirs.keys()
        assert ours.offset_keys() == theirs.offset_keys()
        assert ours.metadata() == theirs.metadata()
        for name in theirs.keys():
            if name == "bf16":
                same(ours.get_tensor(name), files["tensors"][name])
            else:
                same(ours.get_tensor(name), theirs.get_tensor(name))
            s_ours, s_theirs = ours.get_slice(name), theirs.get_slice(name)
            assert s_ours.get_shape() == s_theirs.get_shape()
            assert s_ours.get_dtype() == s_theirs.get_dtype()
    with weightlift.safe_open(files["bare"], "numpy") as ours, safetensors.safe_open(
        files["bare"], "numpy"
    ) as theirs:
        assert ours.metadata() == theirs.metadata()


INDEXES = [
    (),
    0,
    -1,
    3,
    (slice(None),),
    (slice(1, 3),),
    (slice(None), 2),
    (Ellipsis, 1),
    (Ellipsis,),
    (1, Ellipsis, 2),
    (slice(0, 4, 2),),
    (slice(None), slice(1, None, 2), slice(None, 3)),
    (slice(2, 2),),
    (np.int64(1), slice(None)),
    (slice(None), slice(None), slice(None), 0),
    (9,),
    (slice(0, 9),),
    (slice(None), 6),
    (0, 0, 0, 0),
    (slice(None, None, -1),),
    ([0, 1],),
]


@pytest.mark.parametrize("index", INDEXES, ids=repr)
def test_slices_match_safetensors(files, index):
    name = "f32"
    with weightlift.safe_open(files["full"], framework="np") as ours, safetensors.safe_open(
        files["full"], framework="np"
    ) as theirs:
        try:
            expected = theirs.get_slice(name)[index]
        except Exception:  # noqa: BLE001 - safetensors raises several types
            expected = None
        if expected is None:
            with pytest.raises((weightlift.SafetensorError, TypeError, ValueError)):
                ours.get_slice(name)[index]
        else:
            got = ours.get_slice(name)[index]
            same(np.ascontiguousarray(got), np.ascontiguousarray(expected))


def test_negative_slice_bounds_count_from_the_end(files):
    # safetensors rejects these with OverflowError; weightlift follows numpy.
    with weightlift.safe_open(files["full"], framework="np") as f:
        array = files["tensors"]["f32"]
        same(np.ascontiguousarray(f.get_slice("f32")[-3:, :, -2:]), array[-3:, :, -2:])


def test_load_bytes_matches_safetensors(files):
    data = open(files["bare"], "rb").read()
    same(weightlift.load(data)["x"], st_load(data)["x"])
    # safetensors.numpy cannot load bf16 (numpy lacks it); weightlift gives ml_dtypes arrays.
    data = open(files["full"], "rb").read()
    ours = weightlift.numpy.load(data)
    for name, array in files["tensors"].items():
        same(ours[name], array)
    with pytest.raises(TypeError):
        weightlift.load("not bytes")


def broken_files(tmp_path):
    good = open(tmp_path / "ref.safetensors", "rb").read()
    n = int.from_bytes(good[:8], "little")
    yield "truncated data", good[:-3]
    yield "truncated header", good[: 8 + n // 2]
    yield "huge header length", (1 << 62).to_bytes(8, "little") + good[8:]
    yield "not json", good[:8] + b"{" * n + good[8 + n :]
    yield "too short", b"\x01\x00"
    header = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}'
    yield "shape and offsets disagree", len(header).to_bytes(8, "little") + header + b"\0" * 4
    header = b'{"a":{"dtype":"F99","shape":[1],"data_offsets":[0,4]}}'
    yield "unknown dtype", len(header).to_bytes(8, "little") + header + b"\0" * 4


def test_malformed_files_raise_like_safetensors(tmp_path):
    save_file({"w": np.ones((4, 4), dtype=np.float32)}, str(tmp_path / "ref.safetensors"))
    for what, data in broken_files(tmp_path):
        path = tmp_path / "bad.safetensors"
        path.write_bytes(data)
        with pytest.raises(Exception):
            st_load_file(str(path))
        with pytest.raises(weightlift.SafetensorError) as info:
            weightlift.load_file(str(path))
        assert "bad.safetensors" in str(info.value), what
        with pytest.raises(weightlift.SafetensorError):
            weightlift.load(data)
    with pytest.raises(FileNotFoundError):
        weightlift.safe_open(str(tmp_path / "missing.safetensors"), framework="np")
    with pytest.raises(FileNotFoundError):
        safetensors.safe_open(str(tmp_path / "missing.safetensors"), framework="np")
    with pytest.raises(weightlift.SafetensorError):
        weightlift.safe_open(str(tmp_path / "ref.safetensors"), framework="nope")
    with weightlift.safe_open(str(tmp_path / "ref.safetensors"), framework="np") as f:
        with pytest.raises(weightlift.SafetensorError, match="nothere"):
            f.get_tensor("nothere")


def test_a_load_over_its_budget_raises_does_not_fit(files, monkeypatch):
    """The budget is decided when the checkpoint is opened (here from the environment): a
    copying load that needs more is refused before reading, as a subclass of safetensors'
    error that callers can catch on its own."""
    monkeypatch.setenv("WEIGHTLIFT_MEMORY_BUDGET", "1KiB")
    with pytest.raises(weightlift.DoesNotFit, match="more than its budget") as raised:
        weightlift.load_checkpoint(files["full"], copy=True)
    assert isinstance(raised.value, weightlift.SafetensorError)
    assert "WEIGHTLIFT_MEMORY_BUDGET=1KiB" in str(raised.value)
    monkeypatch.delenv("WEIGHTLIFT_MEMORY_BUDGET")
    same(weightlift.load_checkpoint(files["full"], copy=True)["f32"], files["tensors"]["f32"])


def test_arrays_share_the_loaders_memory_and_keep_it_alive(files):
    state = weightlift.load_checkpoint(files["full"])
    a = state["f32"]
    assert not a.flags.owndata and a.base is not None
    # The memory outlives the dict, the handle and a garbage collection.
    del state
    gc.collect()
    same(a, files["tensors"]["f32"])
    # Writable, like safetensors' arrays, and writes stay within the tensor.
    b = weightlift.load_file(files["full"])
    b["u8"][:] = 0
    same(b["i8"], files["tensors"]["i8"])


def test_load_checkpoint_sharded_prefix_and_threads(files):
    shards = files["sharded"]
    state = weightlift.load_checkpoint(shards, threads=3)
    expected = {}
    for name in sorted(os.listdir(shards)):
        if name.endswith(".safetensors"):
            expected.update(st_load_file(os.path.join(shards, name)))
    assert set(state) == set(expected)
    for name in expected:
        same(state[name], expected[name])
    only_b = weightlift.load_checkpoint(shards, prefix="b.")
    assert sorted(only_b) == ["b.b", "b.w"]
    with weightlift.safe_open(os.path.join(shards, "model.safetensors.index.json"), "np") as f:
        assert f.keys() == sorted(expected)
        assert f.metadata() == {"total_size": str(4 * 32 * 5)}
    for backend in ("pread", "direct", "mmap"):
        same(weightlift.load_checkpoint(shards, backend=backend)["c"], expected["c"])
    with pytest.raises(ValueError):
        weightlift.load_checkpoint(shards, backend="carrier-pigeon")


def test_dlpack_exports_share_memory(files):
    with weightlift.safe_open(files["full"], "np") as f:
        native = f._handle.tensor("f32")
    assert native.__dlpack_device__() == (1, 0)
    via_dlpack = np.from_dlpack(native)
    same(via_dlpack, files["tensors"]["f32"])
    assert np.shares_memory(via_dlpack, np.asarray(native))


def test_bf16_without_ml_dtypes_is_a_clear_error(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    with weightlift.safe_open(files["full"], "np") as f:
        with pytest.raises(weightlift.SafetensorError, match="ml_dtypes"):
            f.get_tensor("bf16")
        same(f.get_tensor("f32"), files["tensors"]["f32"])


def test_the_gil_is_released_while_loading(tmp_path):
    path = str(tmp_path / "big.safetensors")
    save_file({f"t{i}": np.ones((1024, 1024), dtype=np.float32) for i in range(48)}, path)
    done = []
    loader = threading.Thread(target=lambda: done.append(weightlift.load_checkpoint(path, threads=2)))
    spins = 0
    loader.start()
    while loader.is_alive():
        spins += 1
    loader.join()
    assert len(done[0]) == 48
    # Had the load held the GIL throughout, this thread could not have run meanwhile.
    assert spins > 1000, spins


def test_torch_tensors_through_dlpack(files):
    torch = pytest.importorskip("torch")
    state = weightlift.load_file(files["full"], framework="pt")
    assert state["bf16"].dtype == torch.bfloat16
    assert torch.equal(state["f32"], torch.from_numpy(files["tensors"]["f32"]))


def test_urls_load_like_files(files, tmp_path):
    """A checkpoint served by nginx on 127.0.0.1 (HTTP ranges) loads like the local files."""
    import shutil
    import socket
    import subprocess
    import time

    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None:
        pytest.skip("nginx is not installed (bash .ci/run installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "nginx"
    conf.mkdir()
    user = "user root;" if os.geteuid() == 0 else ""
    (conf / "nginx.conf").write_text(
        f"{user} daemon off; worker_processes 1; pid {conf}/pid; error_log {conf}/err;\n"
        f"events {{}} http {{ access_log off; client_body_temp_path {conf}/b; proxy_temp_path {conf}/p;\n"
        f"fastcgi_temp_path {conf}/f; uwsgi_temp_path {conf}/u; scgi_temp_path {conf}/s;\n"
        f"server {{ listen 127.0.0.1:{port}; root {os.path.dirname(files['full'])}; }} }}\n"
    )
    server = subprocess.Popen([nginx, "-c", str(conf / "nginx.conf"), "-p", str(conf)])
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.02)
        base = f"http://127.0.0.1:{port}"
        remote = weightlift.load_checkpoint(f"{base}/sharded")
        local = weightlift.load_checkpoint(files["sharded"])
        assert set(remote) == set(local)
        for name in local:
            same(remote[name], local[name])
        # URLs are read into memory of their own, by loads and lazy reads alike (the one
        # mapping policy), with the automatic backend whatever the caller passed.
        assert {r["placement"] for r in remote.report} == {"owned"}
        with weightlift.safe_open(f"{base}/all.safetensors", framework="np") as f:
            same(f.get_slice("f32")[1:3], files["tensors"]["f32"][1:3])
            memory, _ = f._h().get("f32")
            assert not memory.mapped
        with pytest.raises(FileNotFoundError, match="404"):
            weightlift.load_file(f"{base}/missing.safetensors")
        # hf:// from a hub mirror laid out as the hub serves files (HF_ENDPOINT).
        shutil.copytree(files["sharded"], tmp_path / "org" / "m" / "resolve" / "main")
        os.environ["HF_ENDPOINT"] = base
        try:
            hub = weightlift.load_checkpoint("hf://org/m")
        finally:
            del os.environ["HF_ENDPOINT"]
        assert set(hub) == set(local)
        for name in local:
            same(hub[name], local[name])
    finally:
        # SIGTERM: the master stops its worker, then exits (SIGKILL would orphan the worker).
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def resident(path, offset, length):
    """Whether every page of `offset..offset + length` of `path` is in the page cache
    (`mincore` on a private mapping of it, which reads nothing)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    start = offset // page * page
    pages = (offset + length - start + page - 1) // page
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as m:
        first = ctypes.c_char.from_buffer(m)
        try:
            ok = libc.mincore(
                ctypes.c_void_p(ctypes.addressof(first) + start), ctypes.c_size_t(pages * page), vec
            )
        finally:
            del first
    assert ok == 0, os.strerror(ctypes.get_errno())
    return all(v & 1 for v in vec)


def test_the_first_read_starts_the_prefetch_of_every_file_opened_to_prefetch(tmp_path):
    """A loader opens every file of a model, then reads them one after another: the first
    read starts the prefetch of every file opened to prefetch and still open (the window
    reads the next files while the reader is on the first), not of one closed, nor of one
    opened without a prefetch."""
    import time

    from cgroups import evict

    paths = []
    for i in range(5):
        path = str(tmp_path / f"model-{i}.safetensors")
        save_file({f"w{i}.{j}": np.full((1 << 20,), i * 2 + j, dtype=np.float32) for j in range(2)}, path)
        paths.append(path)
    evict(paths)
    last = os.path.getsize(paths[0]) - 4096
    opened = [weightlift.safe_open(p, "np", prefetch=True) for p in paths[:3]]
    closed = weightlift.safe_open(paths[3], "np", prefetch=True)
    closed.__exit__(None, None, None)
    plain = weightlift.safe_open(paths[4], "np")
    try:
        assert not any(resident(p, last, 4096) for p in paths)
        assert (opened[0].get_tensor("w0.1") == 1).all()
        deadline = time.monotonic() + 60
        while not all(resident(p, 0, last + 4096) for p in paths[:3]):
            assert time.monotonic() < deadline, "the files opened to prefetch were not read"
            time.sleep(0.05)
        assert not resident(paths[3], last, 4096), "a closed handle's file was read"
        assert not resident(paths[4], last, 4096), "a file opened without a prefetch was read"
        for i, f in enumerate(opened):
            assert (f.get_tensor(f"w{i}.0") == i * 2).all()
    finally:
        for f in (*opened, plain):
            f.__exit__(None, None, None)


PREFETCH_READERS = """
import sys, threading
import weightlift
path = sys.argv[1]
f = weightlift.safe_open(path, "np", backend="pread", prefetch=True)
names = f.keys()
errors, done = [], []

def read(k):
    try:
        for name in names[k::8]:
            f.get_slice(name)[:2]
        done.append(k)
    except Exception as e:
        errors.append(repr(e))

threads = [threading.Thread(target=read, args=(k,)) for k in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(len(done), errors)
"""


def test_readers_waiting_for_a_prefetch_do_not_deadlock(tmp_path):
    """Eight threads read slices while the prefetch still runs, as transformers' converter
    threads do: the first waits for the prefetch, the others must not block on its lock with
    the GIL held (a deadlock once the first wants the GIL back). In a child process, so that
    a deadlock fails the test instead of hanging it."""
    import subprocess

    path = str(tmp_path / "many.safetensors")
    save_file({f"t{i:04d}": np.full((256, 256), i, dtype=np.float32) for i in range(768)}, path)
    for _ in range(3):
        out = subprocess.run(
            [sys.executable, "-c", PREFETCH_READERS, path],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split(None, 1) == ["8", "[]\n"], out.stdout


def test_the_first_read_of_a_prefetching_handle_calls_off_early_reads(tmp_path):
    """An early read of a whole checkpoint (``from_pretrained``'s, started before the model is
    built) is called off by the first read of a handle opened to prefetch, whose window reads
    the files for the reader from then on; a read of a handle opened without a prefetch
    leaves it running."""
    from weightlift import _open

    path = str(tmp_path / "m.safetensors")
    save_file({"w": np.arange(1024, dtype=np.float32)}, path)

    class Early:
        closed = 0

        def close(self):
            Early.closed += 1

    early = Early()
    _open.add_early_read(early)
    try:
        with weightlift.safe_open(path, "np") as f:
            assert (f.get_tensor("w") == np.arange(1024)).all()
        assert Early.closed == 0
        with weightlift.safe_open(path, "np", prefetch=True) as f:
            assert (f.get_slice("w")[:8] == np.arange(8)).all()
        assert Early.closed == 1
        _open.stop_early_reads()
        assert Early.closed == 1, "called off once, and no longer registered"
    finally:
        _open.remove_early_read(early)
