#!/usr/bin/env bash
# Create .venv with everything: serving, clients, load tests, tests, and the export-time NeMo/torch.
# Idempotent: a second run only checks. Usage: scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# Debian packages: Chromium and its chromedriver (the web gateway's browser test drives them), espeak-ng and
# sox (speech-like conversations for the parity suite: sortformer_triton.samples.espeak_conversation), haproxy
# (replicas behind a proxy with sequence affinity: sortformer_triton.replicas).
missing=""
for tool in chromium:chromium chromedriver:chromium-driver espeak-ng:espeak-ng sox:sox haproxy:haproxy; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${tool%%:*}" ] || missing="$missing ${tool##*:}"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="none"; fi
  if [ "$SUDO" != "none" ] && command -v apt-get >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
  else
    echo "setup.sh: missing Debian packages:$missing and no root to install them (apt-get install$missing);" \
         "the browser, espeak-ng parity and replica tests will fail" >&2
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(cat requirements.txt requirements-export.txt constraints.txt | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip wheel
  .venv/bin/python -m pip install -q -c constraints.txt -r requirements.txt -r requirements-export.txt
  touch "$stamp"
fi
# NGC 24.10's onnxruntime (1.19.2) in a venv of its own: tests load every production graph in it
.venv/bin/python -m loadtest.ort_versions --install 1.19.2 >/dev/null
# the embedded tritonserver needs the Python backend stub for this interpreter next to its backends
.venv/bin/python -c "from sortformer_triton.local_server import find_tritonserver; find_tritonserver()"
