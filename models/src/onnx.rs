//! Export a loaded model to ONNX (opset 13), so the same weights run in
//! other runtimes: tract and ONNX Runtime in the benchmarks
//! (BENCHMARKS.md), or a cloud-side replica of the gateway's model.
//!
//! The graph computes what [`LoadedModel::predict`] computes from normalized
//! windows: the network, then a softmax for classifiers. Input `input`
//! `[N, channels, length]` (N symbolic), output `output` `[N, outputs]`.
//! FCN and MLP are exported; the autoencoder is not (yet).
//!
//! The protobuf is written by hand (a few field kinds suffice), so nothing
//! is added to the gateway's dependencies.

use burn::nn::{BatchNorm, Linear, conv::Conv1d};
use burn::tensor::Tensor;

use crate::arch::Network;
use crate::artifact::{LoadedModel, ModelError};
use crate::manifest::Task;

/// The input's name in exported graphs.
pub const INPUT: &str = "input";
/// The output's name in exported graphs.
pub const OUTPUT: &str = "output";

fn varint(out: &mut Vec<u8>, mut n: u64) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn field_varint(out: &mut Vec<u8>, field: u64, value: u64) {
    varint(out, field << 3);
    varint(out, value);
}

fn field_bytes(out: &mut Vec<u8>, field: u64, data: &[u8]) {
    varint(out, (field << 3) | 2);
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

fn field_f32(out: &mut Vec<u8>, field: u64, value: f32) {
    varint(out, (field << 3) | 5);
    out.extend_from_slice(&value.to_le_bytes());
}

/// An attribute (AttributeProto).
enum Attr {
    Int(&'static str, i64),
    Ints(&'static str, Vec<i64>),
    Float(&'static str, f32),
}

impl Attr {
    fn encode(&self) -> Vec<u8> {
        let mut a = Vec::new();
        match self {
            Attr::Int(name, v) => {
                field_bytes(&mut a, 1, name.as_bytes());
                field_varint(&mut a, 3, *v as u64);
                field_varint(&mut a, 20, 2);
            }
            Attr::Ints(name, vs) => {
                field_bytes(&mut a, 1, name.as_bytes());
                for v in vs {
                    field_varint(&mut a, 8, *v as u64);
                }
                field_varint(&mut a, 20, 7);
            }
            Attr::Float(name, v) => {
                field_bytes(&mut a, 1, name.as_bytes());
                field_f32(&mut a, 2, *v);
                field_varint(&mut a, 20, 1);
            }
        }
        a
    }
}

/// A graph under construction.
#[derive(Default)]
struct Graph {
    nodes: Vec<Vec<u8>>,
    initializers: Vec<Vec<u8>>,
    count: usize,
}

impl Graph {
    fn name(&mut self, prefix: &str) -> String {
        self.count += 1;
        format!("{prefix}{}", self.count)
    }

    fn node(&mut self, op: &str, inputs: &[&str], attrs: &[Attr]) -> String {
        let out = self.name(&op.to_lowercase());
        let mut n = Vec::new();
        for i in inputs {
            field_bytes(&mut n, 1, i.as_bytes());
        }
        field_bytes(&mut n, 2, out.as_bytes());
        field_bytes(&mut n, 3, format!("{out}_node").as_bytes());
        field_bytes(&mut n, 4, op.as_bytes());
        for a in attrs {
            field_bytes(&mut n, 5, &a.encode());
        }
        self.nodes.push(n);
        out
    }

    fn tensor<const D: usize>(&mut self, prefix: &str, t: Tensor<D>) -> Result<String, ModelError> {
        let name = self.name(prefix);
        let dims = t.dims();
        let values: Vec<f32> = t
            .into_data()
            .try_to_vec_as::<f32>()
            .map_err(|e| ModelError::Backend(format!("{e:?}")))?;
        let mut p = Vec::new();
        for d in dims {
            field_varint(&mut p, 1, d as u64);
        }
        field_varint(&mut p, 2, 1); // FLOAT
        field_bytes(&mut p, 8, name.as_bytes());
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        field_bytes(&mut p, 9, &raw);
        self.initializers.push(p);
        Ok(name)
    }

    fn conv(&mut self, x: &str, conv: &Conv1d) -> Result<String, ModelError> {
        let k = conv.kernel_size;
        if conv.stride != 1 || conv.groups != 1 {
            return Err(ModelError::Data(
                "ONNX export: only stride 1, one group".into(),
            ));
        }
        // "Same" at stride 1: k - 1 padding, the odd one at the end (burn's
        // and TensorFlow's SAME_UPPER).
        let total = (conv.dilation * (k - 1)) as i64;
        let w = self.tensor("w", conv.weight.val())?;
        let mut inputs = vec![x.to_string(), w];
        if let Some(b) = &conv.bias {
            inputs.push(self.tensor("b", b.val())?);
        }
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        Ok(self.node(
            "Conv",
            &inputs,
            &[
                Attr::Ints("kernel_shape", vec![k as i64]),
                Attr::Ints("dilations", vec![conv.dilation as i64]),
                Attr::Ints("strides", vec![1]),
                Attr::Ints("pads", vec![total / 2, total - total / 2]),
            ],
        ))
    }

    fn batch_norm(&mut self, x: &str, bn: &BatchNorm) -> Result<String, ModelError> {
        let scale = self.tensor("gamma", bn.gamma.val())?;
        let bias = self.tensor("beta", bn.beta.val())?;
        let mean = self.tensor("mean", bn.running_mean.value())?;
        let var = self.tensor("var", bn.running_var.value())?;
        Ok(self.node(
            "BatchNormalization",
            &[x, &scale, &bias, &mean, &var],
            &[Attr::Float("epsilon", bn.epsilon as f32)],
        ))
    }

    /// burn's Linear: `x · W + b` with `W` `[in, out]`: Gemm without transposes.
    fn linear(&mut self, x: &str, l: &Linear) -> Result<String, ModelError> {
        let w = self.tensor("w", l.weight.val())?;
        let mut inputs = vec![x.to_string(), w];
        if let Some(b) = &l.bias {
            inputs.push(self.tensor("b", b.val())?);
        }
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        Ok(self.node("Gemm", &inputs, &[]))
    }

    /// A node whose output gets the graph output's name.
    fn rename_last_output(&mut self, from: &str) {
        if let Some(n) = self.nodes.last_mut() {
            let mut old = Vec::new();
            field_bytes(&mut old, 2, from.as_bytes());
            let mut new = Vec::new();
            field_bytes(&mut new, 2, OUTPUT.as_bytes());
            if let Some(pos) = n.windows(old.len()).position(|w| w == old.as_slice()) {
                n.splice(pos..pos + old.len(), new);
            }
        }
    }
}

fn value_info(name: &str, dims: &[Option<usize>]) -> Vec<u8> {
    let mut shape = Vec::new();
    for d in dims {
        let mut dim = Vec::new();
        match d {
            Some(v) => field_varint(&mut dim, 1, *v as u64),
            None => field_bytes(&mut dim, 2, b"N"),
        }
        field_bytes(&mut shape, 1, &dim);
    }
    let mut tensor_type = Vec::new();
    field_varint(&mut tensor_type, 1, 1); // FLOAT
    field_bytes(&mut tensor_type, 2, &shape);
    let mut type_proto = Vec::new();
    field_bytes(&mut type_proto, 1, &tensor_type);
    let mut v = Vec::new();
    field_bytes(&mut v, 1, name.as_bytes());
    field_bytes(&mut v, 2, &type_proto);
    v
}

impl LoadedModel {
    /// The model as an ONNX file (opset 13); see the module documentation.
    pub fn to_onnx(&self) -> Result<Vec<u8>, ModelError> {
        let m = self.manifest();
        let (c, l, k) = (m.input.channels, m.input.length, m.outputs());
        let mut g = Graph::default();
        let mut h = INPUT.to_string();
        match self.network() {
            Network::Fcn(fcn) => {
                for (conv, bn) in fcn.blocks() {
                    let x = g.conv(&h, conv)?;
                    let x = g.batch_norm(&x, bn)?;
                    h = g.node("Relu", &[&x], &[]);
                }
                let pooled = g.node(
                    "ReduceMean",
                    &[&h],
                    &[Attr::Ints("axes", vec![2]), Attr::Int("keepdims", 0)],
                );
                h = g.linear(&pooled, fcn.head())?;
            }
            Network::Mlp(mlp) => {
                h = g.node("Flatten", &[&h], &[Attr::Int("axis", 1)]);
                for layer in mlp.layers() {
                    let x = g.linear(&h, layer)?;
                    h = g.node("Relu", &[&x], &[]);
                }
                h = g.linear(&h, mlp.head())?;
            }
            Network::Autoencoder(_) => {
                return Err(ModelError::Data(
                    "ONNX export of the autoencoder is not implemented".into(),
                ));
            }
        }
        if m.task == Task::Classifier {
            h = g.node("Softmax", &[&h], &[Attr::Int("axis", 1)]);
        }
        g.rename_last_output(&h);

        let mut graph = Vec::new();
        for n in &g.nodes {
            field_bytes(&mut graph, 1, n);
        }
        field_bytes(&mut graph, 2, m.name.as_bytes());
        for t in &g.initializers {
            field_bytes(&mut graph, 5, t);
        }
        field_bytes(
            &mut graph,
            11,
            &value_info(INPUT, &[None, Some(c), Some(l)]),
        );
        field_bytes(&mut graph, 12, &value_info(OUTPUT, &[None, Some(k)]));
        let mut model = Vec::new();
        field_varint(&mut model, 1, 8); // IR version 8
        field_bytes(&mut model, 2, b"outpost");
        field_bytes(&mut model, 3, env!("CARGO_PKG_VERSION").as_bytes());
        field_bytes(&mut model, 7, &graph);
        let mut opset = Vec::new();
        field_bytes(&mut opset, 1, b"");
        field_varint(&mut opset, 2, 13);
        field_bytes(&mut model, 8, &opset);
        Ok(model)
    }
}
