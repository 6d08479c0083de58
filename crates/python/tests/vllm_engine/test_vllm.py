"""vLLM's real engine on the CPU with ``load_format="weightlift"`` (the loader weightlift
registers through vLLM's plugin entry point): greedy tokens identical to the default loader's
on tiny random models saved by transformers (Qwen3, whose vLLM class fuses qkv and gate/up;
Qwen3-MoE and Mixtral, whose experts vLLM fuses; a float32 checkpoint loaded as bfloat16), in
one process and in vLLM's default multi-process mode, with the parameters placed straight
from the files (the default: the experts counted as placed, not copied by weight loaders),
with a tensor forced the default way, and with ``place=False``; a truncated shard
(weightlift's error, from vLLM's worker process) and a missing shard (vLLM's check of the
index) fail engine start naming the file, not a hang.

Runs where vLLM is installed (``.ci/run`` makes a virtualenv with vLLM's CPU build); skipped
elsewhere."""

import json
import os
import shutil
import subprocess
import sys

import pytest

vllm = pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

HERE = os.path.dirname(os.path.abspath(__file__))
# The engine's worker, shared with `cargo xtask bench-vllm`.
WORKER = os.path.join(HERE, "..", "..", "tools", "vllm_worker.py")
DEADLINE = 900


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3Config, Qwen3MoeConfig

    root = tmp_path_factory.mktemp("vllm-models")
    base = dict(
        vocab_size=256, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=128,
    )
    out = {}
    for name, config in {
        "dense": Qwen3Config(**base),
        "moe": Qwen3MoeConfig(**base, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2),
        "mixtral": MixtralConfig(**base, num_local_experts=4, num_experts_per_tok=2),
        "dense32": Qwen3Config(**base),
    }.items():
        torch.manual_seed(0)
        dtype = torch.float32 if name.endswith("32") else torch.bfloat16
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        path = root / name
        model.save_pretrained(path, max_shard_size="150KB")
        assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) >= 2
        out[name] = str(path)
    return out


def engine(runs, one_process=True, extra=None, env=None):
    """Results of `runs` ((model, load format)...) in one worker process (`env`: more of its
    environment, e.g. the worker's test hooks)."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="2", **(env or {}))
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if one_process else "1"
    if extra:
        env["WL_EXTRA"] = json.dumps(extra)
    out = subprocess.run(
        [sys.executable, WORKER, *[f"{m}={f}" for m, f in runs]],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=env,
    )
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"model"')]
    assert len(results) == len(runs), out.stdout[-3000:] + out.stderr[-5000:]
    for r in results:
        r["log"] = out.stdout + out.stderr
    return results


MODELS = ["dense", "moe", "mixtral", "dense32"]


@pytest.fixture(scope="module")
def one_process(models):
    runs = [(models[m], f) for m in MODELS for f in ("auto", "weightlift")]
    return {(os.path.basename(m), f): r for (m, f), r in zip(runs, engine(runs, env={"WL_LOG": "1"}))}


def placed(result, assembled=False):
    """(copies placed, tensors that went the default way) from weightlift's summary line;
    with `assembled`, also the parameters assembled from the files' pages."""
    import re

    found = re.findall(
        r"weightlift: (\d+) copies into vLLM's parameters placed straight from \d+ files "
        r"\((\d+) parameters assembled from the files' pages\), "
        r"(\d+) tensors went vLLM's default way",
        result["log"],
    )
    assert found, result["log"][-3000:]
    copies, fused, defaults = (int(n) for n in found[-1])
    return (copies, defaults, fused) if assembled else (copies, defaults)


@pytest.mark.parametrize("name", MODELS)
def test_same_tokens_as_the_default_loader_in_one_process(one_process, name):
    auto, ours = one_process[(name, "auto")], one_process[(name, "weightlift")]
    assert "error" not in auto, auto
    assert "error" not in ours, ours
    assert ours["tokens"] == auto["tokens"] and len(ours["tokens"]) == 8
    assert ours["secs"] is not None, "vLLM logged the weight-loading time"


def in_page_cache(model):
    """Reads every file of `model` (a warm start's premise: the loader assembles parameters
    from the files' pages only where every file is in the page cache). Needed right before the
    start: hosts that reclaim memory proactively take out pages nothing touched for a while
    (this VM's DAMON `pageout` scheme: a minute without access), and the files were last read
    several engine starts ago."""
    for name in sorted(os.listdir(model)):
        with open(os.path.join(model, name), "rb") as f:
            while f.read(16 << 20):
                pass
    return model


def test_the_experts_are_placed_not_copied_by_weight_loaders(models):
    """Every checkpoint tensor's copy into its parameter is a placement: each expert's three
    projections into the fused expert tensors, q/k/v and gate/up into their fused parameters;
    none goes the default way."""
    (ours,) = engine([(in_page_cache(models["moe"]), "weightlift")], env={"WL_LOG": "1"})
    assert "error" not in ours, ours
    copies, defaults, fused = placed(ours, assembled=True)
    # 2 layers x 8 experts x 3 projections, and more (attention, norms, embeddings).
    assert copies >= 2 * 8 * 3 and defaults == 0, (copies, defaults)
    # Made of whole checkpoint tensors side by side, so assembled from the files' pages:
    # per layer the fused experts (w13: gate and up; w2: down) and qkv.
    assert fused >= 2 * 3, fused
    (mixtral,) = engine([(in_page_cache(models["mixtral"]), "weightlift")], env={"WL_LOG": "1"})
    copies, defaults, fused = placed(mixtral, assembled=True)
    assert copies >= 2 * 4 * 3 and defaults == 0, (copies, defaults)
    assert fused >= 2 * 3, fused


