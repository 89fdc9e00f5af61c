#!/usr/bin/env bash
# One command for a fresh Linux machine (Debian 12/13 or similar, Python >= 3.10, apt-get for the build-time headers).
#   bash tools/setup.sh demo   # venv + build + whisper-base fetched/converted + the bundled sample transcribed on the EP
#   bash tools/setup.sh test   # venv + build + the test suite
#   bash tools/setup.sh env    # venv + build only
# Environment: XDNA_VENV (default .venv in the repo), PYTHON (default python3).
set -euo pipefail
mode=${1:-env}
case "$mode" in demo|test|env) ;; *) echo "usage: $0 demo|test|env" >&2; exit 2 ;; esac
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${XDNA_VENV:-$repo/.venv}
python=${PYTHON:-python3}

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "Python >= 3.10 required" >&2; exit 2; }
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip() { "$venv/bin/python" -m pip "$@"; }

# PyTorch is only needed to convert/export Whisper. Installed first and pinned to the CPU build this project is
# tested with, so that nothing later pulls a multi-GB CUDA build.
"$venv/bin/python" -c 'import torch' 2>/dev/null || pip install -q "torch==2.13.0"
extras="whisper,server"
[ "$mode" = test ] && extras="whisper,server,test"
pip install -q "$repo[$extras]"

case "$mode" in
  demo)
    cd "$repo"
    "$venv/bin/xdna" info
    "$venv/bin/xdna" model fetch base
    "$venv/bin/xdna" transcribe --model base  # no FILE: the bundled real-speech sample
    ;;
  test)
    cd "$repo/tests"  # run against the installed package, not the source tree
    "$venv/bin/python" -m pytest -q -p no:cacheprovider "$repo/tests"
    ;;
esac
