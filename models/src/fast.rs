//! The inference form of a network, compiled once at load time.
//!
//! Two things make the FCN cheaper to run than its training form:
//!
//! - **Batch norm folded into the convolution.** At inference a batch norm is
//!   an affine map per channel, `y = (x - mean) · γ / √(var + ε) + β`, so it
//!   folds into the convolution before it: weights scaled by `γ / √(var + ε)`
//!   per output channel, bias `(b - mean) · γ / √(var + ε) + β`. One pass over
//!   every activation less, and one tensor less per block.
//! - **Convolution as one matrix product.** burn's flex backend runs a 1-D
//!   convolution through its generic 3-D convolution, whose unfolding costs
//!   more than its matrix product at these sizes (BENCHMARKS.md, "Profile").
//!   Here activations are kept channels-first (`[C, B, L]`), the padded
//!   input is unfolded into `k` shifted views stacked along the channels
//!   (`[k·C, B·L]`, im2col) and multiplied by the weights laid out
//!   `[F, k·C]`: one GEMM per layer, one window at a time.
//!
//! The outputs are those of [`crate::arch::Network::forward`] within float
//! rounding (`fast::tests`, and every parity test of the crate runs through
//! this path). Networks without convolutions (the MLP) run as they are.

use burn::nn::BatchNorm;
use burn::nn::conv::Conv1d;
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

use crate::arch::Network;

/// A stride-1, single-group 1-D convolution with "same" padding (burn's:
/// the odd padding at the end), with an optional batch norm folded in.
#[derive(Debug, Clone)]
pub struct FoldedConv {
    /// `[F, k·C]`, column `i·C + c` = tap `i` of input channel `c`.
    weight: Tensor<2>,
    /// `[F, 1, 1]`.
    bias: Tensor<3>,
    kernel: usize,
    dilation: usize,
    pad_left: usize,
    pad_right: usize,
}

impl FoldedConv {
    /// Fold `bn` (if any) into `conv`; `None` when the convolution is not
    /// one this form covers (stride or groups other than 1).
    pub fn new(conv: &Conv1d, bn: Option<&BatchNorm>) -> Option<Self> {
        if conv.stride != 1 || conv.groups != 1 {
            return None;
        }
        let w: Tensor<3> = conv.weight.val(); // [F, C, k]
        let [f, c, k] = w.dims();
        let device = w.device();
        let bias: Tensor<1> = match &conv.bias {
            Some(b) => b.val(),
            None => Tensor::zeros([f], &device),
        };
        let (w, bias) = match bn {
            Some(bn) => {
                let scale = bn.gamma.val() / (bn.running_var.value() + bn.epsilon).sqrt();
                let w = w * scale.clone().reshape([f, 1, 1]);
                let bias = (bias - bn.running_mean.value()) * scale + bn.beta.val();
                (w, bias)
            }
            None => (w, bias),
        };
        let total = conv.dilation * (k - 1);
        Some(Self {
            weight: w.swap_dims(1, 2).reshape([f, k * c]),
            bias: bias.reshape([f, 1, 1]),
            kernel: k,
            dilation: conv.dilation,
            pad_left: total / 2,
            pad_right: total - total / 2,
        })
    }

    /// Channels-first activations `[C, B, L]` → `[F, B, L]`: the whole
    /// batch is one matrix product `[F, k·C] × [k·C, B·L]`.
    pub fn forward_cbl(&self, x: Tensor<3>) -> Tensor<3> {
        let [c, b, l] = x.dims();
        let device = x.device();
        let mut parts = Vec::with_capacity(3);
        if self.pad_left > 0 {
            parts.push(Tensor::zeros([c, b, self.pad_left], &device));
        }
        parts.push(x);
        if self.pad_right > 0 {
            parts.push(Tensor::zeros([c, b, self.pad_right], &device));
        }
        let padded = if parts.len() == 1 {
            parts.remove(0)
        } else {
            Tensor::cat(parts, 2)
        };
        let cols: Vec<Tensor<3>> = (0..self.kernel)
            .map(|i| {
                let s = i * self.dilation;
                padded.clone().slice([0..c, 0..b, s..s + l])
            })
            .collect();
        let cols: Tensor<2> = Tensor::cat(cols, 0).reshape([self.kernel * c, b * l]);
        let f = self.weight.dims()[0];
        let out: Tensor<2> = self.weight.clone().matmul(cols);
        out.reshape([f, b, l]) + self.bias.clone()
    }
}

/// A network in its inference form.
#[derive(Debug, Clone)]
pub enum Compiled {
    /// FCN: folded conv blocks (ReLU after each), global average pooling, linear head.
    Fcn {
        /// The blocks.
        convs: Vec<FoldedConv>,
        /// The head.
        head: burn::nn::Linear,
    },
    /// Autoencoder: its convolutions (ReLU between), reconstruction error.
    Autoencoder {
        /// The layers.
        convs: Vec<FoldedConv>,
    },
    /// Anything else runs as the network itself.
    Plain,
}

