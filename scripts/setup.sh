#!/usr/bin/env bash
# Create .venv with everything: serving, clients, load tests, tests, and the export-time NeMo/torch.
# Idempotent: a second run only checks. Usage: scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(cat requirements.txt requirements-export.txt constraints.txt | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip wheel
  .venv/bin/python -m pip install -q -c constraints.txt -r requirements.txt -r requirements-export.txt
  touch "$stamp"
fi
# the embedded tritonserver needs the Python backend stub for this interpreter next to its backends
.venv/bin/python -c "from sortformer_triton.local_server import find_tritonserver; find_tritonserver()"
