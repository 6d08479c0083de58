"""``from_pretrained`` under ``weightlift.patch()`` builds every parameter itself (transformers'
conversion step done by weightlift), on whatever transformers is installed.

The architectures are the installed release's own: every causal-LM model type that has an
entry in its checkpoint conversion mapping (``conversion_types``), so a type a new release
adds is tested the day CI installs it. Each is made tiny (``tiny_config``: the release's
default configuration with its sizes shrunk, a few types with settings of their own in
``OVERRIDES``), built with random weights and saved sharded by transformers itself, then
loaded stock and patched: every parameter and buffer byte-identical, and weightlift handles
every parameter, except those whose conversion uses an operation it does not implement
(listed, with the operation). A type that cannot be built tiny is reported with the reason
(the terminal summary lists them), never skipped silently. A few types (``CLASSIC``) are also
loaded in float32 (converted while read) and compared by their logits.
Bad checkpoints fail (or load) patched as they do stock; a transformers that lacks an internal
the adapter relies on gets the plain patch, with the same parameters and the reason logged."""

import json
import logging
import os
import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import weightlift  # noqa: E402
from weightlift import _transformers  # noqa: E402

_patch = __import__("importlib").import_module("weightlift.patch")

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# Sizes a tiny model takes where its configuration has them.
SIZES = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    kv_lora_rank=16,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
)
# Expert counts (at most 4) and experts per token (at most 2), by their many names.
EXPERTS = (
    "num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts", "n_experts",
    "num_routed_experts",
)
PER_TOKEN = ("num_experts_per_tok", "moe_k", "top_k", "moe_topk", "num_experts_per_token")
LAYERS = 2
# Types made from settings of their own instead (on top of `BASE`): where the generic
# shrinking cannot make them tiny, and the ones also compared by their logits, whose forward
# pass needs consistent sizes (MLA attention's rotary dimensions, say).
BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
OVERRIDES = {
    "llama": dict(),
    "qwen3_moe": dict(moe_intermediate_size=32, num_experts=6, num_experts_per_tok=2, head_dim=16),
    "qwen2_moe": dict(
        moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=6,
        num_experts_per_tok=2,
    ),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(num_experts=6, num_experts_per_tok=2),
    "deepseek_v3": dict(
        moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
        first_k_dense_replace=1, n_group=2, topk_group=1,
    ),
    "glm4_moe": dict(
        moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=1, n_group=2, topk_group=1, head_dim=16,
    ),
    "ernie4_5_moe": dict(
        moe_intermediate_size=32, moe_num_experts=6, moe_num_shared_experts=1, moe_k=2
    ),
    "hrm_text": dict(),
    # Experts' gate and up rows interleaved in the file (`w13_weight`, `Interleave(dim=1)`);
    # its unembedding's vocabulary unpadding is a conversion of its own.
    "inkling2_text": dict(
        unpadded_vocab_size=120, moe_intermediate_size=32, n_routed_experts=4,
        num_experts_per_tok=2, head_dim=16, swa_num_attention_heads=4,
        swa_num_key_value_heads=2, swa_head_dim=16,
    ),
    "inkling2_loop_text": dict(
        unpadded_vocab_size=120, moe_intermediate_size=32, n_routed_experts=4,
        num_experts_per_tok=2, head_dim=16, swa_num_attention_heads=4,
        swa_num_key_value_heads=2, swa_head_dim=16,
    ),
}
# Also loaded in float32 (every tensor converted while read), logits compared.
CLASSIC = tuple(OVERRIDES)
# The conversion operations the adapter implements (a parameter converted by a sequence of
# them that it does not implement is left to transformers, and said so).
IMPLEMENTED = {"MergeModulelist", "Concatenate", "Chunk", "Split", "Interleave"}
INPUT = torch.tensor([[3, 17, 42, 99, 5, 64, 1, 77]])


