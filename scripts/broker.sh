#!/usr/bin/env bash
# The test rig's Kafka-protocol broker: tansu (Apache-2.0), on loopback only, in-memory storage.
#
#   scripts/broker.sh install          # build into ~/.cache/edge-vision/tools (~15 min once)
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

# tansu 0.6.0 has bugs our tests walk into, so we build it from its crates.io sources with
# small fixes, one patch per crate in scripts/tansu/ (CRATE.patch; README.md there says what
# each fixes): fetches inside a batch, ListOffsets' latest offset, expired group members,
# TLS (--cert with --key, and the handshake itself) and SCRAM users for the memory engine
# (`TANSU_SCRAM_USERS=FILE` of user:password lines).
# Crate checksums are pinned (the ones crates.io's index holds). The build directory is kept
# in the cache, so changing a patch rebuilds only the patched crates.
TANSU_PATCHES="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/tansu"
declare -A TANSU_SHA256=(
  [tansu]=4fdd85473ec265140488cf8d55e82b844f5c051c8916fabdd4a71156ac053f6d
  [tansu-storage]=720d2ed8e6010c70f7f06e5af5a7274ebbf6e42fdcd9e46de542b10dc4d2f35d
  [tansu-broker]=93c1e91b40c2a706dfdbe9a795c08c70918c874ad23f6e0e87564cc0a180e720
  [tansu-cli]=600469bbf4252bf48b922abc2b582e3778533cd52ae59e7b6f51d307b4523965
)
STAMP="$TOOLS/bin/tansu.build"

install() {
  local want
  want="tansu $TANSU_VERSION + $(cat "$TANSU_PATCHES"/*.patch | sha256sum | cut -c1-16)"
  if [ -x "$TANSU" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
    echo "$TANSU"; return
  fi
  echo "building $want (cargo build from crates.io sources, ~15 min the first time)" >&2
  local build="$TOOLS/tansu-build" src crate
  src="$build/src"
  rm -rf "$src" && mkdir -p "$src"
  fetch_crate() { # NAME
    curl -sSfL --retry 3 -o "$src/$1.crate" "https://static.crates.io/crates/$1/$1-$TANSU_VERSION.crate"
    echo "${TANSU_SHA256[$1]}  $src/$1.crate" | sha256sum -c --quiet - >&2
    tar xzf "$src/$1.crate" -C "$src"
  }
  fetch_crate tansu
  printf '\n[patch.crates-io]\n' >>"$src/tansu-$TANSU_VERSION/Cargo.toml"
  for p in "$TANSU_PATCHES"/*.patch; do
    crate="$(basename "$p" .patch)"
    fetch_crate "$crate"
    patch -s -p1 -d "$src/$crate-$TANSU_VERSION" <"$p" >&2
    printf '%s = { path = "../%s-%s" }\n' "$crate" "$crate" "$TANSU_VERSION" \
      >>"$src/tansu-$TANSU_VERSION/Cargo.toml"
  done
  # The crate's own Cargo.lock pins every other dependency; only the patched crates' sources
  # change.
  CARGO_TARGET_DIR="$build/target" cargo build --release --features dynostore --bin tansu \
    --manifest-path "$src/tansu-$TANSU_VERSION/Cargo.toml" >&2
  mkdir -p "$TOOLS/bin"
  cp "$build/target/release/tansu" "$TANSU.tmp" && mv "$TANSU.tmp" "$TANSU"
  echo "$want" >"$STAMP"
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
