#!/usr/bin/env bash
# `edge-agent run` end to end on this machine, in one run:
#   * pipeline fps (capture thread decoding JPEGs -> inference -> outbox -> Kafka) vs bare
#     inference fps (`edge-vision-dev bench --images`: whole detections over the same frames, already
#     decoded) -> ratio (bar: >= 0.95);
#   * peak RSS of the running agent with the real YOLOv8s at 640 (goal: <= 200 MB);
#   * cold start to first detection (process start -> first committed detection event).
#
#   bash scripts/bench-agent.sh [FRAMES]
#
# The broker is a local tansu (scripts/broker.sh); frames are the fixture photos repeated.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-60}"
F="$(bash scripts/fetch-fixtures.sh)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edge-vision/target}"
cargo build --release --quiet --bin edge-agent --bin edge-vision-dev
DEV="$CARGO_TARGET_DIR/release/edge-vision-dev"
BIN="$CARGO_TARGET_DIR/release/edge-agent"
MODEL="$F/fall.safetensors"
[ -s "$MODEL" ] || "$BIN" model import "$F/fall-best.pt" -o "$MODEL" >&2
TANSU="$(bash scripts/broker.sh install)"
T=$(mktemp -d)
PORT=$((20000 + RANDOM % 20000))
"$TANSU" broker --listener-url "tcp://127.0.0.1:$PORT" --advertised-listener-url "tcp://127.0.0.1:$PORT" \
  --storage-engine memory://tansu/ >"$T/broker.log" 2>&1 &
BROKER=$!
trap 'kill $BROKER 2>/dev/null || true; rm -rf "$T"' EXIT
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.1; done
"$TANSU" topic create bench --broker "tcp://127.0.0.1:$PORT" --partitions 1 >/dev/null
mkdir -p "$T/frames"
for i in $(seq -w 1 "$N"); do
  if [ $((10#$i % 2)) = 0 ]; then cp "$F/bus.jpg" "$T/frames/f$i.jpg"; else cp "$F/zidane.jpg" "$T/frames/f$i.jpg"; fi
done

RESULTS="$T/results"
for SIZE in 640 320; do
  "$DEV" bench --model "$MODEL" --size "$SIZE" --images "$T/frames" --runs 1 >"$T/bare$SIZE"
  cat >"$T/agent$SIZE.toml" <<TOML
device_id = "bench"
[source]
kind = "images"
images = "$T/frames"
fps = 0.0
[detector]
model = "$MODEL"
input_size = $SIZE
[outbox]
path = "$T/outbox$SIZE.sqlite"
[uplink]
brokers = "127.0.0.1:$PORT"
topic = "bench"
[metrics]
listen = ""
TOML
  START=$(date +%s%N)
  /usr/bin/time -v "$BIN" --config "$T/agent$SIZE.toml" run --progress 2>"$T/run$SIZE.err" \
    | while read -r line; do
        case "$line" in *'"kind":"detection"'*) [ -e "$T/first$SIZE" ] || echo $(( ($(date +%s%N) - START) / 1000000 )) >"$T/first$SIZE";; esac
      done
  echo "$SIZE" >>"$RESULTS"
done

python3 - "$T" <<'PY'
import json, os, sys, datetime, platform
t = sys.argv[1]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(f"Date: {datetime.date.today()}  Machine: {cpu}, {os.cpu_count()} cores\n")
print("| input | bare inference fps | pipeline fps | ratio | frames | peak RSS MiB | cold start to first detection ms | delivered |")
print("|---|---|---|---|---|---|---|---|")
for size in (640, 320):
    bare = json.load(open(f"{t}/bare{size}"))
    err = open(f"{t}/run{size}.err").read().splitlines()
    rep = next(json.loads(l) for l in reversed(err) if l.startswith("{"))
    rss = next(int(l.split(":")[1]) // 1024 for l in err if "Maximum resident set size" in l)
    first = open(f"{t}/first{size}").read().strip()
    ratio = rep["pipeline_fps"] / bare["fps"]
    print(f"| {size} | {bare['fps']} | {rep['pipeline_fps']} | {ratio:.3f} | {rep['frames_processed']} | {rss} | {first} | {rep['uplink']['delivered']} |")
PY
