"""weightlift's GPU run: correctness and rates of the CUDA path on one machine, in one call,
within a time budget. Built into a bundle by `cargo xtask gpu-bundle`; started by run.sh.

Writes $OUT/results.json (after every stage, so a run cut short keeps what it measured),
$OUT/summary.md (the tables for the README) and the log run.sh tees.

Stages, most important first; a stage that would not fit in the time left is skipped and
says so. Without a GPU (or with --device cpu) every stage that needs none still runs:
generating the checkpoints, the page-cache and cold read rates, hashes of the CPU load
against the files; then the run stops with the device's "not available" error (exit 3).
With --device cpu it rehearses everything on the CPU instead (exit 0), so the script itself
is tested where no GPU is.
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

from pagecache import evict

T0 = time.monotonic()
HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = os.path.join(HERE, "gpu_tasks.py")
BIN = os.path.join(HERE, "bin", "weightlift")
GiB = 1 << 30


def log(msg):
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


class Run:
    def __init__(self, out, budget):
        self.out = out
        self.budget = budget
        self.only = None
        self.results = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(),
            "budget_seconds": budget,
            "stages": {},
        }

    def left(self):
        return self.budget - (time.monotonic() - T0)

    def save(self):
        self.results["elapsed_seconds"] = round(time.monotonic() - T0, 1)
        tmp = os.path.join(self.out, "results.json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.results, f, indent=1, default=str)
        os.replace(tmp, os.path.join(self.out, "results.json"))

    def stage(self, name, need, fn, *args):
        """Runs fn(*args) as stage `name` if about `need` seconds are left; records its result
        or error. Returns the result, or None."""
        if self.only and name not in self.only and name not in ("environment", "generate"):
            return None
        if self.left() < need:
            log(f"== {name}: skipped, {self.left():.0f} s left and it needs about {need} s")
            self.results["stages"][name] = {"skipped": f"time budget ({self.left():.0f} s left)"}
            self.save()
            return None
        log(f"== {name}")
        t = time.monotonic()
        try:
            r = fn(*args)
            rec = {"ok": True, "result": r}
        except Exception as e:  # noqa: BLE001 - a stage's failure is recorded, the run goes on
            traceback.print_exc()
            r = None
            rec = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        rec["seconds"] = round(time.monotonic() - t, 2)
        self.results["stages"][name] = rec
        self.save()
        log(f"   {name}: {'ok' if rec['ok'] else 'FAILED: ' + rec['error']} ({rec['seconds']} s)")
        return r


def sh(cmd, timeout=None, check=True, env=None):
    """Runs a command; returns stdout. Its stderr goes to the log."""
    log("$ " + " ".join(cmd))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if p.stderr.strip():
        print(p.stderr.rstrip()[-4000:], flush=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{os.path.basename(cmd[0])} exited {p.returncode}: {(p.stderr or p.stdout).strip()[-600:]}")
    return p.stdout


def task(run, *args, timeout=300):
    """Runs one gpu_tasks.py measurement in a fresh process; returns its JSON."""
    timeout = max(10, min(timeout, run.left()))
    out = sh([sys.executable, TASKS, *map(str, args)], timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


def fs_type(path):
    try:
        return subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None


# ---- stages -------------------------------------------------------------------------------


def env_info(a):
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        with open("/proc/meminfo") as f:
            info["meminfo"] = {l.split(":")[0]: l.split(":")[1].strip() for l in f if l.startswith(("MemTotal", "MemAvailable"))}
    except OSError:
        pass
    for cmd in (["nvidia-smi", "--query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max", "--format=csv,noheader"],
                [BIN, "--version"]):
        try:
            info[os.path.basename(cmd[0])] = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            info[os.path.basename(cmd[0])] = f"unavailable: {e}"
    versions = {}
    for mod in ["torch", "safetensors", "transformers", "weightlift", "fastsafetensors", "instanttensor", "runai_model_streamer", "numpy"]:
        p = subprocess.run([sys.executable, "-c", f"import {mod} as m; print(getattr(m, '__version__', 'present'))"], capture_output=True, text=True, timeout=120)
        versions[mod] = p.stdout.strip() if p.returncode == 0 else "not importable: " + (p.stderr.strip().splitlines() or ["?"])[-1]
    info["versions"] = versions
    p = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available(), torch.version.cuda)"], capture_output=True, text=True, timeout=120)
    info["torch_cuda"] = p.stdout.strip()
    info["bundle"] = json.load(open(os.path.join(HERE, "MANIFEST.json"))) if os.path.exists(os.path.join(HERE, "MANIFEST.json")) else None
    for k, v in info.items():
        log(f"   {k}: {v}")
    return info


def generate(a, dirs):
    out = {}
    for where, base in dirs.items():
        os.makedirs(base, exist_ok=True)
        usage = shutil.disk_usage(base)
        out[where] = {"path": base, "fs": fs_type(base), "free_bytes": usage.free}
        for profile in ["dense", "moe"]:
            d = os.path.join(base, profile)
            if os.path.exists(os.path.join(d, "model.safetensors.index.json")):
                continue
            shutil.rmtree(d, ignore_errors=True)
            t = time.monotonic()
            said = sh([BIN, "generate", d, "--profile", profile, "--size", a.size])
            out[where][profile] = {"said": said.strip(), "seconds": round(time.monotonic() - t, 2)}
            log("   " + said.strip())
    return out


def shard_paths(d):
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors"))


def raw_read(paths, threads=16, block=16 << 20):
    """Seconds to read the files' bytes with `threads` threads of positioned 16 MiB reads into
    reused buffers: the storage bound no loader can beat."""
    jobs = [(p, off) for p in paths for off in range(0, os.path.getsize(p), block)]
    lock = threading.Lock()

    def work():
        buf = bytearray(block)
        fds = {}
        while True:
            with lock:
                if not jobs:
                    break
                p, off = jobs.pop()
            fd = fds.get(p)
            if fd is None:
                fd = fds[p] = os.open(p, os.O_RDONLY)
            os.preadv(fd, [buf], off)
        for fd in fds.values():
            os.close(fd)

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        for f in [ex.submit(work) for _ in range(threads)]:
            f.result()
    return time.perf_counter() - t


def read_bounds(a, dirs):
    out = {}
    threads = max(4, os.cpu_count() or 4)
    for profile in ["dense", "moe"]:
        d = os.path.join(dirs["disk"], profile)
        paths = shard_paths(d)
        total = sum(os.path.getsize(p) for p in paths)
        raw_read(paths, threads)
        warm = min(raw_read(paths, threads) for _ in range(3))
        cold, still = [], []
        for _ in range(2):
            still.append(evict(paths))
            cold.append(raw_read(paths, threads))
        r = {"bytes": total, "threads": threads, "warm_seconds": warm, "warm_gbps": total / warm / 1e9,
             "cold_seconds": min(cold), "cold_gbps": total / min(cold) / 1e9, "cached_after_evict": still}
        if "shm" in dirs:
            sp = shard_paths(os.path.join(dirs["shm"], profile))
            s = min(raw_read(sp, threads) for _ in range(3))
            r["shm_seconds"], r["shm_gbps"] = s, total / s / 1e9
        out[profile] = r
        log(f"   {profile}: page cache {r['warm_gbps']:.2f} GB/s, cold {r['cold_gbps']:.2f} GB/s "
            f"(cached after eviction: {still}), /dev/shm {r.get('shm_gbps', 0):.2f} GB/s")
    return out


def file_hashes(d):
    """SHA-256 of every tensor's bytes, straight from the files (not through weightlift)."""
    def one(p):
        out = {}
        with open(p, "rb") as f:
            (hl,) = struct.unpack("<Q", f.read(8))
            h = json.loads(f.read(hl))
            for k, v in h.items():
                if k == "__metadata__":
                    continue
                s, e = v["data_offsets"]
                f.seek(8 + hl + s)
                out[k] = hashlib.sha256(f.read(e - s)).hexdigest()
        return out

    merged = {}
    with ThreadPoolExecutor(8) as ex:
        for part in ex.map(one, shard_paths(d)):
            merged.update(part)
    return merged


