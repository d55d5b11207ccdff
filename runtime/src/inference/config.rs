//! `[inference]`: the device, batching and the channel to aggregation.

use serde::Deserialize;

use crate::check::Collector;

/// Where inference runs (`outpost_models::device`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    /// burn's flex CPU backend.
    #[default]
    Cpu,
    /// burn's wgpu backend (build feature `gpu`) on a GPU adapter, a
    /// software one (lavapipe) when there is no hardware one; the CPU when
    /// no adapter opens or the device fails.
    Gpu,
    /// A hardware GPU when there is one (build feature `gpu`), else the CPU.
    Auto,
}

impl DeviceChoice {
    /// The name as written in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Gpu => "gpu",
            Self::Auto => "auto",
        }
    }

    /// The device preference this names.
    pub fn preference(self) -> outpost_models::device::Preference {
        use outpost_models::device::Preference;
        match self {
            Self::Cpu => Preference::Cpu,
            Self::Gpu => Preference::Gpu,
            Self::Auto => Preference::Auto,
        }
    }
}

/// `[inference]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    /// Device.
    pub device: DeviceChoice,
    /// Largest batch of windows per forward pass on the CPU.
    pub max_batch: usize,
    /// Largest batch of windows per forward pass on a GPU, where a dispatch
    /// has a fixed cost and larger batches amortize it.
    pub gpu_max_batch: usize,
    /// Longest a window waits for its batch to fill.
    pub max_wait_ms: u64,
    /// Capacity of the channel from inference to aggregation; when full, inference waits.
    pub channel_capacity: usize,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        Self {
            device: DeviceChoice::Cpu,
            max_batch: 32,
            gpu_max_batch: 256,
            max_wait_ms: 20,
            channel_capacity: 1024,
        }
    }
}

impl InferenceConfig {
    /// Check `[inference]` (paths relative to it).
    pub fn check(&self, c: &mut Collector) {
        for (path, n) in [
            ("channel_capacity", self.channel_capacity),
            ("max_batch", self.max_batch),
            ("gpu_max_batch", self.gpu_max_batch),
        ] {
            if n == 0 {
                c.push(path, "must be at least 1");
            }
        }
        // `auto` means the CPU in a build without the GPU backend; `gpu`
        // cannot be had at all.
        if self.device == DeviceChoice::Gpu && !outpost_models::device::GPU_BUILT {
            c.push(
                "device",
                format!(
                    "{:?} needs a build with the `gpu` cargo feature; this binary runs inference on the CPU only (\"auto\" is accepted and means the CPU here)",
                    self.device.name()
                ),
            );
        }
    }
}
