//! Loads and runs Outpost models; the gateway (`outpost-runtime`) links this crate and never `outpost-train`.
//!
//! Architectures, signed artifacts and their manifests, drift statistics,
//! feature extractors, the compiled CPU form and the CPU/GPU device: what
//! the gateway needs to load and run a model. Dataset loaders, training,
//! evaluation and reports are in `outpost-train` (`models/train`).
//!
//! Layers, lowest first (no module imports one above it):
//! `reference` (drift reference types, PSI) < `manifest` < `error` <
//! `files` < `signing` < `arch` < `fast` < `artifact` < `drift`, `onnx`;
//! `features` and `device` stand alone.

pub mod arch;
pub mod artifact;
#[doc(hidden)]
pub mod bench_support;
pub mod device;
pub mod drift;
pub mod error;
pub mod fast;
pub mod features;
pub mod files;
pub mod manifest;
pub mod onnx;
pub mod reference;
pub mod signing;

pub use artifact::{LoadedModel, ModelError, Prediction};
pub use manifest::Manifest;
pub use signing::{SigningError, TrustedKey};

/// The default model compiled into the runtime: an FCN trained on
/// BasicMotions (6-axis accelerometer + gyroscope, 4 activities, 100 samples
/// at 10 Hz), so that `outpost run` works with no file and no network.
pub mod bundled {
    /// `manifest.json` of the bundled model.
    pub const MANIFEST: &[u8] = include_bytes!("../artifacts/basicmotions-fcn/manifest.json");
    /// Storage aligned for zero-copy tensor views (burnpack aligns tensor
    /// data within the file; `include_bytes!` alone guarantees only 1-byte alignment).
    #[repr(C, align(64))]
    struct Aligned<B: ?Sized>(B);

    static WEIGHTS_ALIGNED: &Aligned<[u8]> =
        &Aligned(*include_bytes!("../artifacts/basicmotions-fcn/model.bpk"));

    /// Burnpack weights of the bundled model.
    pub static WEIGHTS: &[u8] = &WEIGHTS_ALIGNED.0;
    /// Directory of the bundled model in the source tree.
    pub const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/artifacts/basicmotions-fcn");
}
