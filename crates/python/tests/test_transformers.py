"""transformers' ``from_pretrained`` through ``weightlift.patch()``: random tiny models made
and saved by transformers itself (sharded), loaded stock and patched; every parameter must be
byte-identical and the logits identical; model ids resolve in a Hugging Face cache laid out
as huggingface_hub lays it out; bad checkpoints fail the way they fail stock."""

import gc
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig  # noqa: E402

import weightlift  # noqa: E402
from weightlift import _handle  # noqa: E402

transformers.utils.logging.set_verbosity_error()
warnings.filterwarnings("ignore")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    moe = Qwen3MoeConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=24,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=64,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    llama = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    out = {}
    for name, config, shard in (("moe", moe, "400KB"), ("llama", llama, "100KB")):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(root / name, max_shard_size=shard)
        out[name] = root / name
    return out


def tensors_in(path):
    from safetensors import safe_open

    n = 0
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as h:
                n += len(h.keys())
    return n


def raw(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(raw(sa[k]), raw(sb[k])), k
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)


@pytest.mark.parametrize("name", ["moe", "llama"])
def test_patched_from_pretrained_equals_stock(models, name, monkeypatch):
    path = models[name]
    shards = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    assert len(shards) >= 3, shards
    if name == "moe":
        assert tensors_in(path) >= 4800
    stock = AutoModelForCausalLM.from_pretrained(path)
    opened, frozen = [], []
    real = _handle.open_handle

    def watched(*a, **k):
        opened.append(a[0])
        if str(a[0]).endswith(".safetensors"):
            frozen.append(gc.get_freeze_count())
        return real(*a, **k)

    monkeypatch.setattr(_handle, "open_handle", watched)
    before = gc.get_freeze_count()
    with weightlift.patch():
        patched = AutoModelForCausalLM.from_pretrained(path)
    # The shards (each by its safe_open), and the directory (the early read; see below).
    files = sorted(os.path.basename(p) for p in opened if str(p).endswith(".safetensors"))
    assert files == sorted(shards), "weightlift opened the shards"
    assert_same_model(stock, patched)
    # The objects older than the call were kept out of the collector's walks while it
    # opened the shards (see weightlift._gc), and handed back.
    assert min(frozen) > before and gc.get_freeze_count() == before


def test_patch_replaces_every_imported_name_and_unpatch_restores_them(tmp_path, monkeypatch):
    import safetensors
    import safetensors.numpy
    import safetensors.torch
    import transformers.modeling_utils as mu

    originals = {
        "safe_open": safetensors.safe_open,
        "torch.load_file": safetensors.torch.load_file,
        "torch.load": safetensors.torch.load,
        "numpy.load_file": safetensors.numpy.load_file,
        "mu.safe_open": mu.safe_open,
        "mu._safe_load_bytes": mu._safe_load_bytes,
    }
    current = lambda: {  # noqa: E731
        "safe_open": safetensors.safe_open,
        "torch.load_file": safetensors.torch.load_file,
        "torch.load": safetensors.torch.load,
        "numpy.load_file": safetensors.numpy.load_file,
        "mu.safe_open": mu.safe_open,
        "mu._safe_load_bytes": mu._safe_load_bytes,
    }
    # A module imported while patched takes weightlift's names from safetensors itself.
    (tmp_path / "late_importer.py").write_text("from safetensors.torch import load_file\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    weightlift.patch()
    weightlift.patch()  # idempotent
    try:
        assert weightlift.patched()
        assert all(current()[k] is not originals[k] for k in originals), current()
        import late_importer

        assert late_importer.load_file is safetensors.torch.load_file
    finally:
        weightlift.unpatch()
        weightlift.unpatch()
    assert not weightlift.patched()
    assert current() == originals
    assert late_importer.load_file is originals["torch.load_file"]
    # As a context manager, it leaves the state it found.
    with weightlift.patch():
        with weightlift.patch():
            pass
        assert weightlift.patched()
    assert not weightlift.patched()


def test_patch_is_thread_safe():
    errors = []

    def churn():
        try:
            for _ in range(50):
                with weightlift.patch():
                    import safetensors

                    assert safetensors.safe_open is not None
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=churn) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    weightlift.unpatch()
    assert not errors
    import safetensors
    import safetensors._safetensors_rust as native

    assert safetensors.safe_open is native.safe_open


