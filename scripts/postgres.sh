#!/usr/bin/env bash
# Makes sure PostgreSQL answers on 127.0.0.1:5432 with trust auth on loopback (the test rig and
# the demo): starts the local cluster, or installs Debian's postgresql first on a machine
# without one.
set -euo pipefail
if pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  exit 0
fi
if ! command -v pg_ctlcluster >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  # A fresh install asks for passwords on TCP; the tests use trust auth on loopback only.
  HBA="$(ls /etc/postgresql/*/main/pg_hba.conf | head -1)"
  sed -i '1i host all all 127.0.0.1/32 trust' "$HBA"
fi
pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
pg_isready -h 127.0.0.1 -p 5432
