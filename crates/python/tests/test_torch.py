"""The torch path and the mapped default, against safetensors.torch as the oracle: every
dtype torch has, views over one storage per file, mapped files that stay untouched by
writes, owned copies on request, reports, dropping the page cache, and the behaviours of
safetensors' API that callers rely on (errors, closed handles, slicing)."""

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file as st_load_file  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import weightlift  # noqa: E402
import weightlift.torch  # noqa: E402

TORCH_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
] + [
    getattr(torch, name)
    for name in (
        "uint16",
        "uint32",
        "uint64",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float4_e2m1fn_x2",
    )
    if hasattr(torch, name)
]


def same_bytes(a, b):
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    raw = lambda t: t.contiguous().reshape(-1).view(torch.uint8).tolist()  # noqa: E731
    assert raw(a) == raw(b)


@pytest.fixture
def every_dtype(tmp_path):
    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for i, dtype in enumerate(TORCH_DTYPES):
        raw = torch.randint(0, 256, (4 * 6 * dtype.itemsize,), dtype=torch.uint8, generator=gen)
        if dtype == torch.bool:
            raw = raw % 2
        tensors[f"t{i}"] = raw.view(dtype).reshape(4, 6)
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros((0, 3))
    path = tmp_path / "every.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return str(path), tensors


def test_every_torch_dtype_loads_like_safetensors(every_dtype):
    path, tensors = every_dtype
    expected = st_load_file(path)
    for loader in (
        lambda: weightlift.torch.load_file(path),
        lambda: weightlift.torch.load_file(path, copy=True),
        lambda: weightlift.load_checkpoint(path, framework="pt"),
        lambda: weightlift.load_checkpoint(path, framework="pt", backend="pread"),
    ):
        state = loader()
        assert list(state) == list(expected)
        for name, t in expected.items():
            same_bytes(state[name], t)
    with weightlift.safe_open(path, framework="pt") as f:
        for name, t in expected.items():
            same_bytes(f.get_tensor(name), t)
            same_bytes(f.get_slice(name)[...], t)


def test_one_storage_per_file_and_views_per_tensor(every_dtype):
    path, _ = every_dtype
    state = weightlift.torch.load_file(path)
    storages = {t.untyped_storage().data_ptr() for t in state.values() if t.numel()}
    assert len(storages) == 1
    assert all(t.is_contiguous() for t in state.values())


def test_mapped_by_default_writes_stay_private(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, path)
    before = open(path, "rb").read()
    state = weightlift.load_checkpoint(path, framework="pt")
    (entry,) = state.report
    assert entry["placement"] == "mapped" and "local" in entry["reason"], entry
    assert entry["bytes_read"] == 4096 * 4
    state["w"][:] = -1
    assert float(state["w"][7]) == -1.0
    assert open(path, "rb").read() == before, "a write through a mapped tensor reached the file"
    copied = weightlift.load_checkpoint(path, framework="pt", copy=True)
    assert copied.report[0]["placement"] == "owned"
    assert float(copied["w"][7]) == 7.0
    pread = weightlift.load_checkpoint(path, framework="pt", backend="pread")
    assert pread.report[0]["placement"] == "owned"


def test_tensors_outlive_the_handle_and_the_dict(tmp_path):
    import gc

    path = str(tmp_path / "m.safetensors")
    save_file({"a": torch.arange(10, dtype=torch.int64), "b": torch.ones(3)}, path)
    with weightlift.safe_open(path, framework="pt") as f:
        a = f.get_tensor("a")
        rows = f.get_slice("a")[2:5]
    state = weightlift.torch.load_file(path)
    b = state["b"]
    del state, f
    gc.collect()
    assert a.tolist() == list(range(10))
    assert rows.tolist() == [2, 3, 4]
    assert b.tolist() == [1.0, 1.0, 1.0]