def lay_out_cache(cache, repo, source):
    """A Hugging Face cache entry as huggingface_hub writes one: content-addressed blobs,
    a snapshot of relative symlinks, refs/main naming the commit."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (folder / "blobs").mkdir()
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    for f in os.listdir(source):
        data = (source / f).read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (folder / "blobs" / blob).write_bytes(data)
        os.symlink(f"../../blobs/{blob}", snapshot / f)
    return snapshot


def test_model_ids_resolve_in_the_hugging_face_cache(models, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    lay_out_cache(cache, "org/tiny-llama", models["llama"])
    # weightlift reads the cache's place from the environment when it opens a model id;
    # transformers (huggingface_hub) read theirs at import, so they are told explicitly.
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    offline = {"cache_dir": str(cache), "local_files_only": True}
    direct = weightlift.load_checkpoint("org/tiny-llama", framework="pt")
    files = weightlift.load_checkpoint(str(models["llama"]), framework="pt", copy=True)
    assert list(direct) == list(files)
    for k in files:
        assert torch.equal(raw(direct[k]), raw(files[k])), k
    stock = AutoModelForCausalLM.from_pretrained("org/tiny-llama", **offline)
    with weightlift.patch():
        patched = AutoModelForCausalLM.from_pretrained("org/tiny-llama", **offline)
    assert_same_model(stock, patched)
    with pytest.raises(FileNotFoundError, match="Hugging Face cache"):
        weightlift.load_checkpoint("org/not-there")


def outcome(path, patched):
    try:
        if patched:
            with weightlift.patch():
                AutoModelForCausalLM.from_pretrained(path)
        else:
            AutoModelForCausalLM.from_pretrained(path)
        return None
    except Exception as e:  # noqa: BLE001
        return e


def test_bad_checkpoints_fail_as_they_fail_stock(models, tmp_path):
    import safetensors

    source = models["llama"]
    shards = sorted(f for f in os.listdir(source) if f.endswith(".safetensors"))

    def variant(name, mutate):
        path = tmp_path / name
        shutil.copytree(source, path)
        mutate(path)
        return path

    def truncate(p):
        f = p / shards[1]
        os.truncate(f, f.stat().st_size - 100)

    def drop_shard(p):
        os.remove(p / shards[-1])

    def wrong_shapes(p):
        config = json.loads((p / "config.json").read_text())
        config["intermediate_size"] = 96
        (p / "config.json").write_text(json.dumps(config))

    cases = [("truncated", truncate), ("missing_shard", drop_shard), ("wrong_shapes", wrong_shapes)]
    for name, mutate in cases:
        path = variant(name, mutate)
        stock, ours = outcome(path, False), outcome(path, True)
        assert stock is not None and ours is not None, name
        assert isinstance(ours, type(stock)), (name, stock, ours)
        if name == "truncated":
            assert isinstance(ours, safetensors.SafetensorError)
            assert shards[1] in str(ours) and "truncated" in str(ours), ours
        if name == "missing_shard":
            assert shards[-1] in str(ours)


def test_device_maps_that_put_every_parameter_on_one_device():
    """The patched conversion step places parameters itself where the device map puts all of
    them on the CPU or on one GPU (on a GPU through pinned staging buffers); other maps go to
    transformers."""
    from types import SimpleNamespace

    from weightlift._transformers import _one_device

    def one(device_map):
        return _one_device(SimpleNamespace(device_map=device_map), torch)

    assert one(None) == "cpu"
    assert one({"": "cpu"}) == "cpu"
    assert one({"": torch.device("cpu")}) == "cpu"
    assert one({"": 0}) == "cuda:0"
    assert one({"": "cuda:1"}) == "cuda:1"
    assert one({"model": torch.device("cuda", 2), "lm_head": 2}) == "cuda:2"
    assert one({"model": 0, "lm_head": 1}) is None
    assert one({"model": 0, "lm_head": "cpu"}) is None
    assert one({"": "disk"}) is None
    assert one({"": "meta"}) is None


def test_from_pretrained_reads_the_files_while_the_model_is_built(models, tmp_path):
    """Under the patch, ``from_pretrained`` starts reading the checkpoint's files into the
    page cache when it is called (transformers opens them only after building the model),
    also when transformers is imported after ``patch()``; ``unpatch()`` takes it back."""
    script = f"""
