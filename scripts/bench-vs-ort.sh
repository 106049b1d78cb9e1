#!/usr/bin/env bash
# Candle (our detector) vs ONNX Runtime on the same model, input and machine, in one run.
#
#   bash scripts/bench-vs-ort.sh [RUNS]
#
# Prints a Markdown table for docs/benchmarks.md: forward-pass median/p90 for both at 640 (the
# shipped ONNX export is fixed at 640x640), Candle alone at 320, the ratio, and peak RSS of
# each process (/usr/bin/time -v).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-20}"
F="$(bash scripts/fetch-fixtures.sh)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edge-vision/target}"
cargo build --release --quiet --bin edge-agent --bin edge-vision-dev
DEV="$CARGO_TARGET_DIR/release/edge-vision-dev"
BIN="$CARGO_TARGET_DIR/release/edge-agent"
python3 -c 'import onnxruntime, numpy, PIL' 2>/dev/null || python3 -m pip install --quiet onnxruntime numpy pillow >&2
MODEL="$F/fall.safetensors"
[ -s "$MODEL" ] || "$BIN" model import "$F/fall-best.pt" -o "$MODEL" >&2

rss() { awk -F: '/Maximum resident set size/ {gsub(/ /, "", $2); printf "%.0f", $2/1024}' "$1"; }
T=$(mktemp -d)
/usr/bin/time -v "$DEV" bench --model "$MODEL" --image "$F/bus.jpg" --size 640 --runs "$RUNS" --json >"$T/c640" 2>"$T/c640.time"
/usr/bin/time -v python3 scripts/ort_reference.py bench "$F/fall-best.onnx" "$F/bus.jpg" --runs "$RUNS" >"$T/o640" 2>"$T/o640.time"
/usr/bin/time -v "$DEV" bench --model "$MODEL" --image "$F/bus.jpg" --size 320 --runs "$RUNS" --json >"$T/c320" 2>"$T/c320.time"
python3 - "$T" <<'PY'
import json, sys, os, platform, subprocess, datetime
t = sys.argv[1]
def rd(n): return json.load(open(os.path.join(t, n)))
def rss(n):
    for l in open(os.path.join(t, n + ".time")):
        if "Maximum resident set size" in l: return int(l.split(":")[1]) // 1024
c640, o640, c320 = rd("c640"), rd("o640"), rd("c320")
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(f"Date: {datetime.date.today()}  Machine: {cpu}, {os.cpu_count()} cores  ONNX Runtime {o640['onnxruntime']}\n")
print("| engine | input | median ms | p90 ms | runs | threads | peak RSS MiB |")
print("|---|---|---|---|---|---|---|")
print(f"| Candle (edge-vision) | 640 | {c640['median_ms']} | {c640['p90_ms']} | {c640['runs']} | {c640['threads']} | {rss('c640')} |")
print(f"| ONNX Runtime (CPU EP) | 640 | {o640['median_ms']} | {o640['p90_ms']} | {o640['runs']} | {o640['threads']} | {rss('o640')} |")
print(f"| Candle (edge-vision) | 320 | {c320['median_ms']} | {c320['p90_ms']} | {c320['runs']} | {c320['threads']} | {rss('c320')} |")
print(f"\nRatio Candle/ONNX Runtime at 640 (median): {c640['median_ms'] / o640['median_ms']:.2f}x (bar: <= 2.0x, goal 1.0x)")
PY
rm -rf "$T"
