"""Runs vLLM's engine on the CPU, for the vLLM tests (``tests/vllm_engine/test_vllm.py``) and
``cargo xtask bench-vllm`` alike: for each
``MODEL=LOAD_FORMAT`` argument, starts ``LLM(model=MODEL, load_format=LOAD_FORMAT)``, generates
greedily from a fixed prompt, and prints one JSON line (the bench's sample): ``secs``, the
loader's `load_weights` time (one-process mode; what vLLM logs as "Loading weights took"),
``model_s``, the loader's whole ``load_model`` (the model built, loaded and processed: what
vLLM logs as "Model loading took"), ``peak_rss`` (this process's peak so far, bytes), the
engine's ``start_s`` and the ``tokens``,
or the ``error``; in a block-I/O cgroup (the bench's storage profiles), the group's read
requests and bytes during the load (``load_disk_requests``, ``load_disk_bytes``).

Run as a script (vLLM's CPU platform starts its processes with `spawn`). One-process mode is
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` in the environment.
"""

import gc
import json
import os
import resource
import sys
import time

from blkio_counts import own_group_reads

PROMPT = [3, 17, 42, 99, 5, 64, 1, 77]


LOADS = []
# Each loader's whole `load_model`: the model built, its weights loaded, then processed (what
# vLLM's model runner logs as "Model loading took"). A loader that starts reading while the
# model is built (weightlift's early read) moves time out of `load_weights` into this.
MODEL_LOADS = []
# The disk reads (requests, bytes) of this process's block-I/O cgroup during each load, where
# it runs in one (the bench's `--storage` profiles): counted around the load alone, since an
# engine start also reads many small pieces of files (modules, libraries) before and after.
LOAD_DISK = []


def time_loads():
    """Times every loader's `load_weights` in this process (one-process mode: the engine's
    worker is this process), as vLLM's "Loading weights took" does, and its whole
    `load_model`."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    def weights_done(secs, disk, after):
        LOADS.append(secs)
        if disk is not None and after is not None:
            LOAD_DISK.append((after[0] - disk[0], after[1] - disk[1]))

    def model_done(secs, _disk, _after):
        MODEL_LOADS.append(secs)

    def timed(cls, method, done):
        """`cls.method`, where `cls` defines it, calling `done(seconds, block-I/O counts
        before, after)` when its outermost call on an object returns (a loader's override
        calls the base class's, which is timed too)."""
        original = cls.__dict__.get(method)
        if original is None or getattr(original, "_timed", False):
            return
        busy = f"_timing_{method}"

        def timing(self, *a, **k):
            if getattr(self, busy, False):
                return original(self, *a, **k)
            setattr(self, busy, True)
            disk = own_group_reads()
            start = time.perf_counter()
            try:
                return original(self, *a, **k)
            finally:
                secs = time.perf_counter() - start
                setattr(self, busy, False)
                done(secs, disk, own_group_reads())

        timing._timed = True
        setattr(cls, method, timing)

    def every(cls):
        yield cls
        for sub in cls.__subclasses__():
            yield from every(sub)

    import vllm.model_executor.model_loader  # noqa: F401 (registers the loaders)

    for cls in every(BaseModelLoader):
        timed(cls, "load_model", model_done)
        timed(cls, "load_weights", weights_done)


def run(model, load_format, extra):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    time_loads()
    LOADS.clear()
    MODEL_LOADS.clear()
    LOAD_DISK.clear()
    start = time.perf_counter()
    out = {"model": model, "load_format": load_format, "secs": None}
    try:
        llm = LLM(
            model=model,
            load_format=load_format,
            model_loader_extra_config=extra,
            dtype="bfloat16",
            enforce_eager=True,
            max_model_len=64,
            skip_tokenizer_init=True,
            max_num_seqs=2,
            max_num_batched_tokens=64,
            seed=0,
        )
        out["start_s"] = time.perf_counter() - start
        result = llm.generate(
            [TokensPrompt(prompt_token_ids=PROMPT)],
            SamplingParams(temperature=0, max_tokens=8),
            use_tqdm=False,
        )
        out["tokens"] = list(result[0].outputs[0].token_ids)
        out["secs"] = LOADS[-1] if LOADS else None
        out["model_s"] = MODEL_LOADS[-1] if MODEL_LOADS else None
        if LOAD_DISK:
            out["load_disk_requests"], out["load_disk_bytes"] = LOAD_DISK[-1]
        del llm
    except Exception as e:  # noqa: BLE001 (reported to the test)
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        gc.collect()
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def test_hooks():
    """For the tests: ``WL_LOG=1`` sends weightlift's log (DEBUG and up) to standard error;
    ``WL_FORCE_DEFAULT=SUBSTRING`` sends the tensors whose names contain it vLLM's default way
    (as a weight loader that does arithmetic on them would); ``WL_COLD=1`` drops each model's
    files from the page cache before its start (several cold starts in one process)."""
    if os.environ.get("WL_LOG"):
        import logging

        log = logging.getLogger("weightlift")
        log.setLevel(logging.DEBUG)
        log.addHandler(logging.StreamHandler(sys.stderr))
    forced = os.environ.get("WL_FORCE_DEFAULT")
    if forced:
        from weightlift import _vllm_place

        record = _vllm_place.Source.record

        def record_unless_forced(self, dest, src):
            return forced not in (self._current or "") and record(self, dest, src)

        _vllm_place.Source.record = record_unless_forced


def evict(model):
    """Drops the files of the checkpoint directory `model` from the page cache."""
    for name in os.listdir(model):
        fd = os.open(os.path.join(model, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main():
    test_hooks()
    extra = json.loads(os.environ.get("WL_EXTRA", "{}"))
    for arg in sys.argv[1:]:
        model, _, load_format = arg.rpartition("=")
        if os.environ.get("WL_COLD"):
            evict(model)
        print(json.dumps(run(model, load_format, extra)), flush=True)


if __name__ == "__main__":
    main()
