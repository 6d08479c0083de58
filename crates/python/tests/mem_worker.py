"""One reader of the memory tests (test_memory.py), run inside a memory cgroup: reads a
checkpoint the way a loader does, hashes every byte it gets, and prints one JSON line with
the hash and the bytes this process read from storage (``/proc/self/io``).

Usage: mem_worker.py PATTERN CHECKPOINT_DIR

Patterns: ``stock`` (safetensors: every shard opened with ``safe_open``, then each tensor
read in file order, hashed and dropped, as transformers does), ``patched`` (the same under
``weightlift.patch()``), ``iterate`` (``weightlift.safe_open`` of the directory, each tensor
in file order), ``mapped`` (``weightlift.load_checkpoint``, then each tensor in file order),
``owned`` (``load_checkpoint(copy=True)``: more than fits, so it must refuse); ``read-pt``
(``weightlift.safe_open(dir, "pt", backend="pread", prefetch=True)``, each tensor in file
order: torch tensors of bytes read into memory of their own, as on a network filesystem).
"""

import hashlib
import json
import os
import sys


def read_bytes():
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def shards(path):
    return [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]


def main():
    pattern, path = sys.argv[1], sys.argv[2]
    before = read_bytes()
    h = hashlib.sha256()
    out = {"pattern": pattern}
    if pattern in ("stock", "patched"):
        import safetensors

        if pattern == "patched":
            import weightlift

            weightlift.patch()
        handles = [safetensors.safe_open(f, framework="np") for f in shards(path)]
        for handle in handles:
            for name in handle.offset_keys():
                t = handle.get_tensor(name)
                h.update(name.encode())
                h.update(t.tobytes())
                del t
        for handle in handles:
            handle.__exit__(None, None, None)
    elif pattern == "iterate":
        import weightlift

        with weightlift.safe_open(path, "np") as f:
            for name in f.offset_keys():
                t = f.get_tensor(name)
                h.update(name.encode())
                h.update(t.tobytes())
                del t
    elif pattern == "read-pt":
        # Imported before the baseline is taken: torch's own memory is not the handle's.
        import torch  # noqa: F401
        import weightlift

        with weightlift.safe_open(path, "pt", backend="pread", prefetch=True) as f:
            start = peak = rss()
            for name in f.offset_keys():
                t = f.get_tensor(name)
                h.update(name.encode())
                h.update(t.numpy().tobytes())
                del t
                peak = max(peak, rss())
            out["peak_growth"] = peak - start
    elif pattern == "mapped":
        import weightlift

        state = weightlift.load_checkpoint(path)
        out["reasons"] = [r["reason"] for r in state.report]
        for name in state:
            h.update(name.encode())
            h.update(state[name].tobytes())
    elif pattern == "owned":
        import weightlift

        try:
            weightlift.load_checkpoint(path, copy=True)
            out["error"] = None
        except weightlift.SafetensorError as e:
            out["error"] = str(e)
    else:
        raise SystemExit(f"unknown pattern {pattern}")
    out["digest"] = h.hexdigest()
    out["read_bytes"] = read_bytes() - before
    print(json.dumps(out))


if __name__ == "__main__":
    main()
