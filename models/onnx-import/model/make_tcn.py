#!/usr/bin/env python3
"""Write `tcn.onnx`, a small dilated residual convolutional classifier (an
architecture Outpost does not have), and `reference.json`, its outputs on
seeded inputs computed here in plain Python.

In a real project the ONNX file comes from `torch.onnx.export` (or any other
exporter) after training; this script writes the same kind of file with
nothing but the Python standard library, so the example builds anywhere.

    python3 models/onnx-import/model/make_tcn.py

Graph (N windows of 6 channels x 100 samples, BasicMotions' shape):
    h1 = relu(conv1d(x, 8 filters, k=3, dilation 1, pad 1))
    h2 = relu(conv1d(h1, 8 filters, k=3, dilation 2, pad 2))
    z  = mean over time of (h1 + h2)          # residual, then pooling
    p  = softmax(z @ W^T + b)                 # 4 classes
"""

import json
import math
import os
import random
import struct

C_IN, LENGTH, HIDDEN, CLASSES = 6, 100, 8, 4
HERE = os.path.dirname(os.path.abspath(__file__))


# --- a minimal protobuf writer (only what onnx.proto needs here) ---------
def varint(n):
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_varint(num, value):
    return varint(num << 3) + varint(value)


def field_bytes(num, data):
    if isinstance(data, str):
        data = data.encode()
    return varint((num << 3) | 2) + varint(len(data)) + data


def tensor(name, dims, values):
    # TensorProto: dims=1, data_type=2 (FLOAT=1), name=8, raw_data=9 (little endian)
    out = b"".join(field_varint(1, d) for d in dims)
    out += field_varint(2, 1) + field_bytes(8, name)
    out += field_bytes(9, struct.pack("<%df" % len(values), *values))
    return out


def attr_ints(name, values):
    # AttributeProto: name=1, ints=8, type=20 (INTS=7)
    out = field_bytes(1, name) + b"".join(field_varint(8, v) for v in values)
    return out + field_varint(20, 7)


def attr_int(name, value):
    # AttributeProto: name=1, i=3, type=20 (INT=2)
    return field_bytes(1, name) + field_varint(3, value) + field_varint(20, 2)


def node(op, inputs, outputs, name, attrs=()):
    # NodeProto: input=1, output=2, name=3, op_type=4, attribute=5
    out = b"".join(field_bytes(1, i) for i in inputs)
    out += b"".join(field_bytes(2, o) for o in outputs)
    out += field_bytes(3, name) + field_bytes(4, op)
    return out + b"".join(field_bytes(5, a) for a in attrs)


def value_info(name, dims):
    # ValueInfoProto{name=1, type=2 TypeProto{tensor_type=1 {elem_type=1, shape=2}}}
    shape = b""
    for d in dims:
        dim = field_bytes(2, d) if isinstance(d, str) else field_varint(1, d)
        shape += field_bytes(1, dim)
    tensor_type = field_varint(1, 1) + field_bytes(2, shape)
    return field_bytes(1, name) + field_bytes(2, field_bytes(1, tensor_type))


# --- weights and the reference forward pass ------------------------------
rng = random.Random(7)


def gaussian(n, scale):
    return [rng.gauss(0.0, scale) for _ in range(n)]


w1 = gaussian(HIDDEN * C_IN * 3, 1 / math.sqrt(C_IN * 3))
b1 = gaussian(HIDDEN, 0.1)
w2 = gaussian(HIDDEN * HIDDEN * 3, 1 / math.sqrt(HIDDEN * 3))
b2 = gaussian(HIDDEN, 0.1)
wf = gaussian(CLASSES * HIDDEN, 1 / math.sqrt(HIDDEN))
bf = gaussian(CLASSES, 0.1)
f32 = lambda v: struct.unpack("<f", struct.pack("<f", v))[0]
w1, b1, w2, b2, wf, bf = ([f32(v) for v in a] for a in (w1, b1, w2, b2, wf, bf))


def conv_relu(x, w, b, c_in, c_out, dilation):
    pad = dilation  # "same" length for kernel 3
    y = []
    for o in range(c_out):
        row = []
        for t in range(LENGTH):
            s = b[o]
            for i in range(c_in):
                for k in range(3):
                    u = t - pad + k * dilation
                    if 0 <= u < LENGTH:
                        s += w[(o * c_in + i) * 3 + k] * x[i][u]
            row.append(max(s, 0.0))
        y.append(row)
    return y


def forward(x):
    h1 = conv_relu(x, w1, b1, C_IN, HIDDEN, 1)
    h2 = conv_relu(h1, w2, b2, HIDDEN, HIDDEN, 2)
    z = [sum(a + c for a, c in zip(h1[o], h2[o])) / LENGTH for o in range(HIDDEN)]
    logits = [bf[k] + sum(wf[k * HIDDEN + j] * z[j] for j in range(HIDDEN)) for k in range(CLASSES)]
    m = max(logits)
    e = [math.exp(v - m) for v in logits]
    return [v / sum(e) for v in e]


def main():
    nodes = [
        node("Conv", ["input", "w1", "b1"], ["c1"], "conv1",
             [attr_ints("kernel_shape", [3]), attr_ints("dilations", [1]), attr_ints("pads", [1, 1])]),
        node("Relu", ["c1"], ["h1"], "relu1"),
        node("Conv", ["h1", "w2", "b2"], ["c2"], "conv2",
             [attr_ints("kernel_shape", [3]), attr_ints("dilations", [2]), attr_ints("pads", [2, 2])]),
        node("Relu", ["c2"], ["h2"], "relu2"),
        node("Add", ["h1", "h2"], ["r"], "residual"),
        node("ReduceMean", ["r"], ["z"], "pool", [attr_ints("axes", [2]), attr_int("keepdims", 0)]),
        node("Gemm", ["z", "wf", "bf"], ["logits"], "head", [attr_int("transB", 1)]),
        node("Softmax", ["logits"], ["probabilities"], "softmax", [attr_int("axis", 1)]),
    ]
    inits = [
        tensor("w1", [HIDDEN, C_IN, 3], w1), tensor("b1", [HIDDEN], b1),
        tensor("w2", [HIDDEN, HIDDEN, 3], w2), tensor("b2", [HIDDEN], b2),
        tensor("wf", [CLASSES, HIDDEN], wf), tensor("bf", [CLASSES], bf),
    ]
    graph = b"".join(field_bytes(1, n) for n in nodes) + field_bytes(2, "tcn")
    graph += b"".join(field_bytes(5, t) for t in inits)
    graph += field_bytes(11, value_info("input", ["N", C_IN, LENGTH]))
    graph += field_bytes(12, value_info("probabilities", ["N", CLASSES]))
    # ModelProto: ir_version=1, producer_name=2, graph=7, opset_import=8 {domain=1, version=2}
    model = field_varint(1, 8) + field_bytes(2, "outpost make_tcn.py")
    model += field_bytes(7, graph) + field_bytes(8, field_bytes(1, "") + field_varint(2, 13))
    with open(os.path.join(HERE, "tcn.onnx"), "wb") as f:
        f.write(model)

    inputs = []
    for _ in range(3):
        inputs.append([[f32(math.sin(0.07 * t * (i + 1)) + rng.gauss(0.0, 0.3)) for t in range(LENGTH)]
                       for i in range(C_IN)])
    reference = {
        "shape": [C_IN, LENGTH],
        "inputs": inputs,
        "probabilities": [forward(x) for x in inputs],
    }
    with open(os.path.join(HERE, "reference.json"), "w") as f:
        json.dump(reference, f)
        f.write("\n")


if __name__ == "__main__":
    main()
