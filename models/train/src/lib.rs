//! Outpost's training side (dataset loaders, training, evaluation, reports, the `outpost-train` binary); the gateway (`outpost-runtime`) never links it, only `outpost-models`.
//!
//! Everything that takes a [`dataset::Dataset`] is here; the models
//! themselves (architectures, artifacts, manifests, signing, drift
//! statistics, feature extractors) are `outpost-models`, which this crate
//! builds on.
//!
//! Layers, lowest first: `dataset`, `eval`, `import` < `features` <
//! `predict` < `drift` < `train` < `report`.

pub mod dataset;
pub mod drift;
pub mod eval;
pub mod features;
pub mod import;
pub mod predict;
pub mod report;
pub mod train;
