#!/usr/bin/env bash
# Runs safetensors' own Python test-suite against weightlift: the sdist of the installed
# safetensors version is fetched from PyPI (it holds bindings/python/tests), unpacked into a
# temporary directory, and its loading tests run with weightlift standing in for
# safetensors' native module (stand_in.py). Nothing of safetensors is kept in this repository.
#
# Usage: run.sh PYTHON [pytest args...]   (PYTHON: the interpreter with weightlift installed)
set -euo pipefail
python="$1"
shift
here="$(cd "$(dirname "$0")" && pwd)"
version="$("$python" -c 'import importlib.metadata as m; print(m.version("safetensors"))')"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# maturin must be on PATH: pip prepares the sdist's metadata with it.
PATH="$(dirname "$python"):$PATH" "$python" -m pip download -q --no-deps --no-binary :all: \
    --no-build-isolation "safetensors==$version" -d "$work"
tar xzf "$work"/safetensors-"$version".tar.gz -C "$work"
# The tests write their files relative to bindings/python, as safetensors' CI runs them.
cd "$work/safetensors-$version/bindings/python"
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$python" -m pytest -p stand_in -q \
    -p no:cacheprovider tests/test_simple.py tests/test_pt_comparison.py \
    tests/test_pt_model.py tests/test_handle.py tests/test_threadable.py \
    tests/test_multithreaded.py tests/test_pread_backend.py "$@"