impl Compiled {
    /// Compile `net` for inference.
    pub fn new(net: &Network, _device: &Device) -> Self {
        match net {
            Network::Fcn(n) => {
                let convs: Option<Vec<FoldedConv>> = n
                    .blocks()
                    .map(|(conv, bn)| FoldedConv::new(conv, Some(bn)))
                    .collect();
                match convs {
                    Some(convs) => Compiled::Fcn {
                        convs,
                        head: n.head().clone(),
                    },
                    None => Compiled::Plain,
                }
            }
            Network::Autoencoder(a) => {
                let convs: Option<Vec<FoldedConv>> = a
                    .layers()
                    .iter()
                    .map(|c| FoldedConv::new(c, None))
                    .collect();
                match convs {
                    Some(convs) => Compiled::Autoencoder { convs },
                    None => Compiled::Plain,
                }
            }
            Network::Mlp(_) => Compiled::Plain,
        }
    }

    /// Input `[batch, channels, length]` → raw outputs `[batch, outputs]`,
    /// as [`Network::forward`].
    pub fn forward(&self, net: &Network, x: Tensor<3>) -> Tensor<2> {
        match self {
            Compiled::Fcn { convs, head } => {
                let [b, c, l] = x.dims();
                if b > 1 {
                    // One window at a time: its unfolded input stays in
                    // cache; one product over the whole batch (or slices of
                    // 2 to 8 windows) measured 1.4 to 1.6 times slower per
                    // window (BENCHMARKS.md).
                    let parts: Vec<Tensor<2>> = (0..b)
                        .map(|i| self.forward(net, x.clone().slice([i..i + 1, 0..c, 0..l])))
                        .collect();
                    return Tensor::cat(parts, 0);
                }
                let mut h = x.swap_dims(0, 1);
                for conv in convs {
                    h = relu(conv.forward_cbl(h));
                }
                // [F, B, L] -> mean over time -> [B, F].
                let pooled: Tensor<2> = h.mean_dim(2).squeeze_dim::<2>(2).swap_dims(0, 1);
                head.forward(pooled)
            }
            Compiled::Autoencoder { convs } => {
                let mut h = x.clone().swap_dims(0, 1);
                let last = convs.len().saturating_sub(1);
                for (i, conv) in convs.iter().enumerate() {
                    h = conv.forward_cbl(h);
                    if i < last {
                        h = relu(h);
                    }
                }
                let err = h.swap_dims(0, 1) - x;
                let [b, c, l] = err.dims();
                (err.clone() * err).reshape([b, c * l]).mean_dim(1)
            }
            Compiled::Plain => net.forward(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Architecture;
    use burn::tensor::TensorData;

    fn compare(arch: Architecture, channels: usize, length: usize, outputs: usize) {
        let device = Device::flex();
        let net = Network::init(&arch, channels, length, outputs, &device);
        let compiled = Compiled::new(&net, &device);
        assert!(!matches!(compiled, Compiled::Plain), "{arch:?} compiles");
        for batch in [1usize, 3] {
            let x: Vec<f32> = (0..batch * channels * length)
                .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
                .collect();
            let t = || {
                Tensor::<3>::from_data(
                    TensorData::new(x.clone(), [batch, channels, length]),
                    &device,
                )
            };
            let a: Vec<f32> = net.forward(t()).into_data().try_to_vec::<f32>().unwrap();
            let b: Vec<f32> = compiled
                .forward(&net, t())
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            assert_eq!(a.len(), b.len());
            for (p, q) in a.iter().zip(&b) {
                assert!(
                    (p - q).abs() <= 1e-4 * (1.0 + p.abs()),
                    "{arch:?}: {p} vs {q}"
                );
            }
        }
    }

    #[test]
    fn folded_fcn_computes_what_the_network_computes() {
        // Odd and even kernels (the even one pads one more at the end).
        compare(
            Architecture::Fcn {
                filters: vec![8, 16, 8],
                kernels: vec![8, 5, 3],
            },
            6,
            40,
            4,
        );
    }

    #[test]
    fn autoencoder_computes_what_the_network_computes() {
        compare(
            Architecture::Autoencoder {
                channels: vec![8, 4],
                kernel: 4,
            },
            3,
            32,
            1,
        );
    }

    #[test]
    fn the_bundled_model_with_trained_batch_norm() {
        let device = Device::flex();
        let m = crate::LoadedModel::load_static(
            crate::bundled::MANIFEST,
            crate::bundled::WEIGHTS,
            &device,
        )
        .unwrap();
        let x: Vec<f32> = (0..2 * 600).map(|i| (i as f32 * 0.37).sin()).collect();
        let t = || Tensor::<3>::from_data(TensorData::new(x.clone(), [2, 6, 100]), &device);
        let net = m.network();
        let a: Vec<f32> = net.forward(t()).into_data().try_to_vec::<f32>().unwrap();
        let b: Vec<f32> = Compiled::new(net, &device)
            .forward(net, t())
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() <= 1e-4 * (1.0 + p.abs()), "{p} vs {q}");
        }
    }
}
