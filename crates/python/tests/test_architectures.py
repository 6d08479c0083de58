"""``from_pretrained`` under ``weightlift.patch()`` builds every parameter itself (transformers'
conversion step done by weightlift): for each architecture below, a random tiny model made and
saved (sharded) by transformers itself loads with every parameter and buffer byte-identical to
the stock load, the same logits on a fixed input, in the checkpoint's dtype and in float32;
and weightlift handles every parameter (none falls back to transformers' own conversion).
Bad checkpoints fail (or load) patched as they do stock."""

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

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
if not _transformers.known_version():
    pytest.skip(
        f"transformers {transformers.__version__} is not one whose loading weightlift implements",
        allow_module_level=True,
    )

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
# Tiny configurations of each architecture: MoE experts fused into `gate_up_proj` and
# `down_proj` (Qwen3-MoE, OLMoE, Mixtral with its renamed `block_sparse_moe.experts.*.w1/w2/w3`),
# shared experts (Qwen2-MoE, DeepSeek-V3, GLM4-MoE, ERNIE-4.5-MoE), MLA attention
# (DeepSeek-V3), a checkpoint whose attention and MLP are stored fused (HRM-Text: `gqkv_proj`
# and `gate_up_proj` cut into their parts), and a dense Llama.
ARCHS = {
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
    # its unembedding's vocabulary unpadding is a conversion of its own (left to transformers).
    "inkling2_text": dict(
        unpadded_vocab_size=120, moe_intermediate_size=32, n_routed_experts=4,
        num_experts_per_tok=2, head_dim=16, swa_num_attention_heads=4,
        swa_num_key_value_heads=2, swa_head_dim=16,
    ),
}
# Parameters each architecture leaves to transformers' own conversion (none unless listed).
STOCK = {"inkling2_text": 1}
INPUT = torch.tensor([[3, 17, 42, 99, 5, 64, 1, 77]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    out = {}
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for name, kw in ARCHS.items():
        if name not in CONFIG_MAPPING:
            continue  # newer than this transformers
        config = AutoConfig.for_model(name, **{**BASE, **kw})
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        path = root / name
        model.save_pretrained(path, max_shard_size="100KB")
        assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) >= 2, name
        out[name] = path
    return out


class Fallbacks(logging.Handler):
    """Counts the parameters weightlift left to transformers, from its debug log."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def same_bytes(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8)
    )


def assert_same_model(stock, patched):
    s, p = stock.state_dict(), patched.state_dict()
    assert list(s) == list(p)
    differ = [k for k in s if not same_bytes(s[k], p[k])]
    assert not differ, f"differ from stock: {differ[:5]}"
    for (n1, b1), (n2, b2) in zip(stock.named_buffers(), patched.named_buffers()):
        assert n1 == n2 and same_bytes(b1, b2), n1
    with torch.no_grad():
        assert torch.equal(stock(INPUT).logits, patched(INPUT).logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_every_parameter_is_the_stock_loads(saved, name, dtype):
    if name not in saved:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    path = saved[name]
    stock = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    log = logging.getLogger("weightlift.transformers")
    handler = Fallbacks()
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.DEBUG)
    try:
        with weightlift.patch():
            patched = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert_same_model(stock, patched)
    done = [line for line in handler.lines if "parameters: planned" in line]
    assert done, f"weightlift did not load {name}: {handler.lines}"
    assert f"; {STOCK.get(name, 0)} by transformers" in done[-1], done[-1]


def test_other_device_maps_go_to_transformers(saved):
    pytest.importorskip("accelerate")  # transformers needs it for device maps
    path = saved["qwen3_moe"]
    stock = AutoModelForCausalLM.from_pretrained(path, device_map="meta")
    with weightlift.patch():
        patched = AutoModelForCausalLM.from_pretrained(path, device_map="meta")
    s, p = stock.state_dict(), patched.state_dict()
    assert {k: (v.shape, v.dtype, v.device.type) for k, v in s.items()} == {
        k: (v.shape, v.dtype, v.device.type) for k, v in p.items()
    }


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
