#!/usr/bin/env bash
# Store-and-forward benchmarks, one run, local tansu broker on loopback:
#   - enqueue rate with group commit (fsync per batch) and bytes written to disk per event
#   - drain rate of `edge-agent outbox drain` vs a bare rdkafka producer sending the same
#     payloads to the same broker (ratio)
#   - time to drain a 864,000-event backlog (24 h at 10 events/s)
#
#   bash scripts/bench-uplink.sh [EVENTS]     (default 864000)
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-864000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edge-vision/target}"
cargo build --release --quiet --bin edge-agent --bin edge-vision-dev
BIN="$CARGO_TARGET_DIR/release/edge-agent"
DEV="$CARGO_TARGET_DIR/release/edge-vision-dev"
bash scripts/broker.sh install >/dev/null
PORT=$((20000 + RANDOM % 20000))
bash scripts/broker.sh start "$PORT" >/dev/null
trap 'bash scripts/broker.sh stop "$PORT"; rm -rf "$T"' EXIT
T="$(mktemp -d)"
bash scripts/broker.sh topic bench-agent "$PORT" 3 >/dev/null
bash scripts/broker.sh topic bench-raw "$PORT" 3 >/dev/null

echo "enqueue ($N events, batches of 100 and 1000, durability full):" >&2
"$DEV" outbox fill --outbox "$T/b100.sqlite" --count 100000 --batch 100 --json >"$T/fill100"
"$DEV" outbox fill --outbox "$T/outbox.sqlite" --count "$N" --batch 1000 --max-bytes 4000000000 --json >"$T/fill"
# Three rounds, each on fresh copies of the same outbox; agent and bare producer alternate.
for r in 1 2 3; do
  cp "$T/outbox.sqlite" "$T/a.sqlite"; cp "$T/outbox.sqlite" "$T/r.sqlite"
  bash scripts/broker.sh topic "bench-agent-$r" "$PORT" 3 >/dev/null
  bash scripts/broker.sh topic "bench-raw-$r" "$PORT" 3 >/dev/null
  # Let the kernel write back what was just written, so writeback does not run during a drain.
  sync; sleep 2
  echo "round $r: drain with edge-agent" >&2
  "$BIN" outbox drain --outbox "$T/a.sqlite" --brokers "127.0.0.1:$PORT" --topic "bench-agent-$r" --exit-when-empty --fifo --max-bytes 4000000000 >"$T/drain$r"
  sync; sleep 2
  echo "round $r: bare rdkafka producer, same payloads" >&2
  "$DEV" outbox raw-send --outbox "$T/r.sqlite" --brokers "127.0.0.1:$PORT" --topic "bench-raw-$r" >"$T/raw$r"
  rm -f "$T/a.sqlite"* "$T/r.sqlite"*
done
python3 - "$T" "$N" <<'PY'
import json, os, sys, datetime
t, n = sys.argv[1], int(sys.argv[2])
rd = lambda f: json.load(open(os.path.join(t, f)))
f100, f = rd("fill100"), rd("fill")
rounds = [(rd(f"drain{k}"), rd(f"raw{k}")) for k in (1, 2, 3)]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"Date: {datetime.date.today()}  Machine: {cpu}, {os.cpu_count()} cores  Broker: tansu 0.6.0 (memory storage), loopback, same machine\n")
print("| measure | value |\n|---|---|")
print(f"| enqueue, batches of 100, fsync per batch | {f100['events_per_sec']:.0f} events/s, {f100['disk_bytes_per_event']:.0f} B written to disk per event |")
print(f"| enqueue, batches of 1000, fsync per batch | {f['events_per_sec']:.0f} events/s, {f['disk_bytes_per_event']:.0f} B written to disk per event |")
print(f"| outbox file for {n} events | {f['file_bytes'] / 1e6:.1f} MB |")
ratios = []
for k, (d, r) in enumerate(rounds, 1):
    ratio = d['msgs_per_sec'] / r['msgs_per_sec']
    ratios.append(ratio)
    print(f"| round {k}: edge-agent drain / bare producer | {d['delivered']} msgs in {d['seconds']:.2f} s ({d['msgs_per_sec']:.0f}/s) / {r['sent']} in {r['seconds']:.2f} s ({r['msgs_per_sec']:.0f}/s) = {ratio:.2f} |")
med = sorted(ratios)[1]
dmed = sorted(d['seconds'] for d, _ in rounds)[1]
print(f"\nRatio edge-agent / bare producer, median of 3: {med:.2f} (bar >= 0.5); rounds {', '.join(f'{x:.2f}' for x in ratios)}")
print(f"Backlog of {n} events drained in {dmed:.1f} s, median (goal <= 120 s)")
PY
