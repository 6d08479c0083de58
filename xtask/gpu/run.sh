#!/usr/bin/env bash
# weightlift's GPU run, from the bundle `cargo xtask gpu-bundle` builds (target/gpu-bundle):
#   bash target/gpu-bundle/run.sh [run.py options: --budget 450 --size 4GiB --device cuda:0 ...]
# Installs the bundle's wheels (weightlift, fastsafetensors, instanttensor, runai-model-streamer)
# into a private folder without network, then runs run.py. Results: $OUT/results.json,
# $OUT/summary.md and $OUT/log ($OUT defaults to the bundle's out/).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-$here/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
exec > >(tee -a "$OUT/log") 2>&1

echo "== weightlift GPU run $(date -u +%FT%TZ) on $(hostname); bundle $here"
site="${WL_SITE:-/tmp/weightlift-gpu-site}"
rm -rf "$site"
# One wheel at a time: a peer that does not install must not keep the others out.
for wheel in "$here"/wheels/*.whl; do
    if ! "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheel"; then
        echo "warning: $(basename "$wheel") did not install here; the loaders that need it will say so"
    fi
done
export PYTHONPATH="$site:$here${PYTHONPATH:+:$PYTHONPATH}"
"$py" "$here/run.py" --out "$OUT" "$@"
rc=$?
echo "== run.py exited $rc"
exit $rc
