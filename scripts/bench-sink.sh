#!/usr/bin/env bash
# edge-sink vs raw COPY BINARY, in one run, and the time to catch up a lag:
#
#   bash scripts/bench-sink.sh [EVENTS] [PARTITIONS]      # default 1000000 events, 3 partitions
#   SERVER="host=127.0.0.1 user=postgres sslmode=disable" bash scripts/bench-sink.sh   # no TLS
#
# Fills a fresh topic on a local tansu broker with EVENTS synthetic events (0-3 objects each),
# then times `edge-sink` from start until the last event row is in PostgreSQL (catch-up time,
# consumer start-up included) and its rows/s from its first batch to its last; then COPY BINARY
# of the same rows straight into the same tables of a fresh database (no staging, dedupe,
# offsets or Kafka: the physical limit). Prints one JSON line; the ratio bar is >= 0.5.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-1000000}"
P="${2:-3}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edge-vision/target}"
cargo build --release --quiet --bin edge-vision-dev
bash scripts/postgres.sh
PORT=$((20000 + RANDOM % 20000))
bash scripts/broker.sh start "$PORT" >/dev/null
trap 'bash scripts/broker.sh stop "$PORT"' EXIT
bash scripts/broker.sh topic sinkbench "$PORT" "$P" >/dev/null
# Default: the built-in sslmode (prefer), i.e. TLS whenever the server offers it, as a user
# gets it; both sides of the comparison use the same connection settings.
"$CARGO_TARGET_DIR/release/edge-vision-dev" sink-bench --brokers "127.0.0.1:$PORT" --topic sinkbench --events "$N" \
  --server "${SERVER:-host=127.0.0.1 user=postgres}"