def conversion_types():
    """The installed transformers' causal-LM model types with a checkpoint conversion
    mapping (plus a dense Llama, which has none). Fails, rather than testing nothing, where
    transformers no longer has the internals this reads."""
    from transformers import conversion_mapping
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    build = conversion_mapping._build_checkpoint_conversion_mapping
    return ["llama"] + sorted(t for t in build() if t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


TYPES = conversion_types()


def shrink(config):
    """`config` with its sizes made tiny (in place, sub-configurations too)."""
    d = config.to_dict()
    layers = getattr(config, "num_hidden_layers", None)
    for k, v in SIZES.items():
        if isinstance(d.get(k), int) and not isinstance(d[k], bool):
            setattr(config, k, v)
    for k, v in d.items():
        # Token ids past the tiny vocabulary.
        if k.endswith(("token_id", "token_ids", "_index")):
            if isinstance(v, int) and not isinstance(v, bool) and v >= SIZES["vocab_size"]:
                setattr(config, k, 1)
            elif isinstance(v, list) and any(isinstance(x, int) and x >= 128 for x in v):
                setattr(config, k, [1])
    for k in EXPERTS:
        if isinstance(d.get(k), int) and d[k] > 4:
            setattr(config, k, 4)
    for k in PER_TOKEN:
        if isinstance(d.get(k), int) and d[k] > 2:
            setattr(config, k, 2)
    if isinstance(layers, int) and layers > LAYERS:
        config.num_hidden_layers = LAYERS
        # Per-layer lists (layer types, sliding windows) cut to the layers kept.
        for k, v in d.items():
            if isinstance(v, list) and len(v) == layers:
                setattr(config, k, v[:LAYERS])
    for k in d:
        sub = getattr(config, k, None)
        if isinstance(sub, transformers.PretrainedConfig):
            shrink(sub)
    return config


def tiny_config(model_type):
    if model_type in OVERRIDES:
        return AutoConfig.for_model(model_type, **{**BASE, **OVERRIDES[model_type]})
    return shrink(AutoConfig.for_model(model_type))


# Per type: what happened (for the terminal summary; see conftest.py).
REPORT = {}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("archs")


def saved_model(root, name):
    """A tiny random `name` saved sharded by transformers (made once per session), or
    pytest.skip with the reason it cannot be built tiny."""
    path = root / name
    if (path / "config.json").exists():
        return path
    why = REPORT.get(name, "")
    if why.startswith("cannot"):
        pytest.skip(why)
    try:
        config = tiny_config(name)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(path, max_shard_size="100KB")
        AutoConfig.from_pretrained(path)
        # The saved configuration must be one AutoModelForCausalLM loads (some types' text
        # part saves a configuration of its own that it does not).
        AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(path))]
    except Exception as e:  # noqa: BLE001 (any failure to build is reported, with its reason)
        shutil.rmtree(path, ignore_errors=True)
        REPORT[name] = f"cannot be built tiny on the CPU: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        pytest.skip(REPORT[name])
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) >= 2, name
    return path


@pytest.fixture(scope="module")
def saved(root):
    """Lazily made models by type (for the tests of one architecture)."""

    class Saved(dict):
        def __missing__(self, name):
            self[name] = saved_model(root, name)
            return self[name]

    return Saved()


class Lines(logging.Handler):
    """The lines of the ``weightlift.transformers`` logger, from DEBUG up."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


class logged:
    """Collects the ``weightlift.transformers`` logger's lines within a ``with`` block."""

    def __enter__(self):
        self.log = logging.getLogger("weightlift.transformers")
        self.handler = Lines()
        self.level = self.log.level
        self.log.addHandler(self.handler)
        self.log.setLevel(logging.DEBUG)
        return self.handler.lines

    def __exit__(self, *exc):
        self.log.removeHandler(self.handler)
        self.log.setLevel(self.level)
        return False


def same_bytes(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8)
    )


def assert_same_model(stock, patched, logits=False):
    s, p = stock.state_dict(), patched.state_dict()
    assert list(s) == list(p)
    differ = [k for k in s if not same_bytes(s[k], p[k])]
    assert not differ, f"differ from stock: {differ[:5]}"
    for (n1, b1), (n2, b2) in zip(stock.named_buffers(), patched.named_buffers()):
        assert n1 == n2 and same_bytes(b1, b2), n1
    if logits:
        with torch.no_grad():
            assert torch.equal(stock(INPUT).logits, patched(INPUT).logits)


def load(path, dtype):
    # Hub kernels (on by default where the `kernels` package is installed) are not what is
    # compared here.
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_kernels=False)


def left_to_transformers(lines):
    """{parameter: reason} of what weightlift left to transformers' conversion."""
    out = {}
    for line in lines:
        if "transformers' own conversion for " in line:
            key, _, why = line.partition("transformers' own conversion for ")[2].partition(": ")
            out[key] = why
    return out


def unimplemented(why):
    """Whether `why` (a reason logged for a parameter) is a sequence of conversion
    operations the adapter does not implement."""
    if not why.startswith("conversion operations "):
        return False
    ops = {o.strip(" '[]") for o in why.removeprefix("conversion operations ").split(",")}
    return bool(ops - IMPLEMENTED) or len(ops) > 1


@pytest.mark.parametrize("name", TYPES)
def test_every_parameter_is_the_stock_loads(saved, name):
    path = saved[name]
    stock = load(path, torch.bfloat16)
    with logged() as lines:
        with weightlift.patch():
            patched = load(path, torch.bfloat16)
    assert_same_model(stock, patched, logits=name in CLASSIC)
    done = [line for line in lines if "parameters: planned" in line]
    assert done, f"weightlift did not load {name}: {lines}"
    left = left_to_transformers(lines)
    handled = {k: v for k, v in left.items() if not unimplemented(v)}
    assert not handled, f"left to transformers though its operations are implemented: {handled}"
    count = done[-1].rsplit("; ", 1)[-1].split(" by transformers")[0]
    assert count == str(len(left)), (done[-1], left)
    ops = sorted({v.removeprefix("conversion operations ").strip("[]").replace("'", "") for v in left.values()})
    REPORT[name] = (
        f"{len(left)} by transformers ({'; '.join(ops)})" if left else "all by weightlift"
    )


