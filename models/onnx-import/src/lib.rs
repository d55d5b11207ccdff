//! Bring an ONNX model of an architecture Outpost does not have.
//!
//! `build.rs` turns `model/tcn.onnx` (a dilated residual convolutional
//! classifier, written by `model/make_tcn.py`) into Burn code at build time
//! with `burn-onnx`. The result is ordinary Burn: it runs on the same
//! [`Device`] as Outpost's own networks (flex on the CPU, wgpu on a GPU) and
//! needs no ONNX runtime on the gateway. See README.md beside this file.

use burn::tensor::{Device, Tensor, TensorData};

/// The code `burn-onnx` generated from `model/tcn.onnx`.
#[allow(clippy::all, unused, missing_docs)]
pub mod tcn {
    include!(concat!(env!("OUT_DIR"), "/model/tcn.rs"));
}

/// Channels per window the model reads.
pub const CHANNELS: usize = 6;
/// Samples per window.
pub const LENGTH: usize = 100;
/// Classes it scores.
pub const CLASSES: usize = 4;

/// Errors of [`TcnClassifier::predict`].
#[derive(Debug, PartialEq)]
pub enum PredictError {
    /// The input is not a whole number of `CHANNELS × LENGTH` windows.
    Shape(usize),
    /// The backend returned something other than f32 probabilities.
    Output(String),
}

impl std::fmt::Display for PredictError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PredictError::Shape(n) => write!(
                f,
                "{n} values are not a whole number of {CHANNELS}x{LENGTH} windows"
            ),
            PredictError::Output(e) => write!(f, "model output: {e}"),
        }
    }
}

impl std::error::Error for PredictError {}

/// The imported model with the same calling convention as Outpost's
/// `LoadedModel::predict`: flat `[n][channels][length]` windows in, one row
/// of class probabilities per window out.
pub struct TcnClassifier {
    model: tcn::Model,
    device: Device,
}

impl TcnClassifier {
    /// Load the embedded weights onto `device`.
    pub fn new(device: &Device) -> Self {
        Self {
            model: tcn::Model::from_embedded(device),
            device: device.clone(),
        }
    }

    /// Class probabilities of each window in `windows`.
    pub fn predict(&self, windows: &[f32]) -> Result<Vec<Vec<f32>>, PredictError> {
        let per = CHANNELS * LENGTH;
        if windows.is_empty() || !windows.len().is_multiple_of(per) {
            return Err(PredictError::Shape(windows.len()));
        }
        let n = windows.len() / per;
        let x = Tensor::<3>::from_data(
            TensorData::new(windows.to_vec(), [n, CHANNELS, LENGTH]),
            &self.device,
        );
        let probs: Vec<f32> = self
            .model
            .forward(x)
            .into_data()
            .try_to_vec_as::<f32>()
            .map_err(|e| PredictError::Output(format!("{e:?}")))?;
        Ok(probs.chunks(CLASSES).map(<[f32]>::to_vec).collect())
    }
}
