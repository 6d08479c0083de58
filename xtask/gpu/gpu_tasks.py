"""One measurement per process, for run.py: each loader is timed in a process of its own, as
users run it (a fresh process per load, torch imported and the device initialised first),
and prints one JSON object on its last line.

    python3 gpu_tasks.py load NAME DIR DEVICE --cold N --warm N
    python3 gpu_tasks.py bound DEVICE
    python3 gpu_tasks.py oom DIR DEVICE
    python3 gpu_tasks.py truncated DIR DEVICE
    python3 gpu_tasks.py make-model DIR DEVICE --scale S
    python3 gpu_tasks.py transformers MODE DIR DEVICE --reps N

NAME is one of LOADERS below. DEVICE is "cuda:N", or "cpu" for the bundle's rehearsal on a
machine without a GPU (loaders that need a GPU then report that they were skipped).
"""

import argparse
import gc
import glob
import hashlib
import json
import os
import struct
import sys
import time

import torch

from pagecache import cached_fraction, evict


def shards(d):
    return sorted(glob.glob(os.path.join(d, "*.safetensors")))


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def free_device(device):
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ---- loaders: each returns a dict of name -> tensor on `device` ----------------------------


def load_weightlift(d, device):
    import weightlift

    return dict(weightlift.load_checkpoint(d, framework="pt", device=device))


def load_safetensors(d, device):
    from safetensors.torch import load_file

    out = {}
    for p in shards(d):
        out.update(load_file(p, device=device))
    return out


def load_fastsafetensors(d, device):
    from fastsafetensors import fastsafe_open

    # No GPUDirect Storage here (nogds=True): its bounce-buffer path, as most users get it.
    with fastsafe_open(shards(d), framework="pt", device=device, nogds=True) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def load_instanttensor(d, device):
    if not device.startswith("cuda"):
        raise Skip("InstantTensor loads to CUDA devices only")
    from instanttensor import safe_open

    with safe_open(shards(d), framework="pt", device=device) as f:
        return dict(f.tensors())


def load_runai(d, device):
    from runai_model_streamer import SafetensorsStreamer

    out = {}
    with SafetensorsStreamer() as s:
        s.stream_files(shards(d))
        # As vLLM uses it: tensors stream into host memory, then go to the device.
        for name, t in s.get_tensors():
            out[name] = t.to(device)
    return out


LOADERS = {
    "weightlift": load_weightlift,
    "safetensors": load_safetensors,
    "fastsafetensors": load_fastsafetensors,
    "instanttensor": load_instanttensor,
    "runai": load_runai,
}


class Skip(Exception):
    pass


def header_sizes(d):
    """Tensor count and data bytes, from the headers."""
    n = total = 0
    for p in shards(d):
        with open(p, "rb") as f:
            (hl,) = struct.unpack("<Q", f.read(8))
            h = json.loads(f.read(hl))
        for k, v in h.items():
            if k != "__metadata__":
                n += 1
                total += v["data_offsets"][1] - v["data_offsets"][0]
    return n, total


def task_load(a):
    paths = shards(a.dir)
    n, total = header_sizes(a.dir)
    t = time.perf_counter()
    if a.device.startswith("cuda"):
        torch.zeros(1, device=a.device)
    sync(a.device)
    init = time.perf_counter() - t
    fn = LOADERS[a.name]
    runs = []
    for i in range(a.cold + a.warm):
        cold = i < a.cold
        still = evict(paths) if cold else cached_fraction(paths)
        t = time.perf_counter()
        try:
            d = fn(a.dir, a.device)
        except Skip as e:
            return {"skipped": str(e)}
        sync(a.device)
        secs = time.perf_counter() - t
        got = sum(v.numel() * v.element_size() for v in d.values())
        on_device = all(str(v.device) == a.device or (a.device == "cpu" and v.device.type == "cpu") for v in d.values())
        if len(d) != n or got != total or not on_device:
            raise SystemExit(f"{a.name}: {len(d)} tensors, {got} bytes on {set(str(v.device) for v in d.values())}; expected {n}, {total} on {a.device}")
        runs.append({"cache": "cold" if cold else "warm", "seconds": secs, "cached_before": still})
        del d
        free_device(a.device)
    return {"tensors": n, "bytes": total, "device_init_seconds": init, "runs": runs}


def task_bound(a):
    """Plain host-to-device copy rates: from one pinned buffer, and from pageable memory."""
    if not a.device.startswith("cuda"):
        return {"skipped": "no GPU"}
    n = 1 << 30
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(7)
    pageable = torch.empty(n, dtype=torch.uint8).fill_(7)
    dst = torch.empty(n, dtype=torch.uint8, device=a.device)
    out = {}
    for name, src in [("pinned", pinned), ("pageable", pageable)]:
        best = 0.0
        for _ in range(6):
            sync(a.device)
            t = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            sync(a.device)
            best = max(best, n / (time.perf_counter() - t) / 1e9)
        out[f"{name}_h2d_gbps"] = best
    back = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    sync(a.device)
    t = time.perf_counter()
    back.copy_(dst, non_blocking=True)
    sync(a.device)
    out["pinned_d2h_gbps"] = n / (time.perf_counter() - t) / 1e9
    out["gpu"] = torch.cuda.get_device_name(a.device)
    return out


def sha_of(t):
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def file_sha(d, names):
    """SHA-256 of the named tensors' bytes, read from the files directly."""
    out = {}
    for p in shards(d):
        with open(p, "rb") as f:
            (hl,) = struct.unpack("<Q", f.read(8))
            h = json.loads(f.read(hl))
            base = 8 + hl
            for k, v in h.items():
                if k in names:
                    s, e = v["data_offsets"]
                    f.seek(base + s)
                    out[k] = hashlib.sha256(f.read(e - s)).hexdigest()
    return out


