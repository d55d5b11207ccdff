//! Network architectures. Every size comes from the manifest, so a new size
//! needs no rebuild; every network runs on any burn `Device`.

use burn::module::Module;
use burn::nn::{
    BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig1d,
    conv::{Conv1d, Conv1dConfig},
};
use burn::tensor::{Device, Tensor, activation::relu};

use crate::manifest::Architecture;

/// One conv → batch norm → ReLU block of the FCN.
#[derive(Module, Debug)]
pub struct ConvBlock {
    conv: Conv1d,
    norm: BatchNorm,
}

impl ConvBlock {
    fn new(channels_in: usize, channels_out: usize, kernel: usize, device: &Device) -> Self {
        Self {
            conv: Conv1dConfig::new(channels_in, channels_out, kernel)
                .with_padding(PaddingConfig1d::Same)
                .init(device),
            norm: BatchNormConfig::new(channels_out).init(device),
        }
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        relu(self.norm.forward(self.conv.forward(x)))
    }
}

/// Fully convolutional network for multichannel windows (Wang et al. 2017).
#[derive(Module, Debug)]
pub struct Fcn {
    blocks: Vec<ConvBlock>,
    head: Linear,
}

impl Fcn {
    /// The conv and batch norm of each block, in order.
    pub fn blocks(&self) -> impl Iterator<Item = (&Conv1d, &BatchNorm)> {
        self.blocks.iter().map(|b| (&b.conv, &b.norm))
    }

    /// The linear head after the pooling.
    pub fn head(&self) -> &Linear {
        &self.head
    }

    /// Input `[batch, channels, length]` → logits `[batch, outputs]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<2> {
        let mut h = x;
        for block in &self.blocks {
            h = block.forward(h);
        }
        // Global average pooling over time: [B, F, L] -> [B, F].
        let pooled: Tensor<2> = h.mean_dim(2).squeeze_dim(2);
        self.head.forward(pooled)
    }
}

/// Multilayer perceptron over a feature vector.
#[derive(Module, Debug)]
pub struct Mlp {
    layers: Vec<Linear>,
    head: Linear,
}

impl Mlp {
    /// The hidden layers, in order (each followed by a ReLU).
    pub fn layers(&self) -> &[Linear] {
        &self.layers
    }

    /// The output layer.
    pub fn head(&self) -> &Linear {
        &self.head
    }

    /// Input `[batch, features, 1]` (or `[batch, c, l]`, flattened) → logits `[batch, outputs]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<2> {
        let [b, c, l] = x.dims();
        let mut h: Tensor<2> = x.reshape([b, c * l]);
        for layer in &self.layers {
            h = relu(layer.forward(h));
        }
        self.head.forward(h)
    }
}

/// 1D convolutional autoencoder: "same"-padded convolutions narrowing the
/// channels to a bottleneck and widening them back, ReLU between layers and
/// a linear last layer.
#[derive(Module, Debug)]
pub struct Autoencoder {
    layers: Vec<Conv1d>,
}

impl Autoencoder {
    /// The convolutions, in order.
    pub fn layers(&self) -> &[Conv1d] {
        &self.layers
    }

    /// Reconstruction of `[batch, channels, length]`.
    pub fn reconstruct(&self, x: Tensor<3>) -> Tensor<3> {
        let mut h = x;
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(h);
            if i < last {
                h = relu(h);
            }
        }
        h
    }

    /// Mean squared reconstruction error per window: `[batch, 1]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<2> {
        let err = self.reconstruct(x.clone()) - x;
        let [b, c, l] = err.dims();
        (err.clone() * err).reshape([b, c * l]).mean_dim(1)
    }
}

/// Any network Outpost can run.
#[derive(Module, Debug)]
pub enum Network {
    /// See [`Fcn`].
    Fcn(Fcn),
    /// See [`Mlp`].
    Mlp(Mlp),
    /// See [`Autoencoder`].
    Autoencoder(Autoencoder),
}

impl Network {
    /// A freshly initialized network for `arch` reading `channels × length`
    /// windows and producing `outputs` values.
    pub fn init(
        arch: &Architecture,
        channels: usize,
        length: usize,
        outputs: usize,
        device: &Device,
    ) -> Self {
        match arch {
            Architecture::Fcn { filters, kernels } => {
                let mut blocks = Vec::with_capacity(filters.len());
                let mut cin = channels;
                for (&f, &k) in filters.iter().zip(kernels) {
                    blocks.push(ConvBlock::new(cin, f, k, device));
                    cin = f;
                }
                Network::Fcn(Fcn {
                    blocks,
                    head: LinearConfig::new(cin, outputs).init(device),
                })
            }
            Architecture::Mlp { hidden } => {
                let mut layers = Vec::with_capacity(hidden.len());
                let mut din = channels * length;
                for &w in hidden {
                    layers.push(LinearConfig::new(din, w).init(device));
                    din = w;
                }
                Network::Mlp(Mlp {
                    layers,
                    head: LinearConfig::new(din, outputs).init(device),
                })
            }
            Architecture::Autoencoder {
                channels: widths,
                kernel,
            } => {
                let mut sizes = vec![channels];
                sizes.extend(widths.iter().copied());
                sizes.extend(widths.iter().rev().skip(1).copied());
                sizes.push(channels);
                let layers = sizes
                    .windows(2)
                    .map(|w| {
                        Conv1dConfig::new(w[0], w[1], *kernel)
                            .with_padding(PaddingConfig1d::Same)
                            .init(device)
                    })
                    .collect();
                Network::Autoencoder(Autoencoder { layers })
            }
        }
    }

    /// Input `[batch, channels, length]` → raw outputs `[batch, outputs]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<2> {
        match self {
            Network::Fcn(n) => n.forward(x),
            Network::Mlp(n) => n.forward(x),
            Network::Autoencoder(n) => n.forward(x),
        }
    }
}
