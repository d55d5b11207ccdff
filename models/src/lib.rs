//! Outpost's models: network architectures, the model artifact (manifest +
//! burnpack weights), dataset loaders and, with the `train` feature, training.
//!
//! The runtime uses this crate with default features off: it loads and runs
//! artifacts but carries no training code.

pub mod arch;
pub mod artifact;
#[doc(hidden)]
pub mod bench_support;
pub mod dataset;
pub mod device;
pub mod drift;
pub mod eval;
pub mod fast;
pub mod features;
pub mod fsutil;
pub mod manifest;
pub mod onnx;
#[cfg(feature = "train")]
pub mod report;
pub mod signing;
#[cfg(feature = "train")]
pub mod train;

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