import logging, os, sys
import weightlift
weightlift.patch()
assert "transformers" not in sys.modules
lines = []
class H(logging.Handler):
    def emit(self, r):
        lines.append(r.getMessage())
log = logging.getLogger("weightlift.transformers")
log.addHandler(H())
log.setLevel(logging.DEBUG)
from transformers import AutoModelForCausalLM
from transformers.modeling_utils import PreTrainedModel
assert hasattr(PreTrainedModel.from_pretrained.__func__, "_weightlift_original")
path = {str(models["llama"])!r}
for f in os.listdir(path):
    fd = os.open(os.path.join(path, f), os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
model = AutoModelForCausalLM.from_pretrained(path)
import time
early = [l for l in lines if "early read of" in l]
assert early, lines
assert any("parameters: planned" in l for l in lines), lines
weightlift.unpatch()
assert not hasattr(PreTrainedModel.from_pretrained.__func__, "_weightlift_original")
print("ok", early[0])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stdout + out.stderr[-3000:]


def file_backed(tensor):
    """The files (paths) whose private mappings hold part of `tensor`'s bytes, from
    /proc/self/maps."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    found = set()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo < end and start < hi and len(parts) == 6 and parts[5].strip().startswith("/"):
                found.add(parts[5].strip())
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_fused_experts_are_assembled_from_the_files_pages(tmp_path, monkeypatch):
    """A layer's experts stacked into one parameter are made of the files' own pages (each
    expert's whole pages mapped privately where it goes, the pages two experts share
    copied), not copied into fresh memory: byte-identical to stock, writable without the
    file changing, and filled the ordinary way where assembling is not possible."""
    torch.manual_seed(0)
    # Experts of 64 x 576 bf16 (18 pages): large enough to map; shards of 1 MB cut layers
    # across files (pieces of one parameter in two files, in two phases).
    config = Qwen3MoeConfig(
        vocab_size=256,
        hidden_size=576,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(
        tmp_path, max_shard_size="1MB"
    )
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert len(files) >= 3, files
    digest = lambda: [hashlib.sha256((tmp_path / f).read_bytes()).hexdigest() for f in files]  # noqa: E731
    before = digest()
    stock = AutoModelForCausalLM.from_pretrained(tmp_path)

    lines = []
    handler = logging.Handler()
    handler.emit = lambda r: lines.append(r.getMessage())
    log = logging.getLogger("weightlift.transformers")
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.DEBUG)  # (setLevel, not the attribute: it clears logging's cache)
    try:
        with weightlift.patch():
            patched = AutoModelForCausalLM.from_pretrained(tmp_path)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert_same_model(stock, patched)
    summary = [l for l in lines if "assembled:" in l]
    assert summary, lines
    mapped = int(summary[0].split(" bytes mapped")[0].rsplit(" ", 1)[1])
    assert mapped > 0, summary
    experts = {n: p for n, p in patched.named_parameters() if ".experts." in n}
    assert experts
    for name, p in experts.items():
        held = file_backed(p)
        assert held and all(h.endswith(".safetensors") for h in held), (name, held)
    # Writes go to private copies of the pages.
    with torch.no_grad():
        for p in experts.values():
            p.add_(1)
    assert digest() == before
    assert not torch.equal(raw(next(iter(experts.values()))), raw(dict(stock.named_parameters())[next(iter(experts))]))
    del patched

    # Where nothing can be assembled, the same parameters, filled.
    from weightlift import _native

    monkeypatch.setattr(_native, "assemble", lambda jobs: ([None] * len(jobs), 0, 0))
    with weightlift.patch():
        filled = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert_same_model(stock, filled)
    assert all(not file_backed(p) for n, p in filled.named_parameters() if ".experts." in n)
