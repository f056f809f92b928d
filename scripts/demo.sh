#!/usr/bin/env bash
# Set up, export a model for one preset (the released v2.1 weights when Hugging Face is reachable, else a
# random-init model of the real architecture), start the local tritonserver, stream a sample conversation
# through it and print the segments. Usage: scripts/demo.sh [preset]   (default: high)
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${1:-high}
scripts/setup.sh
OUT=build/demo
if [ ! -f "$OUT/local/diarizer_$PRESET/config.pbtxt" ] || [ ! -f "$OUT/local/sortformer_$PRESET/1/model.onnx" ]; then
  rm -rf "$OUT"
  if ! HF_HUB_ETAG_TIMEOUT=10 HF_HUB_DOWNLOAD_TIMEOUT=30 .venv/bin/python -m export --preset "$PRESET" --out "$OUT" --flavour local; then
    echo "The released weights are not reachable from here: exporting a random-init model of the real architecture." >&2
    .venv/bin/python -m export --model full --preset "$PRESET" --out "$OUT" --flavour local
  fi
fi
exec .venv/bin/python -m clients.demo --repository "$OUT/local" --preset "$PRESET"
