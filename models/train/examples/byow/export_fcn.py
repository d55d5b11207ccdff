#!/usr/bin/env python3
"""Bring your own weights: a small FCN built outside Outpost, exported to
safetensors with PyTorch's parameter names, plus reference predictions.

This mirrors what a PyTorch user does with
`safetensors.torch.save_file(model.state_dict(), "model.safetensors")` for

    class Block(nn.Module):          # conv -> batch norm -> ReLU
        def __init__(s, cin, cout, k):
            super().__init__()
            s.conv = nn.Conv1d(cin, cout, k, padding="same")
            s.norm = nn.BatchNorm1d(cout)
    class Fcn(nn.Module):
        def __init__(s):
            super().__init__()
            s.blocks = nn.ModuleList([Block(3, 8, 7), Block(8, 16, 5), Block(16, 8, 3)])
            s.head = nn.Linear(8, 3)
        def forward(s, x):
            for b in s.blocks: x = F.relu(b.norm(b.conv(x)))
            return s.head(x.mean(dim=2))

It needs only the Python standard library (the network is small), so it runs
anywhere: weights are seeded pseudo-random numbers, the forward pass is
written out, and the safetensors file is written by hand (8-byte header
length, JSON header, little-endian f32 data).

Usage: export_fcn.py OUT_DIR
Writes OUT_DIR/model.safetensors, OUT_DIR/manifest.json (an Outpost manifest
without file hashes: `outpost-train import` adds them) and
OUT_DIR/reference.json (inputs and the softmax outputs expected).
"""
import json
import math
import os
import random
import struct
import sys

CHANNELS, LENGTH, CLASSES = 3, 32, 3
FILTERS, KERNELS = [8, 16, 8], [7, 5, 3]
EPS = 1e-5

rng = random.Random(1234)


def rand(shape, scale):
    n = 1
    for d in shape:
        n *= d
    return [rng.uniform(-scale, scale) for _ in range(n)]


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


tensors = {}  # name -> (shape, flat list)
cin = CHANNELS
for i, (f, k) in enumerate(zip(FILTERS, KERNELS)):
    p = f"blocks.{i}"
    tensors[f"{p}.conv.weight"] = ([f, cin, k], rand([f, cin, k], 1.0 / math.sqrt(cin * k)))
    tensors[f"{p}.conv.bias"] = ([f], rand([f], 0.1))
    tensors[f"{p}.norm.weight"] = ([f], [1.0 + v for v in rand([f], 0.2)])
    tensors[f"{p}.norm.bias"] = ([f], rand([f], 0.1))
    tensors[f"{p}.norm.running_mean"] = ([f], rand([f], 0.2))
    tensors[f"{p}.norm.running_var"] = ([f], [1.0 + abs(v) for v in rand([f], 0.5)])
    cin = f
tensors["head.weight"] = ([CLASSES, cin], rand([CLASSES, cin], 1.0 / math.sqrt(cin)))
tensors["head.bias"] = ([CLASSES], rand([CLASSES], 0.1))
# Store what the file holds (f32), and compute with exactly those values.
tensors = {k: (s, [f32(v) for v in d]) for k, (s, d) in tensors.items()}


def conv1d_same(x, w, b, cout, cin, k):
    """x: [cin][L]; PyTorch padding="same" with an odd kernel: (k-1)/2 each side."""
    pad = (k - 1) // 2
    n = len(x[0])
    out = []
    for o in range(cout):
        row = []
        for t in range(n):
            acc = b[o]
            for c in range(cin):
                base = (o * cin + c) * k
                for j in range(k):
                    src = t + j - pad
                    if 0 <= src < n:
                        acc += w[base + j] * x[c][src]
            row.append(acc)
        out.append(row)
    return out


def forward(x):
    h = x
    cin = CHANNELS
    for i, (f, k) in enumerate(zip(FILTERS, KERNELS)):
        p = f"blocks.{i}"
        h = conv1d_same(h, tensors[f"{p}.conv.weight"][1], tensors[f"{p}.conv.bias"][1], f, cin, k)
        g, be = tensors[f"{p}.norm.weight"][1], tensors[f"{p}.norm.bias"][1]
        rm, rv = tensors[f"{p}.norm.running_mean"][1], tensors[f"{p}.norm.running_var"][1]
        h = [[max(0.0, (v - rm[c]) / math.sqrt(rv[c] + EPS) * g[c] + be[c]) for v in h[c]] for c in range(f)]
        cin = f
    pooled = [sum(row) / len(row) for row in h]
    w, b = tensors["head.weight"][1], tensors["head.bias"][1]
    logits = [b[o] + sum(w[o * cin + c] * pooled[c] for c in range(cin)) for o in range(CLASSES)]
    m = max(logits)
    e = [math.exp(v - m) for v in logits]
    s = sum(e)
    return [v / s for v in e]


def write_safetensors(path):
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        shape, data = tensors[name]
        blob = struct.pack(f"<{len(data)}f", *data)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * ((8 - len(head) % 8) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(head)))
        fh.write(head)
        for blob in blobs:
            fh.write(blob)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "."
    os.makedirs(out, exist_ok=True)
    write_safetensors(os.path.join(out, "model.safetensors"))
    inputs = [[[f32(rng.gauss(0, 1)) for _ in range(LENGTH)] for _ in range(CHANNELS)] for _ in range(4)]
    reference = {"inputs": inputs, "probabilities": [forward(x) for x in inputs]}
    with open(os.path.join(out, "reference.json"), "w") as fh:
        json.dump(reference, fh)
    manifest = {
        "schema": 1,
        "name": "byow-fcn",
        "version": "0.1.0",
        "task": "classifier",
        "architecture": {"kind": "fcn", "filters": FILTERS, "kernels": KERNELS},
        "input": {"kind": "raw", "channels": CHANNELS, "length": LENGTH},
        "normalization": {"kind": "none"},
        "labels": ["a", "b", "c"],
        "weights": "model.bpk",
        "metrics": {},
        "created_at": "2026-11-23T00:00:00Z",
        "files": {},
    }
    with open(os.path.join(out, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=2)
    print(f"wrote {out}/model.safetensors, manifest.json, reference.json")


if __name__ == "__main__":
    main()