def test_drop_cache_leaves_the_page_cache_empty(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file({f"t{i}": torch.ones(256, 1024) for i in range(4)}, path)
    os.sync()
    state = weightlift.load_checkpoint(path, framework="pt", copy=True, drop_cache=True)
    assert state.report[0]["placement"] == "owned"
    out = subprocess.run(["fincore", "--bytes", "--noheadings", path], capture_output=True, text=True)
    if out.returncode == 0:
        cached = int(out.stdout.split()[0])
        assert cached <= 64 << 10, f"{cached} bytes still cached"
    assert float(state["t3"].sum()) == 256 * 1024


def test_safetensors_behaviours_callers_rely_on(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file({"x": torch.arange(50, dtype=torch.float32).reshape(10, 5), "e": torch.zeros(0, 3)}, path)
    # The error class can be imported from its module, as pickling and logging need.
    assert importlib.import_module(weightlift.SafetensorError.__module__).SafetensorError
    with pytest.raises(FileNotFoundError) as e:
        weightlift.safe_open("notafile", framework="pt")
    assert str(e.value) == "No such file or directory: notafile"
    # safetensors' strict slicing rules and messages (its numpy path and its pread path).
    for framework, backend in (("np", "auto"), ("pt", "pread")):
        f = weightlift.safe_open(path, framework=framework, backend=backend)
        with f:
            assert f.keys() == ["e", "x"]
            s = f.get_slice("x")
            assert tuple(s[()].shape) == (10, 5)
            assert tuple(s[[]].shape) == (0, 5)
            assert s[..., 1].tolist() == list(range(1, 50, 5))
            with pytest.raises(weightlift.SafetensorError, match="^Non empty lists are not implemented$"):
                s[[0, 1]]
            with pytest.raises(weightlift.SafetensorError) as err:
                s[2:, 20]
            assert str(err.value) == (
                "Error during slicing [2:, 20] with shape [10, 5]: "
                "index 20 out of bounds for tensor dimension #1 of size 5"
            )
            with pytest.raises(weightlift.SafetensorError) as err:
                s[:20]
            assert str(err.value).endswith("index 19 out of bounds for tensor dimension #0 of size 10")
            with pytest.raises(weightlift.SafetensorError, match="Invalid index -6 for dimension 1"):
                s[2:, -6]
        for call in (f.keys, f.offset_keys, f.metadata, lambda: f.get_tensor("x")):
            with pytest.raises(weightlift.SafetensorError, match="File is closed"):
                call()
    # Over a mapping, torch indexes the whole tensor with its own rules, as safetensors does.
    with weightlift.safe_open(path, framework="pt") as f:
        assert tuple(f.get_slice("e")[...].shape) == (0, 3)
        assert f.get_slice("x")[[0, 2], 1].tolist() == [1.0, 11.0]
        rows = f.get_slice("x")[2:4]
        assert rows.untyped_storage().data_ptr() == f.get_tensor("x").untyped_storage().data_ptr()


def test_a_file_cut_under_a_mapped_load_is_an_error_not_a_crash(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file({"a": torch.ones(1024, 1024), "b": torch.ones(1024, 1024)}, path)
    # A separate process: were the mapping touched past the cut, SIGBUS would kill it.
    code = f"""
import os, weightlift
with weightlift.safe_open({path!r}, framework="pt") as f:
    keep = f.get_tensor("a")
    os.truncate({path!r}, os.path.getsize({path!r}) - 4096)
    try:
        f.get_tensors()
    except weightlift.SafetensorError as e:
        print("ERROR", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "ERROR" in out.stdout and "m.safetensors" in out.stdout and '"b"' in out.stdout, out.stdout


def test_misaligned_tensors_are_copied(tmp_path):
    # A file whose header length puts a float32 tensor at an odd address (the format allows
    # it; writers pad): the tensor comes back right, as a copy.
    header = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"F32","shape":[2],"data_offsets":[1,9]}}'
    data = b"\x07" + np.array([1.5, -2.0], dtype="<f4").tobytes()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    state = weightlift.torch.load_file(str(path))
    assert state["w"].tolist() == [1.5, -2.0]
    assert state["a"].tolist() == [7]


def test_stand_in_for_safetensors_native_module(tmp_path, every_dtype):
    """weightlift._safetensors_rust is a complete stand-in for safetensors' native module:
    loading is weightlift's, serializing stays safetensors'."""
    from weightlift import _safetensors_rust as stand_in

    path, _ = every_dtype
    import safetensors

    for name in ("serialize", "serialize_file", "TensorSpec", "__version__", "_safe_open_handle"):
        assert hasattr(stand_in, name)
    data = open(path, "rb").read()
    flat = lambda items: sorted((n, d["dtype"], d["shape"], bytes(d["data"])) for n, d in items)  # noqa: E731
    assert flat(stand_in.deserialize(data)) == flat(safetensors.deserialize(data))
    with open(path, "rb") as fh:
        with stand_in._safe_open_handle(fh, framework="pt") as g:
            assert g.keys() == sorted(g.keys())
    with pytest.raises(weightlift.SafetensorError):
        stand_in.TensorSpec(dtype="nonsense", shape=[1], data_ptr=0, data_len=0)


def test_slice_plans_equal_get_slice_for_every_kind_of_index(tmp_path):
    """``load_checkpoint(slices=fn)`` gives what ``get_slice(name)[index]`` gives, for plain
    row and column blocks (the fast path) and for steps, integers, negative bounds and
    ellipses (the general one); errors name the tensor."""
    path = str(tmp_path / "m.safetensors")
    tensors = {f"w{i}": torch.arange(i * 1000, i * 1000 + 12 * 10, dtype=torch.float32).reshape(12, 10) for i in range(8)}
    tensors["bias"] = torch.arange(10, dtype=torch.bfloat16)
    save_file(tensors, path)
    index = {
        "w0": (slice(0, 6),),
        "w1": (slice(None), slice(5, 10)),
        "w2": (slice(1, 11, 3),),
        "w3": (2,),
        "w4": (slice(-4, None), slice(None, -2)),
        "w5": (Ellipsis, slice(0, 1)),
        "w6": slice(3, 3),
        "w7": None,
        "bias": (slice(2, 8),),
    }
    got = weightlift.load_checkpoint(path, framework="pt", slices=lambda name, shape: index[name])
    with weightlift.safe_open(path, "pt") as f:
        for name, ix in index.items():
            want = f.get_tensor(name) if ix is None else f.get_slice(name)[ix]
            assert got[name].shape == want.shape, name
            assert torch.equal(got[name], want), name
            assert torch.equal(want, tensors[name] if ix is None else tensors[name][ix]), name
    with pytest.raises(weightlift.SafetensorError, match="w0"):
        weightlift.load_checkpoint(path, framework="pt", slices=lambda name, shape: (slice(0, 13),) if name == "w0" else None)