def task_oom(a):
    """Most of the device's memory taken (by torch, as a model already there would), then a
    load that does not fit: a clear error; with the memory back, the same process loads."""
    import weightlift

    if not a.device.startswith("cuda"):
        return {"skipped": "no GPU"}
    n, total = header_sizes(a.dir)
    free, whole = torch.cuda.mem_get_info(a.device)
    hog = torch.empty(max(free - total // 4, 0), dtype=torch.uint8, device=a.device)
    free_after, _ = torch.cuda.mem_get_info(a.device)
    error = None
    try:
        weightlift.load_checkpoint(a.dir, framework="pt", device=a.device)
    except Exception as e:  # noqa: BLE001 - the point is what it says
        error = f"{type(e).__name__}: {e}"
    del hog
    free_device(a.device)
    d = weightlift.load_checkpoint(a.dir, framework="pt", device=a.device)
    names = sorted(d)[:: max(1, len(d) // 64)]
    want = file_sha(a.dir, set(names))
    bad = [k for k in names if sha_of(d[k]) != want[k]]
    return {
        "free_bytes": free,
        "total_bytes": whole,
        "free_while_held": free_after,
        "checkpoint_bytes": total,
        "error": error,
        "clear_error": error is not None and a.device in error,
        "next_load_tensors": len(d),
        "next_load_checked": len(names),
        "next_load_mismatches": bad,
        "ok": error is not None and a.device in error and not bad and len(d) == n,
    }


def task_truncated(a):
    """A shard cut short: the error names the file; the next load in this process is right."""
    import shutil
    import tempfile

    import weightlift

    tmp = tempfile.mkdtemp(dir=os.path.dirname(a.dir.rstrip("/")))
    try:
        for p in shards(a.dir):
            shutil.copy(p, tmp)
        victim = shards(tmp)[-1]
        size = os.path.getsize(victim)
        os.truncate(victim, size // 2)
        error = None
        try:
            weightlift.load_checkpoint(tmp, framework="pt", device=a.device)
        except Exception as e:  # noqa: BLE001
            error = f"{type(e).__name__}: {e}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    d = weightlift.load_checkpoint(a.dir, framework="pt", device=a.device)
    names = sorted(d)[:: max(1, len(d) // 64)]
    want = file_sha(a.dir, set(names))
    bad = [k for k in names if sha_of(d[k]) != want[k]]
    named = error is not None and os.path.basename(victim) in error
    return {"error": error, "names_the_file": named, "next_load_mismatches": bad, "ok": named and not bad}


def task_make_model(a):
    """A random Qwen3-MoE-shaped model (many small expert tensors) saved with save_pretrained."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    s = a.scale
    cfg = Qwen3MoeConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2048,
        moe_intermediate_size=128,
        num_hidden_layers=max(2, int(16 * s)),
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    device = a.device if a.device.startswith("cuda") else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(a.dir, max_shard_size="1GB")
    n, total = header_sizes(a.dir)
    return {"tensors": n, "bytes": total, "layers": cfg.num_hidden_layers}


def task_transformers(a):
    """from_pretrained(..., device_map=DEVICE), stock or with weightlift.patch(); then one
    forward pass, so every weight is used."""
    from transformers import AutoModelForCausalLM

    said = []
    if a.mode == "weightlift":
        import logging

        import weightlift

        weightlift.patch()
        # What the patched conversion step did (parameters placed on the GPU, or left to
        # transformers and why).
        log = logging.getLogger("weightlift.transformers")
        log.setLevel(logging.DEBUG)
        handler = logging.Handler()
        handler.emit = lambda record: said.append(record.getMessage())
        log.addHandler(handler)
    paths = shards(a.dir)
    if a.device.startswith("cuda"):
        torch.zeros(1, device=a.device)
    runs = []
    for i in range(a.reps):
        still = evict(paths) if i < a.cold else cached_fraction(paths)
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(a.dir, dtype=torch.bfloat16, device_map=a.device)
        sync(a.device)
        secs = time.perf_counter() - t
        with torch.no_grad():
            logits = model(torch.arange(16, device=a.device).unsqueeze(0)).logits
            # Exact: a float64 sum per parameter (reductions are deterministic for the same
            # input on the same device); the logits can differ in the last bits where a MoE
            # layer adds with atomics, so they are compared with a tolerance.
            sums = [float(p.detach().double().sum()) for _, p in sorted(model.named_parameters())]
        params = hashlib.sha256(json.dumps(sums).encode()).hexdigest()
        digest = float(logits.float().sum())
        runs.append({"cache": "cold" if i < a.cold else "warm", "seconds": secs, "cached_before": still,
                     "logits_sum": digest, "params_digest": params, "weightlift_said": said[-3:]})
        said.clear()
        del model, logits
        free_device(a.device)
    return {"runs": runs}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("task")
    ap.add_argument("args", nargs="*")
    ap.add_argument("--cold", type=int, default=0)
    ap.add_argument("--warm", type=int, default=0)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--scale", type=float, default=1.0)
    a = ap.parse_args()
    if a.task == "load":
        a.name, a.dir, a.device = a.args
        out = task_load(a)
    elif a.task == "bound":
        (a.device,) = a.args
        out = task_bound(a)
    elif a.task == "oom":
        a.dir, a.device = a.args
        out = task_oom(a)
    elif a.task == "truncated":
        a.dir, a.device = a.args
        out = task_truncated(a)
    elif a.task == "make-model":
        a.dir, a.device = a.args
        out = task_make_model(a)
    elif a.task == "transformers":
        a.mode, a.dir, a.device = a.args
        out = task_transformers(a)
    else:
        raise SystemExit(f"unknown task {a.task}")
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
