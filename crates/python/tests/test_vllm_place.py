"""Placement by recording (``weightlift._vllm_place``), without vLLM: weight loaders written as
vLLM's are (views of the parameter and of the checkpoint tensor, then ``copy_``) are handed
views of unread mappings of the files, their copies recorded and carried out by file loads,
and the parameters must end byte-identical to the same loaders run on tensors read by
safetensors; copies that are not placements go the default way and still load correctly."""

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from weightlift import _handle, _vllm_place  # noqa: E402

E, H, I = 4, 16, 8  # experts, hidden, intermediate


def checkpoint(tmp_path, dtype=torch.bfloat16, pad=0):
    """Two files of a layer each; `pad` bytes more in each (a tensor no loader takes)."""
    torch.manual_seed(0)
    files = []
    for f in range(2):
        tensors = {}
        for e in range(E):
            for proj, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
                tensors[f"l{f}.experts.{e}.{proj}.weight"] = torch.randn(shape).to(dtype)
        tensors[f"l{f}.q.weight"] = torch.randn(H, H).to(dtype)
        tensors[f"l{f}.k.weight"] = torch.randn(H // 2, H).to(dtype)
        tensors[f"l{f}.norm.weight"] = torch.randn(H).to(dtype)
        tensors[f"l{f}.scale"] = torch.randn(()).to(dtype)
        if pad:
            tensors[f"l{f}.pad"] = torch.zeros(pad, dtype=torch.uint8)
        path = tmp_path / f"model-{f}.safetensors"
        save_file(tensors, str(path))
        files.append(str(path))
    return files


class Model:
    """Fused parameters as vLLM lays them out, and its weight loaders."""

    def __init__(self, dtype=torch.bfloat16):
        self.params = {}
        for f in range(2):
            self.params[f"l{f}.w13"] = torch.zeros(E, 2 * I, H, dtype=dtype)
            self.params[f"l{f}.w2"] = torch.zeros(E, H, I, dtype=dtype)
            self.params[f"l{f}.qk"] = torch.zeros(H + H // 2, H, dtype=dtype)
            self.params[f"l{f}.norm"] = torch.zeros(H, dtype=dtype)
            self.params[f"l{f}.scale"] = torch.zeros((), dtype=dtype)
            # Stored transposed: the loader copies into a transposed view.
            self.params[f"l{f}.down_t"] = torch.zeros(E, I, H, dtype=dtype)

    def load_weights(self, weights):
        loaded = set()
        for name, w in weights:
            layer, rest = name.split(".", 1)
            if rest.startswith("experts."):
                _, e, proj, _ = rest.split(".")
                e = int(e)
                if proj == "down":
                    self.params[f"{layer}.w2"].data[e].copy_(w)
                    # A second use of the same tensor: into a transposed view.
                    self.params[f"{layer}.down_t"].data[e].t().copy_(w)
                else:
                    shard = 0 if proj == "gate" else 1
                    expert = self.params[f"{layer}.w13"].data[e]
                    expert.narrow(0, shard * I, I).copy_(w.narrow(0, 0, I))
                loaded.add(f"{layer}.w13")
            elif rest == "q.weight":
                self.params[f"{layer}.qk"].data[:H].copy_(w)
            elif rest == "k.weight":
                self.params[f"{layer}.qk"].data[H:].copy_(w)
            elif rest == "norm.weight":
                # Arithmetic on the checkpoint tensor: not a placement.
                self.params[f"{layer}.norm"].data.copy_(w + 1)
            elif rest == "scale":
                self.params[f"{layer}.scale"].data.copy_(w)
            loaded.add(name)
        return loaded


def real_weights(files):
    from safetensors.torch import load_file

    for path in files:
        yield from load_file(path).items()


def placed_weights(files, source):
    yield from source.weights(files)


def open_handle(path):
    return _handle.open_handle(path)


@pytest.mark.parametrize("pool", [False, True])
def test_recorded_placements_equal_the_loaders_run_on_real_tensors(tmp_path, pool):
    from concurrent.futures import ThreadPoolExecutor

    files = checkpoint(tmp_path)
    want = Model()
    want.load_weights(real_weights(files))
    got = Model()
    with ThreadPoolExecutor(2) as ex:
        source = _vllm_place.Source(open_handle, pool=ex if pool else None)
        loaded = got.load_weights(placed_weights(files, source))
    assert loaded == want.load_weights(real_weights(files))
    for name, p in want.params.items():
        assert torch.equal(got.params[name], p), name
    # Every expert projection (and q, k, the scalar) placed; the copies into transposed views
    # (rows written across) and the norms (arithmetic) went the default way.
    assert source.placed == 2 * (E * 3 + 3)
    downs = [f"l{f}.experts.{e}.down.weight" for f in range(2) for e in range(E)]
    assert sorted(source.defaults) == sorted(downs + ["l0.norm.weight", "l1.norm.weight"])


def assembled(files, model_class, pool, evicted=False):
    """`model_class`'s loaders run on real tensors and on placements with the model's
    parameters given (so that those made of whole tensors are assembled): the parameters
    must be byte-identical. Returns the source and the names of the parameters whose memory
    was replaced. `evicted`: the files are dropped from the page cache before the load."""
    from concurrent.futures import ThreadPoolExecutor

    from cgroups import evict

    want = model_class()
    want.load_weights(real_weights(files))
    if evicted:
        evict(files)
    got = model_class()
    before = {name: p.data_ptr() for name, p in got.params.items()}
    with ThreadPoolExecutor(2) as ex:
        source = _vllm_place.Source(
            open_handle, pool=ex if pool else None, params=lambda: list(got.params.values())
        )
        got.load_weights(placed_weights(files, source))
    for name, p in want.params.items():
        assert torch.equal(got.params[name], p), name
    return source, sorted(n for n, p in got.params.items() if p.data_ptr() != before[n])


@pytest.mark.parametrize("pool", [False, True])
def test_parameters_made_of_whole_tensors_are_assembled_from_the_files_pages(
    tmp_path, pool, monkeypatch
):
    """Given the model's parameters, those whose memory whole checkpoint tensors cover side
    by side (fused experts, q and k rows, a scalar) take memory assembled from the files'
    pages instead of being filled; the others are filled as before; every byte as the
    loaders run on real tensors leave it. (Tiny parameters here: none is too small.)"""
    monkeypatch.setattr(_vllm_place, "_MIN_ASSEMBLED", 0)
    source, moved = assembled(checkpoint(tmp_path), Model, pool)
    assert source.placed == 2 * (E * 3 + 3)
    assert moved == sorted(f"l{f}.{p}" for f in range(2) for p in ("w13", "w2", "qk", "scale"))
    assert source.assembled == len(moved)


def test_cold_files_fill_the_parameters_instead(tmp_path, monkeypatch):
    """Where the files are not in the page cache when the load starts, each is read once, by
    the load of all its placements: nothing is assembled (decided once, for the load)."""
    monkeypatch.setattr(_vllm_place, "_MIN_ASSEMBLED", 0)
    # Large enough that opening a file (its header read) does not bring it all in.
    files = checkpoint(tmp_path, pad=16 << 20)
    source, moved = assembled(files, Model, pool=False, evicted=True)
    assert source.assembled == 0
    assert moved == []


def test_cold_files_an_early_read_brings_in_are_assembled(tmp_path, monkeypatch):
    """Where an early read of the files runs (started while vLLM built the model), cold files
    are assembled all the same: each file's assembly and fills wait until the early read is
    through with it, then find it in the page cache (no second reader of the file)."""
    import logging

    from cgroups import evict

    from weightlift import _early

    monkeypatch.setattr(_vllm_place, "_MIN_ASSEMBLED", 0)
    files = checkpoint(tmp_path, pad=16 << 20)
    want = Model()
    want.load_weights(real_weights(files))
    evict(files)
    waited = []
    early = _early.EarlyRead(str(tmp_path), logging.getLogger("test"))
    wait = early.wait
    monkeypatch.setattr(early, "wait", lambda path: waited.append(path) or wait(path))
    try:
        assert early.active(), "the evicted files are read early"
        got = Model()
        source = _vllm_place.Source(
            open_handle, params=lambda: list(got.params.values()), early=early
        )
        got.load_weights(placed_weights(files, source))
    finally:
        early.close()
    for name, p in want.params.items():
        assert torch.equal(got.params[name], p), name
    assert source.assembled == 2 * 4
    assert sorted(set(waited)) == sorted(files)
    assert all(_vllm_place._cached(f) for f in files)


def test_waiting_for_an_early_read_that_reads_nothing_returns_at_once(tmp_path):
    """Files that are cached already are not read early, nor a checkpoint larger than half the
    caller's prefetch window; waiting on them (or on a file of another checkpoint, or after
    the read was called off) returns at once."""
    import logging

    from weightlift import _early

    from cgroups import evict

    files = checkpoint(tmp_path, pad=16 << 20)
    early = _early.EarlyRead(str(tmp_path), logging.getLogger("test"))
    assert not early.active(), "every file is in the page cache"
    early.close()
    # Evicted, but larger than half the caller's window: not read early either.
    evict(files)
    early = _early.EarlyRead(str(tmp_path), logging.getLogger("test"), prefetch_window="32MiB")
    assert not early.active(), "the checkpoint does not fit half the window"
    early.wait(files[0])
    early.wait(str(tmp_path / "elsewhere.safetensors"))
    early.close()
    early.wait(files[1])


class Spoiled(Model):
    """Memory that whole tensors do not cover (w13 has rows of padding) or that a loader
    writes otherwise too (a computed row of qk after q and k, a slice of w2 before the
    experts): filled where vLLM made it."""

    def __init__(self, dtype=torch.bfloat16):
        super().__init__(dtype)
        for f in range(2):
            self.params[f"l{f}.w13"] = torch.zeros(E, 2 * I + 2, H, dtype=dtype)

    def load_weights(self, weights):
        loaded = set()
        for name, w in weights:
            layer, rest = name.split(".", 1)
            if rest == "experts.0.gate.weight":
                # A block of one tensor (not the whole) before the whole ones.
                self.params[f"{layer}.w2"].data[E - 1, :2].copy_(w[:2, :I])
            loaded |= super().load_weights([(name, w)])
            if rest == "k.weight":
                self.params[f"{layer}.qk"].data[0].copy_(w[0] * 2)
        return loaded


@pytest.mark.parametrize("pool", [False, True])
def test_memory_not_covered_by_whole_tensors_or_written_otherwise_is_filled(
    tmp_path, pool, monkeypatch
):
    monkeypatch.setattr(_vllm_place, "_MIN_ASSEMBLED", 0)
    _, moved = assembled(checkpoint(tmp_path), Spoiled, pool)
    assert moved == ["l0.scale", "l1.scale"]


def test_copies_across_dtypes_are_placed_and_conversions_go_the_default_way(tmp_path):
    files = checkpoint(tmp_path, dtype=torch.float32)
    want = Model(torch.bfloat16)
    want.load_weights(real_weights(files))
    got = Model(torch.bfloat16)
    source = _vllm_place.Source(open_handle)
    # copy_ from float32 into bfloat16 parameters: placed, converted by the file load.
    got.load_weights(placed_weights(files, source))
    for name, p in want.params.items():
        assert torch.equal(got.params[name], p), name
    assert source.placed == 2 * (E * 3 + 3)

    def converted(weights):
        for name, w in weights:
            yield name, w.to(torch.bfloat16)

    # `.to()` first (a tensor the loader computed): the default way, the same bytes.
    want = Model(torch.bfloat16)
    want.load_weights(converted(real_weights(files)))
    got = Model(torch.bfloat16)
    source = _vllm_place.Source(open_handle)
    got.load_weights(converted(placed_weights(files, source)))
    for name, p in want.params.items():
        assert torch.equal(got.params[name], p), name
    assert source.placed == 0 and len(source.defaults) == 2 * (E * 3 + 4)


def test_a_view_that_is_not_a_block_goes_the_default_way(tmp_path):
    files = checkpoint(tmp_path)
    source = _vllm_place.Source(open_handle)
    dest = torch.zeros(E, I // 2, H, dtype=torch.bfloat16)
    names = iter(placed_weights(files, source))
    for name, w in names:
        if name.endswith(".gate.weight") and name.startswith("l0."):
            e = int(name.split(".")[2])
            dest[e].copy_(w[::2])  # a stepped slice: not a block
    from safetensors.torch import load_file

    real = load_file(files[0])
    for e in range(E):
        assert torch.equal(dest[e], real[f"l0.experts.{e}.gate.weight"][::2])
    assert source.placed == 0 and len(source.defaults) == E


def test_a_tensor_not_aligned_in_its_file_is_handed_over_as_a_copy(tmp_path):
    # The format allows a float32 tensor at an odd byte (writers pad): torch cannot view it,
    # so vLLM gets a copy of its bytes, and the copy into a parameter goes the default way.
    import numpy as np

    header = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"F32","shape":[2],"data_offsets":[1,9]}}'
    path = tmp_path / "odd.safetensors"
    data = b"\x07" + np.array([1.5, -2.0], dtype="<f4").tobytes()
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    source = _vllm_place.Source(open_handle)
    dest = torch.zeros(2)
    got = {}
    for name, w in placed_weights([str(path)], source):
        got[name] = w.tolist()
        if name == "w":
            dest.copy_(w)
    assert got == {"a": [7], "w": [1.5, -2.0]}
    assert dest.tolist() == [1.5, -2.0]
    assert source.placed == 0


def test_a_truncated_file_fails_naming_it(tmp_path):
    files = checkpoint(tmp_path)
    with open(files[1], "r+b") as f:
        f.truncate(f.seek(0, 2) - 100)
    source = _vllm_place.Source(open_handle)
    with pytest.raises(Exception, match="model-1.safetensors.*truncated"):
        Model().load_weights(placed_weights(files, source))


def test_the_collector_skips_older_objects_while_vllm_loads_and_gets_them_back(tmp_path):
    """``weightlift.vllm.place`` (what ``load_format="weightlift"`` iterates) keeps the
    objects that were there before the load out of the collector's walks while it runs (a
    full collection walks a whole vLLM engine: 0.4 s of a 2 s load), and hands them back
    when the iteration ends, runs to its end or is dropped halfway (a weight loader that
    raised)."""
    import gc

    from weightlift import vllm as wl_vllm

    files = checkpoint(tmp_path)
    before = gc.get_freeze_count()
    model = Model()
    seen = []

    def watched(weights):
        for item in weights:
            seen.append(gc.get_freeze_count())
            yield item

    model.load_weights(watched(wl_vllm.place(files, {})))
    assert seen and min(seen) > before, "older objects frozen during the load"
    assert gc.get_freeze_count() == before, "handed back at the end"
    expected = Model()
    expected.load_weights(real_weights(files))
    for name, p in model.params.items():
        assert torch.equal(p, expected.params[name]), name

    weights = wl_vllm.place(files, {})
    next(weights)
    assert gc.get_freeze_count() > before
    del weights  # a consumer that stopped halfway: the generator is closed
    assert gc.get_freeze_count() == before
