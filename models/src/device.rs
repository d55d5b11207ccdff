//! Where a model runs: burn's flex backend on the CPU, or (cargo feature
//! `gpu`) its wgpu backend on a GPU through Vulkan, Metal or DX12.
//!
//! Selection follows [`Preference`]:
//!
//! - `Cpu`: the CPU, always.
//! - `Gpu`: a GPU adapter, hardware first; a software rasterizer (Mesa's
//!   lavapipe, which wgpu reports as a CPU-type adapter) is taken when there
//!   is nothing else. That is how the tests run the GPU path with no GPU.
//! - `Auto`: a hardware adapter when there is one, else the CPU. A software
//!   rasterizer never counts here: it runs on the same cores as the CPU
//!   backend, only slower.
//!
//! A GPU is opened once per process ([`gpu`]) and shared by every model
//! placed on it: burn's wgpu runtime registers a device once and refuses a
//! second registration.

use burn::tensor::Device;

/// Where inference should run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preference {
    /// The CPU (burn's flex backend).
    Cpu,
    /// A GPU adapter, hardware preferred, software accepted.
    Gpu,
    /// A hardware GPU adapter when there is one, else the CPU.
    Auto,
}

/// A graphics adapter as wgpu reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adapter {
    /// The adapter's name (e.g. `llvmpipe (LLVM 15.0.6, 256 bits)`).
    pub name: String,
    /// The graphics API (`Vulkan`, `Metal`, `Dx12`, `Gl`).
    pub api: String,
    /// wgpu's device type (`DiscreteGpu`, `IntegratedGpu`, `VirtualGpu`, `Cpu`, `Other`).
    pub device_type: String,
    /// The driver and its version, where the API reports them.
    pub driver: String,
    /// A software rasterizer: wgpu's `Cpu` device type.
    pub software: bool,
}

impl std::fmt::Display for Adapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}, {}", self.name, self.api, self.device_type)?;
        if !self.driver.is_empty() {
            write!(f, ", {}", self.driver)?;
        }
        f.write_str(")")
    }
}

/// An opened GPU.
#[derive(Debug, Clone)]
pub struct Gpu {
    /// The burn device.
    pub device: Device,
    /// The adapter behind it.
    pub adapter: Adapter,
    #[cfg(feature = "gpu")]
    wgpu_device: burn::tensor::wgpu::wgpu::Device,
}

impl Gpu {
    /// The wgpu device handle behind [`Gpu::device`]: for tests that make
    /// the device fail (`destroy()`) to exercise the fallback to the CPU.
    #[cfg(feature = "gpu")]
    #[doc(hidden)]
    pub fn wgpu_device(&self) -> &burn::tensor::wgpu::wgpu::Device {
        &self.wgpu_device
    }
}

/// Whether this build carries the GPU backend (cargo feature `gpu`).
pub const GPU_BUILT: bool = cfg!(feature = "gpu");

/// Why no GPU was opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The binary was built without the `gpu` feature.
    #[error("this build has no GPU backend (cargo feature `gpu`)")]
    NotBuilt,
    /// No adapter fits the preference.
    #[error("no GPU adapter found{0}")]
    NoAdapter(String),
    /// The adapter would not open.
    #[error("cannot open GPU adapter: {0}")]
    Open(String),
}

/// The GPU `preference` asks for: `Ok(None)` when the CPU is the answer
/// (`Cpu`, or `Auto` with no hardware adapter), `Err` when a GPU was asked
/// for (`Gpu`, or `Auto` with a hardware adapter) and could not be opened.
pub fn gpu(preference: Preference) -> Result<Option<Gpu>, DeviceError> {
    match preference {
        Preference::Cpu => Ok(None),
        Preference::Gpu => imp::open(false).map(Some),
        Preference::Auto => match imp::open(true) {
            Ok(g) => Ok(Some(g)),
            Err(DeviceError::NotBuilt | DeviceError::NoAdapter(_)) => Ok(None),
            Err(e) => Err(e),
        },
    }
}

/// Every adapter wgpu finds on this machine (empty without the `gpu` feature).
pub fn adapters() -> Vec<Adapter> {
    imp::adapters()
}

#[cfg(not(feature = "gpu"))]
mod imp {
    use super::{Adapter, DeviceError, Gpu};

    pub fn open(_hardware_only: bool) -> Result<Gpu, DeviceError> {
        Err(DeviceError::NotBuilt)
    }

    pub fn adapters() -> Vec<Adapter> {
        Vec::new()
    }
}