def test_a_cold_start_reads_the_files_while_vllm_builds_the_model(tmp_path):
    """Cold (every file evicted): the files are read into the page cache from before vLLM
    builds the model (the early read), each file's loads wait until it is through with the
    file, and the parameters made of whole tensors are assembled from the pages it brought
    in; the same tokens as the default loader's, cold too. (Shards of 15 MB: opening a file
    reads its header with the disk's readahead, 8 MiB on this VM, and a file mostly in the
    page cache is not read early.)"""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=256, hidden_size=512, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=128, max_position_embeddings=128,
        moe_intermediate_size=512, num_experts=8, num_experts_per_tok=2,
    )
    model = str(tmp_path / "moe")
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(
        model, max_shard_size="15MB"
    )
    assert len([n for n in os.listdir(model) if n.endswith(".safetensors")]) >= 2
    # Both starts in one process, each cold (the worker evicts the files first).
    auto, ours = engine(
        [(model, "auto"), (model, "weightlift")], env={"WL_LOG": "1", "WL_COLD": "1"}
    )
    assert "error" not in ours, ours
    assert ours["tokens"] == auto["tokens"]
    assert f"early read of {model}: started" in ours["log"], ours["log"][-3000:]
    copies, defaults, fused = placed(ours, assembled=True)
    assert defaults == 0 and fused >= 2 * 3, (copies, defaults, fused)
    assert ours["model_s"] is not None and ours["model_s"] >= ours["secs"]


def test_a_tensor_forced_the_default_way_still_loads(models, one_process):
    (ours,) = engine(
        [(models["moe"], "weightlift")],
        env={"WL_LOG": "1", "WL_FORCE_DEFAULT": "layers.1.mlp.experts.3."},
    )
    assert "error" not in ours, ours
    assert ours["tokens"] == one_process[("moe", "auto")]["tokens"]
    copies, defaults = placed(ours)
    assert defaults == 3 and copies > 0, (copies, defaults)
    assert "layers.1.mlp.experts.3.down_proj.weight goes vLLM's default way" in ours["log"]


def test_unplaced_loads_still_work(models, one_process):
    (ours,) = engine([(models["moe"], "weightlift")], extra={"place": False})
    assert "error" not in ours, ours
    assert ours["tokens"] == one_process[("moe", "auto")]["tokens"]


def test_placed_without_assembly_still_works(models, one_process):
    (ours,) = engine([(models["moe"], "weightlift")], extra={"assemble": False}, env={"WL_LOG": "1"})
    assert "error" not in ours, ours
    assert ours["tokens"] == one_process[("moe", "auto")]["tokens"]
    copies, defaults, fused = placed(ours, assembled=True)
    assert copies > 0 and defaults == 0 and fused == 0, (copies, defaults, fused)


def test_same_tokens_in_the_default_multi_process_mode(models, one_process):
    (ours,) = engine([(models["moe"], "weightlift")], one_process=False)
    assert "error" not in ours, ours
    assert ours["tokens"] == one_process[("moe", "auto")]["tokens"]


def test_options_pass_through_model_loader_extra_config(models, one_process):
    extra = {
        "copy": True,
        "memory_budget": "1GiB",
        "prefetch_window": "1MiB",
        "drop_cache": True,
        "threads": 1,
    }
    (ours,) = engine([(models["moe"], "weightlift")], extra=extra)
    assert "error" not in ours, ours
    assert ours["tokens"] == one_process[("moe", "auto")]["tokens"]


def test_the_memory_budget_option_bounds_the_loads(models):
    """vLLM's ``memory_budget`` is the budget the files' loads run under: a copying load that
    needs more refuses before reading, and the engine start fails saying so. (Placed loads
    read into the parameters themselves and hold no more than their staging.)"""
    (ours,) = engine(
        [(models["moe"], "weightlift")],
        extra={"copy": True, "memory_budget": "4KiB", "place": False},
    )
    assert "error" in ours, ours
    text = ours["error"] + ours["log"]
    assert "more than its budget of 4.00 KiB" in text, ours["error"]


def broken(models, tmp_path, how):
    path = tmp_path / how
    shutil.copytree(models["moe"], path)
    shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    victim = path / shards[1]
    if how == "truncated":
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    else:
        victim.unlink()
    return str(path), shards[1]


