#!/usr/bin/env bash
# Create/refresh the project virtualenv (.venv) with the right torch build, then install the package.
# Without an NVIDIA GPU this pins torch==2.13.0, which pip takes from the machine's local CPU wheel (a looser
# spec would pull several GB of CUDA wheels; elsewhere give TORCH_SPEC="torch==2.13.0 --index-url
# https://download.pytorch.org/whl/cpu").  With one, it installs the default (CUDA) torch build from PyPI;
# override with TORCH_SPEC (an explicit TORCH_SPEC is always installed; the stamp includes it).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.dainr-installed"
want="$( (cat setup.py constraints.txt scripts/bootstrap.sh; echo "${TORCH_SPEC:-}") | sha1sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip -q "$@"; }
explicit=${TORCH_SPEC:+1}
if [ -z "${TORCH_SPEC:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    TORCH_SPEC="torch"
  else
    TORCH_SPEC="torch==2.13.0"
  fi
fi
# shellcheck disable=SC2086  # TORCH_SPEC may carry pip options, e.g. --index-url
if [ -n "$explicit" ] || ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  pip install $TORCH_SPEC
fi
pip install -c constraints.txt -e ".[test,fast]"  # the tested versions (constraints.txt)
# Optional: the C++ ISMRMRD tools (Debian/Ubuntu ismrmrd-tools) that tests/test_interop.py checks us against.
# Installed only when this runs as root with apt-get (CI containers), unless DAINR_NO_APT=1; else those tests skip.
if ! command -v ismrmrd_test_xml >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
    && [ -z "${DAINR_NO_APT:-}" ]; then
  apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q ismrmrd-tools >/dev/null 2>&1; }
  apt_install || { apt-get update -q >/dev/null 2>&1 && apt_install; } \
    || echo "bootstrap: could not install ismrmrd-tools; tests/test_interop.py will skip"
fi
echo "$want" > "$stamp"