#[cfg(feature = "gpu")]
mod imp {
    use std::sync::{Mutex, OnceLock};

    use burn::tensor::wgpu::{WgpuBackend, wgpu};
    use burn::tensor::{Device, DeviceKind};

    use super::{Adapter, DeviceError, Gpu};

    fn describe(info: &wgpu::AdapterInfo) -> Adapter {
        let driver = [info.driver.as_str(), info.driver_info.as_str()]
            .iter()
            .filter(|s| !s.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join(" ");
        Adapter {
            name: info.name.clone(),
            api: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver,
            software: info.device_type == wgpu::DeviceType::Cpu,
        }
    }

    /// The adapters of Vulkan, Metal and DX12, listed once per process
    /// (the Vulkan loader does not like instances coming and going).
    /// OpenGL is left out: its compute support is partial, and probing it
    /// on a headless gateway only prints EGL errors.
    fn infos() -> &'static [wgpu::AdapterInfo] {
        static INFOS: OnceLock<Vec<wgpu::AdapterInfo>> = OnceLock::new();
        INFOS.get_or_init(|| {
            let backends = wgpu::Backends::VULKAN | wgpu::Backends::DX12 | wgpu::Backends::METAL;
            let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
                backends,
                ..wgpu::InstanceDescriptor::new_without_display_handle()
            });
            block_on(instance.enumerate_adapters(backends))
                .iter()
                .map(wgpu::Adapter::get_info)
                .collect()
        })
    }

    pub fn adapters() -> Vec<Adapter> {
        infos().iter().map(describe).collect()
    }

    /// How burn names the best adapter: a discrete GPU, then an integrated
    /// one, a virtual one, another kind, and a software one unless
    /// `hardware_only`; with its graphics API pinned, so that burn opens
    /// that adapter and probes no other API.
    fn best(hardware_only: bool) -> Option<(DeviceKind, WgpuBackend)> {
        let order = [
            (wgpu::DeviceType::DiscreteGpu, DeviceKind::DiscreteGpu(0)),
            (
                wgpu::DeviceType::IntegratedGpu,
                DeviceKind::IntegratedGpu(0),
            ),
            (wgpu::DeviceType::VirtualGpu, DeviceKind::VirtualGpu(0)),
            (wgpu::DeviceType::Other, DeviceKind::DefaultDevice),
            (wgpu::DeviceType::Cpu, DeviceKind::Cpu),
        ];
        order
            .into_iter()
            .filter(|(t, _)| !hardware_only || *t != wgpu::DeviceType::Cpu)
            .find_map(|(t, kind)| {
                let info = infos().iter().find(|i| i.device_type == t)?;
                let api = match info.backend {
                    wgpu::Backend::Vulkan => WgpuBackend::Vulkan,
                    wgpu::Backend::Metal => WgpuBackend::Metal,
                    wgpu::Backend::Dx12 => WgpuBackend::Dx12,
                    _ => WgpuBackend::Auto,
                };
                Some((kind, api))
            })
    }

    /// Opened devices by kind and API: burn registers a wgpu runtime once.
    type Opened = Vec<((DeviceKind, WgpuBackend), Result<Gpu, DeviceError>)>;
    static OPENED: Mutex<Opened> = Mutex::new(Vec::new());

    pub fn open(hardware_only: bool) -> Result<Gpu, DeviceError> {
        let Some((kind, api)) = best(hardware_only) else {
            let found: Vec<String> = adapters().iter().map(ToString::to_string).collect();
            return Err(DeviceError::NoAdapter(if found.is_empty() {
                String::new()
            } else {
                format!(" (only software adapters: {})", found.join("; "))
            }));
        };
        let mut opened = OPENED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, r)) = opened.iter().find(|(k, _)| *k == (kind.clone(), api)) {
            return r.clone();
        }
        let r = Device::wgpu_options()
            .device_kind(kind.clone())
            .graphics_api(api)
            .init_with_setup()
            .map(|(device, setup)| Gpu {
                device,
                adapter: describe(&setup.adapter.get_info()),
                wgpu_device: setup.device.clone(),
            })
            .map_err(|e| DeviceError::Open(e.to_string()));
        opened.push(((kind, api), r.clone()));
        r
    }

    /// Drive a future that wgpu resolves without an executor (native
    /// adapter enumeration completes on the first poll).
    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        use std::sync::Arc;
        use std::task::{Context, Poll, Wake, Waker};
        struct Unpark(std::thread::Thread);
        impl Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut f = std::pin::pin!(f);
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
            std::thread::park();
        }
    }
}
