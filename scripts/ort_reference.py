#!/usr/bin/env python3
"""ONNX Runtime reference for the Candle detector, and its speed on the same model.

  ort_reference.py detect MODEL.onnx IMAGE... [--conf 0.25 --iou 0.45]   -> JSON lines (fixture)
  ort_reference.py bench  MODEL.onnx IMAGE [--runs 10 --warmup 2]        -> {"median_ms", ...}

Independent of our Rust code: letterbox (Ultralytics geometry, PIL bilinear resize, grey 114),
RGB/255, ORT forward, decode of the exported [1, 4 + nc, anchors] output (xywh + sigmoid
scores), per-class greedy NMS. Used to make tests/fixtures/ort_reference.jsonl.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort
from PIL import Image


def letterbox(path, size):
    img = Image.open(path).convert("RGB")
    w, h = img.size
    r = min(size / w, size / h)
    nw, nh = max(1, min(size, round(w * r))), max(1, min(size, round(h * r)))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    px, py = (size - nw) // 2, (size - nh) // 2
    canvas = np.full((size, size, 3), 114, dtype=np.uint8)
    canvas[py:py + nh, px:px + nw] = np.asarray(img)
    x = canvas.astype(np.float32).transpose(2, 0, 1)[None] / 255.0
    return np.ascontiguousarray(x), (w, h, r, px, py)


def iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def postprocess(out, geom, names, conf, iou_t, max_det=300):
    w, h, r, px, py = geom
    pred = out[0]  # [4 + nc, anchors]
    boxes, scores = pred[:4].T, pred[4:].T
    cls = scores.argmax(1)
    best = scores.max(1)
    keep = best >= conf
    cands = []
    for (cx, cy, bw, bh), c, s in zip(boxes[keep], cls[keep], best[keep]):
        cands.append((float(s), int(c), [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]))
    cands.sort(key=lambda t: -t[0])
    kept = []
    for s, c, b in cands:
        if len(kept) >= max_det:
            break
        if all(k[1] != c or iou(k[2], b) <= iou_t for k in kept):
            kept.append((s, c, b))
    dets = []
    for s, c, b in kept:
        x1, y1, x2, y2 = b
        bb = [min(max((x1 - px) / r, 0), w), min(max((y1 - py) / r, 0), h),
              min(max((x2 - px) / r, 0), w), min(max((y2 - py) / r, 0), h)]
        dets.append({"label": names[c], "class_id": c, "confidence": round(float(s), 4),
                     "bbox": [round(float(v), 2) for v in bb]})
    return dets


def session(model, threads):
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["detect", "bench"])
    ap.add_argument("model")
    ap.add_argument("images", nargs="+")
    ap.add_argument("--conf", type=float, default=0.25)
    ap.add_argument("--iou", type=float, default=0.45)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    sess = session(a.model, a.threads)
    inp = sess.get_inputs()[0]
    size = inp.shape[2] if isinstance(inp.shape[2], int) else 640
    meta = sess.get_modelmeta().custom_metadata_map
    names = eval(meta.get("names", "{}"), {"__builtins__": {}})  # "{0: 'Normal', 1: 'Fall'}"
    names = [names[i] for i in sorted(names)]
    if a.mode == "detect":
        for path in a.images:
            x, geom = letterbox(path, size)
            out = sess.run(None, {inp.name: x})[0]
            dets = postprocess(out, geom, names, a.conf, a.iou)
            print(json.dumps({"image": os.path.basename(path), "width": geom[0], "height": geom[1],
                              "detections": dets}))
    else:
        x, _ = letterbox(a.images[0], size)
        for _ in range(a.warmup):
            sess.run(None, {inp.name: x})
        times = []
        for _ in range(a.runs):
            t = time.perf_counter()
            sess.run(None, {inp.name: x})
            times.append((time.perf_counter() - t) * 1e3)
        times.sort()
        p90 = times[round((len(times) - 1) * 0.9)]
        print(json.dumps({"median_ms": round(statistics.median(times), 2), "p90_ms": round(p90, 2),
                          "runs": len(times), "threads": a.threads or os.cpu_count(),
                          "onnxruntime": ort.__version__, "size": size}))


if __name__ == "__main__":
    sys.exit(main())
