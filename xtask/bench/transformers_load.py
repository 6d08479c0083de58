"""``from_pretrained`` of a transformers model directory, stock (``stock``), under
``weightlift.patch()`` (``weightlift``) or ``weightlift.patch(conversion=False)`` (``plain``),
then one byte of every page of every parameter touched (its own bytes: a parameter that is a
view of a file's mapping does not fault the rest of the file in). Imports are done before
timing, the model's module included (its first import alone takes seconds)."""

import sys
import time
import warnings

warnings.filterwarnings("ignore")
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from sample import emit, start

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
mode, path = sys.argv[1], sys.argv[2]
config = AutoConfig.from_pretrained(path)
AutoModelForCausalLM._model_mapping[type(config)]
if mode != "stock":
    import weightlift
    weightlift.patch(conversion=(mode == "weightlift"))
t = start()
model = AutoModelForCausalLM.from_pretrained(path)
seen, total = set(), 0
for p in model.parameters():
    if p.numel() == 0 or (p.data_ptr(), p.numel()) in seen:
        continue
    seen.add((p.data_ptr(), p.numel()))
    total += int(p.detach().reshape(-1).view(torch.uint8)[::4096].sum())
emit(time.perf_counter() - t)