def cli_hashes(d, *extra):
    out = json.loads(sh([BIN, "hash", d, "--json", *extra]))
    return {k: v["sha256"] for k, v in out["tensors"].items()}


def cpu_hashes(a, dirs):
    """The CPU load's hashes equal the files' (checks the bundle's binary before the GPU)."""
    out = {}
    for profile in ["dense", "moe"]:
        d = os.path.join(dirs["disk"], profile)
        want = file_hashes(d)
        got = cli_hashes(d)
        bad = [k for k in want if got.get(k) != want[k]]
        out[profile] = {"tensors": len(want), "mismatches": bad[:10], "ok": not bad and len(got) == len(want)}
        if bad or len(got) != len(want):
            raise RuntimeError(f"{profile}: {len(bad)} CPU hashes differ from the files")
    return out


def gpu_gate(a, dirs):
    """Loads the dense checkpoint to the device with the CLI: the first thing that needs a
    GPU. Without one this is where the run stops, with weightlift's own error."""
    d = os.path.join(dirs["disk"], "dense")
    p = subprocess.run([BIN, "load", d, "--device", a.device, "--json"], capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise GpuUnavailable(p.stderr.strip())
    return json.loads(p.stdout)


class GpuUnavailable(Exception):
    pass


def rust_tests(a):
    tmp = os.path.join(a.disk, "test-tmp")
    os.makedirs(tmp, exist_ok=True)
    env = dict(os.environ, WEIGHTLIFT_REQUIRE_CUDA="1", RUST_BACKTRACE="1", WEIGHTLIFT_TEST_TMPDIR=tmp)
    out = {}
    for name in sorted(os.listdir(os.path.join(HERE, "tests"))):
        exe = os.path.join(HERE, "tests", name)
        # The device crate's own tests include the fake-engine pipeline tests; run them all.
        said = sh([exe, "--test-threads", "4"], timeout=min(300, a_left(a)), env=env)
        tail = [l for l in said.splitlines() if l.startswith("test result")]
        out[name] = tail[-1] if tail else said[-300:]
        log(f"   {name}: {out[name]}")
    return out


def a_left(a):
    return max(30, a.run.left())


def gpu_hashes(a, dirs):
    """Every tensor to the device and back: the same SHA-256 as the files; filtered and
    converted loads equal to the CPU's."""
    out = {}
    for profile in ["dense", "moe"]:
        d = os.path.join(dirs["disk"], profile)
        want = file_hashes(d)
        got = cli_hashes(d, "--device", a.device)
        bad = [k for k in want if got.get(k) != want[k]]
        pick = "model.layers.1.*"
        filt_cpu = cli_hashes(d, "--filter", pick, "--convert", "f32")
        filt_gpu = cli_hashes(d, "--filter", pick, "--convert", "f32", "--device", a.device)
        bad_conv = [k for k in filt_cpu if filt_gpu.get(k) != filt_cpu[k]]
        out[profile] = {"tensors": len(want), "mismatches": bad[:10], "filtered_converted": len(filt_cpu),
                        "filtered_converted_mismatches": bad_conv[:10]}
        log(f"   {profile}: {len(want)} tensors, {len(bad)} differ; filtered+converted {len(filt_cpu)}, {len(bad_conv)} differ")
        if bad or len(got) != len(want) or bad_conv or len(filt_gpu) != len(filt_cpu) or not filt_cpu:
            raise RuntimeError(f"{profile}: the device's bytes differ from the files")
    return out


def errors_then_next(a, dirs):
    d = os.path.join(dirs["disk"], "dense")
    out = {"truncated": task(a.run, "truncated", d, a.device)}
    out["device_memory_full"] = task(a.run, "oom", d, a.device)
    for k, v in out.items():
        log(f"   {k}: {v}")
        if not v.get("ok", "skipped" in v):
            raise RuntimeError(f"{k}: {v}")
    return out


def bounds_h2d(a):
    r = task(a.run, "bound", a.device)
    log(f"   {r}")
    return r


def cli_load(d, device, *extra):
    return json.loads(sh([BIN, "load", d, "--device", device, "--json", *extra], timeout=300))


def loaders(a, dirs, names, profiles=("dense", "moe")):
    """Each loader in its own process per profile: cold loads (evicted first), then warm."""
    out = {}
    for profile in profiles:
        d = os.path.join(dirs["disk"], profile)
        for name in names:
            if a.run.left() < 40:
                out.setdefault(profile, {})[name] = {"skipped": "time budget"}
                continue
            try:
                r = task(a.run, "load", name, d, a.device, "--cold", a.cold, "--warm", a.warm, timeout=240)
            except Exception as e:  # noqa: BLE001 - one loader failing must not hide the others
                r = {"error": str(e)[-800:]}
            out.setdefault(profile, {})[name] = r
            log(f"   {profile} {name}: {summarise(r)}")
            a.run.save()
    return out


def summarise(r):
    if "runs" not in r:
        return r
    cold = [x["seconds"] for x in r["runs"] if x["cache"] == "cold"]
    warm = [x["seconds"] for x in r["runs"] if x["cache"] == "warm"]
    gb = r["bytes"] / 1e9
    parts = []
    if cold:
        parts.append(f"cold {min(cold):.3f} s ({gb / min(cold):.2f} GB/s)")
    if warm:
        parts.append(f"warm {median(warm):.3f} s ({gb / median(warm):.2f} GB/s)")
    return ", ".join(parts)


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def cli_stages(a, dirs):
    """The CLI's per-stage rates (storage to pinned, host to device, waits), warm and cold."""
    out = {}
    for profile in ["dense", "moe"]:
        d = os.path.join(dirs["disk"], profile)
        cli_load(d, a.device)
        warm = [cli_load(d, a.device) for _ in range(2)]
        evict(shard_paths(d))
        cold = cli_load(d, a.device)
        out[profile] = {"warm": warm, "cold": cold}
        for k, r in [("warm", warm[-1]), ("cold", cold)]:
            log(f"   {profile} {k}: {r['seconds']:.3f} s {r['gbps']:.2f} GB/s; storage->pinned {r.get('disk_to_host_gbps')} GB/s, "
                f"host->device {r.get('host_to_device_gbps')} GB/s, waits {r.get('staging_wait_seconds')} s, copies {r.get('copies')}")
    return out


def sweep(a, dirs):
    """Pinned pool (buffers x size), streams and reader threads, warm, one load each."""
    pools = [(4, "32MiB"), (8, "32MiB"), (8, "64MiB"), (16, "16MiB"), (4, "128MiB"), (2, "32MiB")]
    grid = [{"pinned_buffers": b, "pinned_buffer_size": s, "streams": st, "threads": 16} for (b, s) in pools for st in [2, 4]]
    grid += [{"pinned_buffers": 4, "pinned_buffer_size": "32MiB", "streams": 2, "threads": t} for t in [4, 8, 32]]
    out = {}
    for profile in ["dense", "moe"]:
        d = os.path.join(dirs["disk"], profile)
        rows = []
        for g in grid:
            if a.run.left() < 30:
                break
            r = cli_load(d, a.device, "--pinned-buffers", str(g["pinned_buffers"]), "--pinned-buffer-size", g["pinned_buffer_size"],
                         "--streams", str(g["streams"]), "--threads", str(g["threads"]))
            rows.append({**g, "seconds": r["seconds"], "gbps": r["gbps"], "host_to_device_gbps": r.get("host_to_device_gbps"),
                         "disk_to_host_gbps": r.get("disk_to_host_gbps"), "staging_wait_seconds": r.get("staging_wait_seconds")})
        rows.sort(key=lambda r: r["seconds"])
        out[profile] = rows
        if rows:
            log(f"   {profile}: best {rows[0]}; worst {rows[-1]}")
    return out


def transformers_rates(a, dirs):
    d = os.path.join(dirs["disk"], "hf-moe")
    if not os.path.exists(os.path.join(d, "config.json")):
        made = task(a.run, "make-model", d, a.device, "--scale", a.hf_scale, timeout=300)
        log(f"   model: {made}")
    out = {}
    for mode in ["stock", "weightlift"]:
        out[mode] = task(a.run, "transformers", mode, d, a.device, "--reps", 3, "--cold", 1, timeout=300)
        log(f"   {mode}: {out[mode]}")
    runs = [r for m in ("stock", "weightlift") for r in out[m]["runs"]]
    out["same_parameters"] = len({r["params_digest"] for r in runs}) == 1
    first = runs[0]["logits_sum"]
    out["same_logits"] = all(abs(r["logits_sum"] - first) <= 1e-3 * max(1.0, abs(first)) for r in runs)
    # Under the patch every parameter is placed on the GPU by weightlift's conversion step
    # (its debug line ends "0 by transformers ...").
    said = [m for r in out["weightlift"]["runs"] for m in r.get("weightlift_said", [])]
    out["placed_on_device"] = bool(said) and all(" 0 by transformers" in m for m in said if "parameters:" in m)
    if not out["same_parameters"]:
        raise RuntimeError("the patched model's parameters differ from stock's")
    if not out["placed_on_device"]:
        raise RuntimeError(f"the patched load left parameters to transformers: {said}")
    return out


# ---- summary ------------------------------------------------------------------------------


def summary(run):
    s = run.results["stages"]
    res = lambda k: (s.get(k) or {}).get("result") or {}
    device = run.results.get("args", {}).get("device")
    lines = [f"# weightlift GPU run, {run.results['date']}, device {device}", ""]
    env = res("environment")
    lines.append(f"Machine: {env.get('nvidia-smi', '?')}; {env.get('cpus')} CPUs; torch {env.get('versions', {}).get('torch')}")
    lines.append("")
    bounds = res("read bounds")
    h2d = res("h2d bound")
    ld = {}
    for k in ["loaders", "peers"]:
        for profile, by in res(k).items():
            ld.setdefault(profile, {}).update(by)
    lines.append("| profile | cache | loader | seconds | GB/s | x bound | x weightlift |")
    lines.append("|---|---|---|---|---|---|---|")
    for profile, by in ld.items():
        b = bounds.get(profile, {})
        for cache in ["warm", "cold"]:
            bound = None
            if cache == "warm" and b:
                bound = min(b["warm_gbps"], h2d.get("pinned_h2d_gbps") or b["warm_gbps"])
            elif cache == "cold" and b:
                bound = b["cold_gbps"]
            wl = None
            for name, r in by.items():
                xs = [x["seconds"] for x in r.get("runs", []) if x["cache"] == cache]
                if not xs:
                    why = (r.get("skipped") or r.get("error") or "-").strip().splitlines()[-1][:100]
                    lines.append(f"| {profile} | {cache} | {name} | {why} | | | |")
                    continue
                secs = min(xs) if cache == "cold" else median(xs)
                gbps = r["bytes"] / secs / 1e9
                if name == "weightlift":
                    wl = secs
                lines.append(f"| {profile} | {cache} | {name} | {secs:.3f} | {gbps:.2f} | "
                             f"{gbps / bound if bound else float('nan'):.2f} | {secs / wl if wl else float('nan'):.2f} |")
    lines.append("")
    lines.append(f"Bounds: pinned H2D {h2d.get('pinned_h2d_gbps', 'n/a')} GB/s; page cache / cold reads: "
                 + "; ".join(f"{p} {b.get('warm_gbps', 0):.2f} / {b.get('cold_gbps', 0):.2f} GB/s" for p, b in bounds.items()))
    lines.append("x bound: warm against min(page-cache read, pinned H2D), cold against the raw read of the "
                 "same files after the same eviction; x weightlift: the loader's time over weightlift's.")
    stages_ = res("cli stages")
    if stages_:
        lines += ["", "| profile | cache | CLI load GB/s | storage->pinned GB/s | host->device GB/s | waits s | copies |", "|---|---|---|---|---|---|---|"]
        for profile, by in stages_.items():
            for cache, r in [("warm", by["warm"][-1]), ("cold", by["cold"])]:
                lines.append(f"| {profile} | {cache} | {r['gbps']:.2f} | {r.get('disk_to_host_gbps') or 0:.2f} | "
                             f"{r.get('host_to_device_gbps') or 0:.2f} | {r.get('staging_wait_seconds') or 0:.3f} | {r.get('copies')} |")
    sw = res("sweep")
    if sw:
        lines += ["", "| profile | pinned buffers x size | streams | threads | seconds | GB/s |", "|---|---|---|---|---|---|"]
        for profile, rows in sw.items():
            for r in rows[:3] + rows[-1:]:
                lines.append(f"| {profile} | {r['pinned_buffers']} x {r['pinned_buffer_size']} | {r['streams']} | {r['threads']} | "
                             f"{r['seconds']:.3f} | {r['gbps']:.2f} |")
    tf = res("transformers")
    if tf:
        lines += ["", f"from_pretrained: same parameters {tf.get('same_parameters')}, same logits {tf.get('same_logits')}", "",
                  "| from_pretrained | cold s | warm s (median) |", "|---|---|---|"]
        for mode in ["stock", "weightlift"]:
            runs_ = tf.get(mode, {}).get("runs", [])
            cold = [r["seconds"] for r in runs_ if r["cache"] == "cold"]
            warm = [r["seconds"] for r in runs_ if r["cache"] == "warm"]
            lines.append(f"| {mode} | {min(cold) if cold else float('nan'):.3f} | {median(warm) if warm else float('nan'):.3f} |")
    lines.append("")
    for k in ["gpu hashes", "errors then next load", "rust gpu tests", "transformers"]:
        st = s.get(k, {})
        lines.append(f"- {k}: {'ok' if st.get('ok') else st.get('error') or st.get('skipped') or 'not run'}")
    with open(os.path.join(run.out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def stages(a, run, dirs):
    """Runs the stages; returns why the run stopped early, or None."""
    run.stage("environment", 5, env_info, a)
    if run.stage("generate", 20, generate, a, dirs) is None:
        return "could not generate the checkpoints"
    run.stage("read bounds", 20, read_bounds, a, dirs)
    run.stage("cpu hashes", 10, cpu_hashes, a, dirs)
    if a.device != "cpu":
        try:
            gpu_gate(a, dirs)
        except GpuUnavailable as e:
            run.results["stopped"] = f"{a.device} not available: {e}"
            run.save()
            return str(e)
        run.stage("rust gpu tests", 20, rust_tests, a)
        run.stage("gpu hashes", 30, gpu_hashes, a, dirs)
    run.stage("errors then next load", 15, errors_then_next, a, dirs)
    run.stage("h2d bound", 10, bounds_h2d, a)
    run.stage("loaders", 60, loaders, a, dirs, ["weightlift", "safetensors"])
    run.stage("cli stages", 20, cli_stages, a, dirs)
    run.stage("peers", 60, loaders, a, dirs, ["fastsafetensors", "instanttensor", "runai"])
    run.stage("sweep", 40, sweep, a, dirs)
    run.stage("transformers", 60, transformers_rates, a, dirs)
    return None


def size_bytes(text):
    """'4GiB', '256MiB', '1G', '512M' or a number of bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "out"))
    ap.add_argument("--budget", type=float, default=450, help="seconds for the whole run")
    ap.add_argument("--size", default="4GiB", help="size of each generated checkpoint")
    ap.add_argument("--device", default="cuda:0", help="cuda:N, or cpu to rehearse on a machine without a GPU")
    ap.add_argument("--disk", default=os.environ.get("WL_DISK_DIR", "/var/tmp/weightlift-gpu"))
    ap.add_argument("--shm", default="/dev/shm/weightlift-gpu")
    ap.add_argument("--cold", type=int, default=1)
    ap.add_argument("--warm", type=int, default=2)
    ap.add_argument("--hf-scale", type=float, default=1.0)
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--only", help="comma-separated stages to run (a rerun of some), e.g. 'peers,sweep'")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    run = a.run = Run(a.out, a.budget)
    run.only = set(a.only.split(",")) if a.only else None
    run.results["args"] = {k: v for k, v in vars(a).items() if k != "run"}
    dirs = {"disk": a.disk}
    # /dev/shm is often small in containers: use it only where both checkpoints fit twice.
    need = 4 * size_bytes(a.size)
    shm_parent = os.path.dirname(a.shm)
    if os.path.isdir(shm_parent) and shutil.disk_usage(shm_parent).free > need:
        dirs["shm"] = a.shm
    else:
        log(f"note: {shm_parent} is missing or has under {need >> 30} GiB free: no /dev/shm copies")
    try:
        stopped = stages(a, run, dirs)
    finally:
        summary(run)
        if not a.keep and "shm" in dirs:
            shutil.rmtree(dirs["shm"], ignore_errors=True)
    if stopped:
        log(f"every stage that needs no GPU ran (above); the rest needs a machine with an NVIDIA driver")
        log(f"STOP: {stopped}")
        return 3
    failed = [k for k, v in run.results["stages"].items() if v.get("ok") is False]
    log(f"done in {time.monotonic() - T0:.0f} s; failed stages: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
