"""The Python peer of `cargo bench -p outpost-tests --bench pipeline`: the
same job as `outpost replay` with NumPy and ONNX Runtime, written the way a
data scientist would write it for a gateway, vectorized where NumPy allows.

    pipeline.py MODEL.onnx MANIFEST.json READINGS.jsonl WINDOW_MS SIZE HOP

Reads JSON Lines readings ({"sensor", "ts", "values"}), keeps for each sensor
sliding windows of SIZE samples every HOP samples, normalizes them with the
manifest's per-channel statistics, runs the ONNX model on batches of 64
windows, and aggregates per sensor and WINDOW_MS window of event time:
readings, inferences (attributed to the window holding their last sample)
and inferences per class. Prints one JSON object: timings, counts and the
class totals, which the benchmark compares with Outpost's.

With `--ready` it loads everything, prints `ready` and the time it took, and
exits (the start-up time of the footprint comparison).
"""

import json
import sys
import time

t0 = time.perf_counter()
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    model_path, manifest_path = args[0], args[1]
    manifest = json.load(open(manifest_path))
    norm = manifest["normalization"]
    channels = manifest["input"]["channels"]
    mean = np.asarray(norm["mean"], dtype=np.float32).reshape(1, channels, 1)
    std = np.asarray(norm["std"], dtype=np.float32).reshape(1, channels, 1)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    if "--ready" in sys.argv:
        print(json.dumps({"ready_s": time.perf_counter() - t0}))
        return
    input_path = args[2]
    window_ms, size, hop = int(args[3]), int(args[4]), int(args[5])

    start = time.perf_counter()
    # 1. Parse; per sensor, timestamps and values in arrival order.
    per_sensor = {}
    readings = 0
    with open(input_path) as f:
        for line in f:
            try:
                r = json.loads(line)
                values = r["values"]
                ts = int(r["ts"])
            except (ValueError, KeyError, TypeError):
                continue
            if len(values) != channels:
                continue
            s = per_sensor.setdefault(r["sensor"], ([], []))
            s[0].append(ts)
            s[1].append(values)
            readings += 1
    parsed = time.perf_counter()

    # 2. Windows (vectorized per sensor), normalized.
    batches, owners = [], []
    for sensor, (ts, values) in per_sensor.items():
        x = np.asarray(values, dtype=np.float32).T  # [channels, n]
        n = x.shape[1]
        if n < size:
            continue
        starts = np.arange(0, n - size + 1, hop)
        idx = starts[:, None] + np.arange(size)[None, :]
        w = x[:, idx].transpose(1, 0, 2)  # [windows, channels, size]
        batches.append((w - mean) / std)
        ends = np.asarray(ts, dtype=np.int64)[starts + size - 1]
        owners.append((sensor, ends, np.asarray(ts, dtype=np.int64)))
    windows = np.concatenate(batches) if batches else np.zeros((0, channels, size), np.float32)
    windowed = time.perf_counter()

    # 3. Inference in batches of 64.
    classes = np.zeros(len(windows), dtype=np.int64)
    for i in range(0, len(windows), 64):
        probs = session.run(None, {"input": windows[i : i + 64]})[0]
        classes[i : i + 64] = probs.argmax(axis=1)
    inferred = time.perf_counter()

    # 4. Aggregates per sensor and event-time window.
    labels = manifest["labels"]
    aggregates = {}
    offset = 0
    for sensor, ends, ts in owners:
        k = len(ends)
        buckets = ends - ends % window_ms
        for b, c in zip(buckets.tolist(), classes[offset : offset + k].tolist()):
            a = aggregates.setdefault((sensor, b), {"readings": 0, "inferences": 0, "classes": [0] * len(labels)})
            a["inferences"] += 1
            a["classes"][c] += 1
        rb, counts = np.unique(ts - ts % window_ms, return_counts=True)
        for b, n in zip(rb.tolist(), counts.tolist()):
            a = aggregates.setdefault((sensor, b), {"readings": 0, "inferences": 0, "classes": [0] * len(labels)})
            a["readings"] += n
        offset += k
    done = time.perf_counter()
    totals = [0] * len(labels)
    for a in aggregates.values():
        totals = [x + y for x, y in zip(totals, a["classes"])]
    print(
        json.dumps(
            {
                "readings": readings,
                "windows": int(len(windows)),
                "aggregates": len(aggregates),
                "classes": dict(zip(labels, totals)),
                "seconds": done - start,
                "stages": {
                    "parse": parsed - start,
                    "window": windowed - parsed,
                    "infer": inferred - windowed,
                    "aggregate": done - inferred,
                },
                "import_s": start - t0,
            }
        )
    )


if __name__ == "__main__":
    main()