@pytest.mark.parametrize("name", [n for n in CLASSIC if n in TYPES])
def test_converted_to_float32_as_stock(saved, name):
    path = saved[name]
    stock = load(path, torch.float32)
    with weightlift.patch():
        patched = load(path, torch.float32)
    assert_same_model(stock, patched, logits=True)


def test_other_device_maps_go_to_transformers(saved):
    pytest.importorskip("accelerate")  # transformers needs it for device maps
    path = saved["qwen3_moe"]
    # (Hub kernels, on by default where the `kernels` package is installed, refuse "meta".)
    stock = AutoModelForCausalLM.from_pretrained(path, device_map="meta", use_kernels=False)
    with weightlift.patch():
        patched = AutoModelForCausalLM.from_pretrained(path, device_map="meta", use_kernels=False)
    s, p = stock.state_dict(), patched.state_dict()
    assert {k: (v.shape, v.dtype, v.device.type) for k, v in s.items()} == {
        k: (v.shape, v.dtype, v.device.type) for k, v in p.items()
    }


class Hiding:
    """A module seen without one of its attributes."""

    def __init__(self, module, hidden):
        self._module, self._hidden = module, hidden

    def __getattr__(self, name):
        if name == self._hidden:
            raise AttributeError(name)
        return getattr(self._module, name)


@pytest.mark.parametrize(
    "internal", ["Concatenate", "rename_source_key", "set_param_for_module", "LoadStateDictInfo"]
)
def test_a_missing_internal_gets_the_plain_patch(saved, monkeypatch, internal):
    """A transformers without one internal the adapter relies on: the conversion step stays
    transformers' own, the parameters are the same, and one INFO line names the internal.
    (The check runs on the module seen without the internal; transformers' own loop keeps
    it, as a release that dropped it would have code of its own instead.)"""
    from transformers import core_model_loading as cml

    path = saved["qwen3_moe"]
    stock = load(path, torch.bfloat16)
    problem = _transformers.surface_problem(Hiding(cml, internal))
    assert problem == f"{internal} missing", problem
    monkeypatch.setattr(_transformers, "_checked", {cml: problem})
    monkeypatch.setattr(_patch, "_told", set())
    with logged() as lines:
        with weightlift.patch():
            patched = load(path, torch.bfloat16)
            load(path, torch.bfloat16)
    assert_same_model(stock, patched)
    infos = [line for line in lines if "conversion step stays its own" in line]
    assert len(infos) == 1 and internal in infos[0], lines
    assert not any("parameters: planned" in line for line in lines), lines


def test_a_changed_signature_gets_the_plain_patch(monkeypatch):
    from transformers import core_model_loading as cml

    def rename_source_key(key, renamings, converters, prefix=None):  # another signature
        raise AssertionError("not called")

    monkeypatch.setattr(cml, "rename_source_key", rename_source_key)
    monkeypatch.setattr(_transformers, "_checked", {})
    problem = _transformers.surface_problem(cml)
    assert problem.startswith("rename_source_key takes"), problem


def test_conversion_false_is_the_plain_patch(saved):
    path = saved["qwen3_moe"]
    stock = load(path, torch.bfloat16)
    with logged() as lines:
        with weightlift.patch(conversion=False):
            patched = load(path, torch.bfloat16)
    assert_same_model(stock, patched)
    assert not any("parameters: planned" in line for line in lines), lines
    from transformers import core_model_loading as cml

    assert not hasattr(cml.convert_and_load_state_dict_in_model, "_weightlift_original")


def outcome(load):
    try:
        return "loaded", load()
    except Exception as e:  # noqa: BLE001 (compared by type)
        return type(e).__name__, e


def broken_copy(saved, tmp_path, how):
    """A copy of the Qwen3-MoE checkpoint broken `how`."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / how
    shutil.copytree(saved["qwen3_moe"], path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    expert = "model.layers.1.mlp.experts.2.up_proj.weight"
    file = path / index["weight_map"][expert]
    if how == "truncated":
        with open(file, "r+b") as f:
            f.truncate(os.path.getsize(file) - 100)
    elif how == "missing-expert":
        tensors = load_file(file)
        del tensors[expert]
        save_file(tensors, file, metadata={"format": "pt"})
        del index["weight_map"][expert]
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    elif how == "wrong-shape":
        tensors = load_file(file)
        tensors[expert] = tensors[expert][:, :-8].contiguous()
        save_file(tensors, file, metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("how", ["truncated", "missing-expert", "wrong-shape"])
def test_bad_checkpoints_fail_or_load_as_stock(saved, tmp_path, how):
    path = broken_copy(saved, tmp_path, how)
    stock = outcome(lambda: AutoModelForCausalLM.from_pretrained(path))
    with weightlift.patch():
        patched = outcome(lambda: AutoModelForCausalLM.from_pretrained(path))
    assert stock[0] == patched[0], (how, stock, patched)
    if stock[0] == "loaded":
        assert_same_model(stock[1], patched[1])