@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_a_broken_checkpoint_fails_engine_start_with_weightlifts_error(models, tmp_path, how):
    path, shard = broken(models, tmp_path, how)
    # The truncated shard in vLLM's processes (the engine's worker fails, the caller hears of
    # it), the missing one in the caller's.
    (ours,) = engine([(path, "weightlift")], one_process=(how == "missing"))
    assert "error" in ours, ours
    # A message naming the shard, in the error or the workers' log: weightlift's for the
    # truncated one; for the missing one the check vLLM makes of the index while it lists the
    # files (before any loader reads) comes first.
    assert shard in ours["error"] or shard in ours["log"], ours["error"]
    words = ["truncated"] if how == "truncated" else ["No such file", "missing"]
    assert any(w in ours["error"] or w in ours["log"] for w in words), ours["error"]


def test_a_missing_expert_goes_as_it_goes_with_the_default_loader(models, tmp_path):
    """A checkpoint that lacks one expert's projection goes as it goes with the default loader:
    vLLM 0.32's weight tracking counts fused parameters, not experts, so both engines start (the
    expert's rows left as allocated); a vLLM that refuses it refuses it with both, saying the
    same."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "missing-expert"
    shutil.copytree(models["moe"], path)
    gone = "model.layers.1.mlp.experts.3.up_proj.weight"
    with open(path / "model.safetensors.index.json") as f:
        index = json.load(f)
    shard = path / index["weight_map"].pop(gone)
    tensors = load_file(str(shard))
    del tensors[gone]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with open(path / "model.safetensors.index.json", "w") as f:
        json.dump(index, f)
    auto, ours = engine([(str(path), "auto"), (str(path), "weightlift")])
    assert ours.get("error") == auto.get("error"), (auto.get("error"), ours.get("error"))


def test_a_vllm_without_an_internal_the_loader_uses_says_which(monkeypatch):
    """Registered on a vLLM that lacks an internal the loader relies on, the loader fails
    when asked for, naming the internal, rather than loading wrongly or not at all."""
    from vllm.config import LoadConfig
    from vllm.model_executor import model_loader
    from vllm.model_executor.model_loader import weight_utils

    import weightlift.vllm

    assert weightlift.vllm.surface_problem() is None
    monkeypatch.delattr(weight_utils, "should_skip_weight")
    monkeypatch.delitem(model_loader._LOAD_FORMAT_TO_MODEL_LOADER, "weightlift", raising=False)
    weightlift.vllm.register()
    with pytest.raises(RuntimeError, match="should_skip_weight missing"):
        model_loader.get_model_loader(LoadConfig(load_format="weightlift"))
    monkeypatch.undo()
    model_loader._LOAD_FORMAT_TO_MODEL_LOADER.pop("weightlift", None)
    weightlift.vllm.register()
    assert model_loader.get_model_loader(LoadConfig(load_format="weightlift")) is not None


def test_the_unused_weight_filter_is_needed_only_where_vllm_names_unused_weights(monkeypatch):
    """vLLM 0.32 added `Source.is_unused_weight` and the filter that leaves out the files
    holding only such weights; 0.31 has neither. The loader needs the filter exactly where
    the field is there."""
    from vllm.model_executor.model_loader import weight_utils

    import weightlift.vllm

    names = weightlift.vllm._names_unused_weights()
    assert names == hasattr(weight_utils, "filter_safetensors_files_by_weight_name")
    monkeypatch.delattr(weight_utils, "filter_safetensors_files_by_weight_name", raising=False)
    problem = weightlift.vllm.surface_problem()
    if names:
        assert problem == (
            "vllm.model_executor.model_loader.weight_utils:"
            "filter_safetensors_files_by_weight_name missing"
        )
    monkeypatch.setattr(weightlift.vllm, "_names_unused_weights", lambda: False)
    assert weightlift.vllm.surface_problem() is None


@pytest.mark.parametrize("encoder_only", [True, False])
def test_a_model_run_encoder_only_reads_no_file_holding_only_the_language_model(
    tmp_path, monkeypatch, encoder_only
):
    """With `--mm-encoder-only` vLLM's default loader leaves out the files holding only the
    language model's weights (`filter_mm_encoder_only_safetensors_files`); so does
    weightlift's, with that filter: the files handed to the placement are the ones kept."""
    import torch
    from safetensors.torch import save_file
    from vllm.config import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader

    import weightlift.vllm

    shards = {
        "model-00001-of-00002.safetensors": {"visual.proj": torch.zeros(4),
                                             "language_model.a": torch.zeros(4)},
        "model-00002-of-00002.safetensors": {"language_model.b": torch.zeros(4)},
    }
    weight_map = {}
    for file, tensors in shards.items():
        save_file(tensors, str(tmp_path / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    weightlift.vllm.register()  # as vLLM's plugin loading does in an engine's processes
    loader = get_model_loader(LoadConfig(load_format="weightlift"))
    handed = []

    def place(files, *args, **kwargs):
        handed.extend(os.path.basename(f) for f in files)
        return iter(())

    monkeypatch.setattr(weightlift.vllm, "place", place)
    if encoder_only:
        loader._encoder_only_lm_prefixes = ("language_model",)
    list(loader._get_weights_iterator(loader.Source(model_or_path=str(tmp_path), revision=None)))
    kept = ["model-00001-of-00002.safetensors"]
    assert sorted(handed) == (kept if encoder_only else sorted(shards))
