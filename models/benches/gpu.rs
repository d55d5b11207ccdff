//! GPU against CPU: the bundled FCN (and an MLP) through burn's wgpu backend
//! on whatever GPU adapter `inference.device = "gpu"` would take (a hardware
//! one first; Mesa's lavapipe where there is none) and through flex on the
//! CPU, at batch 1 to 1024, measured in alternating rounds of the same run.
//! Reports the time to open the device, upload the weights and compile the
//! kernels; per batch the milliseconds per batch and µs per window on each
//! device, their ratio, and the batch from which the GPU is faster per window
//! (the crossover), if any. The same command runs unchanged on a machine
//! with a real GPU.
//!
//! ```sh
//! cargo bench -p outpost-models --features gpu --bench gpu            # ~2 min on lavapipe
//! cargo bench -p outpost-models --features gpu --bench gpu -- --quick # seconds
//! ```

use std::time::{Duration, Instant};

use burn::tensor::Device;
use outpost_models::arch::Network;
use outpost_models::bench_support::{max_abs_diff, measure, windows};
use outpost_models::device::{self, Preference};
use outpost_models::manifest::Architecture;
use outpost_models::{LoadedModel, Manifest, bundled};

const BATCHES: [usize; 11] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

fn mlp() -> LoadedModel {
    let mut m: Manifest = serde_json::from_slice(bundled::MANIFEST).expect("bundled manifest");
    m.name = "bench-mlp".into();
    m.architecture = Architecture::Mlp {
        hidden: vec![256, 128],
    };
    let cpu = Device::flex();
    let net = Network::init(
        &m.architecture,
        m.input.channels,
        m.input.length,
        m.outputs(),
        &cpu,
    );
    LoadedModel::from_network(m, net, &cpu)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (round, rounds, max_batch) = if quick {
        (Duration::from_millis(30), 3, 64)
    } else {
        (Duration::from_millis(300), 5, 1024)
    };
    let t = Instant::now();
    let gpu = device::gpu(Preference::Gpu)
        .expect("a GPU adapter (lavapipe: apt install mesa-vulkan-drivers)")
        .expect("the gpu preference gives a GPU or an error");
    let open = t.elapsed();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("# GPU (burn 0.22.1 wgpu) vs CPU (burn flex, {cores} cores), same run");
    println!("# adapter: {}", gpu.adapter);
    println!("# device opened in {:.1} ms", open.as_secs_f64() * 1e3);
    let fcn = LoadedModel::load_static(bundled::MANIFEST, bundled::WEIGHTS, &Device::flex())
        .expect("the bundled model loads");
    for cpu in [fcn, mlp()] {
        let m = cpu.manifest().clone();
        let sizes: Vec<usize> = BATCHES.into_iter().filter(|&b| b <= max_batch).collect();
        let t = Instant::now();
        let on_gpu = cpu.to_device(&gpu.device);
        let upload = t.elapsed();
        let t = Instant::now();
        on_gpu.warm_up(&sizes).expect("the GPU runs the model");
        let warm = t.elapsed();
        println!();
        println!("## {} ({:?})", m.name, m.architecture);
        println!(
            "weights uploaded in {:.1} ms; kernels compiled for {} batch sizes in {:.0} ms",
            upload.as_secs_f64() * 1e3,
            sizes.len(),
            warm.as_secs_f64() * 1e3
        );
        println!(
            "| batch | GPU ms/batch | CPU ms/batch | GPU µs/window | CPU µs/window | GPU / CPU | max |Δ output| |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|");
        let mut crossover = None;
        for &b in &sizes {
            let x = windows(b * cpu.window_values());
            let a = on_gpu.outputs(&x, b).expect("GPU");
            let c = cpu.outputs(&x, b).expect("CPU");
            let diff = max_abs_diff(&a, &c);
            let (tg, tc) = measure(
                round,
                rounds,
                || {
                    std::hint::black_box(on_gpu.outputs(&x, b).expect("GPU"));
                },
                || {
                    std::hint::black_box(cpu.outputs(&x, b).expect("CPU"));
                },
            );
            if tg < tc && crossover.is_none() {
                crossover = Some(b);
            }
            println!(
                "| {b} | {:.2} | {:.2} | {:.1} | {:.1} | {:.2}× | {diff:.1e} |",
                tg * 1e3,
                tc * 1e3,
                tg * 1e6 / b as f64,
                tc * 1e6 / b as f64,
                tg / tc
            );
        }
        match crossover {
            Some(b) => println!("the GPU overtakes the CPU at batch {b}"),
            None => println!("the GPU does not overtake the CPU up to batch {max_batch}"),
        }
    }
}
