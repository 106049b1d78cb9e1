#!/usr/bin/env bash
# The test rig's Kafka-protocol broker: tansu (Apache-2.0), on loopback only, in-memory storage.
#
#   scripts/broker.sh install          # cargo install into ~/.cache/edge-vision/tools (~15 min once)
#   scripts/broker.sh start [PORT]     # default 9092; prints the bootstrap address
#   scripts/broker.sh topic NAME [PORT] [PARTITIONS]
#   scripts/broker.sh stop [PORT]
#
# Apache Kafka itself cannot be downloaded on our machines; tansu speaks the Kafka protocol
# well enough for librdkafka's idempotent producer and consumer groups. Topics must be created
# explicitly. Tests start their own brokers on free ports through the same binary.
set -euo pipefail
TOOLS="${EDGE_VISION_CACHE:-$HOME/.cache/edge-vision}/tools"
TANSU="$TOOLS/bin/tansu"
TANSU_VERSION=0.6.0
RUN="${EDGE_VISION_CACHE:-$HOME/.cache/edge-vision}/run"
mkdir -p "$RUN"

install() {
  if [ -x "$TANSU" ] && "$TANSU" --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
    echo "$TANSU"; return
  fi
  echo "installing tansu $TANSU_VERSION (cargo install, ~15 min the first time)" >&2
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore --root "$TOOLS" >&2
  echo "$TANSU"
}

case "${1:-}" in
  install) install ;;
  start)
    PORT="${2:-9092}"
    install >/dev/null
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
      echo "something already listens on 127.0.0.1:$PORT" >&2; exit 1
    fi
    nohup "$TANSU" broker --listener-url "tcp://127.0.0.1:$PORT" \
      --advertised-listener-url "tcp://127.0.0.1:$PORT" --storage-engine memory://tansu/ \
      >"$RUN/tansu-$PORT.log" 2>&1 &
    echo $! >"$RUN/tansu-$PORT.pid"
    for _ in $(seq 1 100); do
      if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then echo "127.0.0.1:$PORT"; exit 0; fi
      sleep 0.1
    done
    echo "tansu did not start; see $RUN/tansu-$PORT.log" >&2; exit 1 ;;
  topic)
    "$TANSU" topic create "$2" --broker "tcp://127.0.0.1:${3:-9092}" --partitions "${4:-3}" ;;
  stop)
    PORT="${2:-9092}"
    if [ -f "$RUN/tansu-$PORT.pid" ]; then
      kill "$(cat "$RUN/tansu-$PORT.pid")" 2>/dev/null || true
      rm -f "$RUN/tansu-$PORT.pid"
    fi ;;
  *) echo "usage: $0 install|start [PORT]|topic NAME [PORT] [PARTITIONS]|stop [PORT]" >&2; exit 2 ;;
esac
