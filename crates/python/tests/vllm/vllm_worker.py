"""Runs vLLM's engine on the CPU for the vLLM tests (test_vllm.py): for each
``MODEL=LOAD_FORMAT`` argument, starts ``LLM(model=MODEL, load_format=LOAD_FORMAT)``, generates
greedily from a fixed prompt, and prints one JSON line: the tokens, the weight-loading time vLLM
logged ("Loading weights took X seconds") and the engine start time, or the error.

Run as a script (vLLM's CPU platform starts its processes with `spawn`). One-process mode is
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` in the environment.
"""

import gc
import json
import logging
import os
import re
import sys
import time

PROMPT = [3, 17, 42, 99, 5, 64, 1, 77]


class Took(logging.Handler):
    def __init__(self):
        super().__init__()
        self.seconds = None

    def emit(self, record):
        m = re.search(r"Loading weights took ([0-9.]+) seconds", record.getMessage())
        if m:
            self.seconds = float(m.group(1))


def run(model, load_format, extra):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    took = Took()
    logging.getLogger("vllm").addHandler(took)
    start = time.perf_counter()
    out = {"model": model, "load_format": load_format}
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
        out["load_s"] = took.seconds
        del llm
    except Exception as e:  # noqa: BLE001 (reported to the test)
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        logging.getLogger("vllm").removeHandler(took)
        gc.collect()
    return out


def main():
    extra = json.loads(os.environ.get("WL_EXTRA", "{}"))
    for arg in sys.argv[1:]:
        model, _, load_format = arg.rpartition("=")
        print("RESULT " + json.dumps(run(model, load_format, extra)), flush=True)


if __name__ == "__main__":
    main()
