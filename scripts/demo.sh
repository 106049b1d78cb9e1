#!/usr/bin/env bash
# The main job on embedded defaults: fetch the real fall-detection YOLOv8s and the two fixture
# photos, import the checkpoint natively, and print what the detector sees in each photo.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edge-vision/target}"
F="$(bash scripts/fetch-fixtures.sh)"
cargo build --release --quiet --bin edge-agent
BIN="$CARGO_TARGET_DIR/release/edge-agent"
[ -s "$F/fall.safetensors" ] || "$BIN" model import "$F/fall-best.pt" -o "$F/fall.safetensors"
mkdir -p out
"$BIN" detect --model "$F/fall.safetensors" --annotate out "$F/bus.jpg" "$F/zidane.jpg"
echo "annotated images: out/"
