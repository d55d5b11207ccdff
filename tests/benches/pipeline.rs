//! End to end on one core, and footprint: Outpost against an equivalent
//! Python pipeline (NumPy and ONNX Runtime, `tests/benches/python/pipeline.py`,
//! the same model exported to ONNX), measured in the same run.
//!
//! 1. Readings per second: a recorded file of real BasicMotions readings
//!    (32 sensors, 192,000 readings) through parsing, windows (100 samples,
//!    hop 50), normalization, inference and aggregation (60 s windows):
//!    `outpost replay`'s pipeline in this process against the Python script,
//!    both pinned to CPU 0; median of 3 runs each. Inference counts and
//!    class totals are compared: the two must compute the same thing.
//! 2. Footprint (needs `target/release/outpost`: `cargo build --release -p
//!    outpost-runtime`): start-to-ready of `outpost run` (spawn to `/readyz`
//!    200) against the Python pipeline's start (spawn to its session ready),
//!    and peak RSS of `outpost run` under load (8 simulated sensors at 500 Hz
//!    for 10 s) against the Python pipeline's peak RSS on the file above.
//!
//! ```sh
//! cargo build --release -p outpost-runtime      # for part 2
//! cargo bench -p outpost-tests --bench pipeline
//! ```
//! The Python environment comes from `scripts/bench-python.sh` (pinned
//! NumPy and ONNX Runtime from PyPI, in `.cache/bench-venv`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use outpost::config::Config;
use outpost::ingest::file::FileFormat;
use outpost::outbox::OutboxKind;
use outpost::pipeline::{self, Prepared};
use outpost_models::{LoadedModel, bundled};
use outpost_tests::{free_port, vm_hwm_kib, workspace, write_benchmark_input};

const SENSORS: usize = 32;
const PER_SENSOR: usize = 6000;
const RUNS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Outpost's replay pipeline in this process: seconds, inferences, class
/// totals (label → count) and the CPU seconds of the inference thread.
fn outpost_replay_cpu(input: &Path) -> (f64, u64, std::collections::BTreeMap<String, u64>, f64) {
    let mut cfg = Config::default();
    cfg.outbox.kind = OutboxKind::Memory;
    cfg.aggregation.window_ms = 60_000;
    let prepared = Prepared::new(cfg).expect("the default config prepares");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut out = Vec::with_capacity(1 << 20);
    let start = Instant::now();
    let metrics = rt
        .block_on(pipeline::replay(
            prepared,
            input.to_path_buf(),
            FileFormat::Jsonl,
            &mut out,
        ))
        .expect("replay");
    let secs = start.elapsed().as_secs_f64();
    let infer_cpu = metrics.inference_cpu_us.get() as f64 / 1e6;
    let mut inferences = 0;
    let mut classes = std::collections::BTreeMap::new();
    for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let a: serde_json::Value = serde_json::from_slice(line).expect("aggregate JSON");
        inferences += a["inferences"].as_u64().unwrap_or(0);
        if let Some(c) = a["classes"].as_object() {
            for (k, v) in c {
                *classes.entry(k.clone()).or_insert(0) += v.as_u64().unwrap_or(0);
            }
        }
    }
    (secs, inferences, classes, infer_cpu)
}

/// Run a child to its end; its stdout and peak RSS (KiB, from wait4).
// The child is reaped by wait4 (for its rusage), not by `Child::wait`.
#[allow(clippy::zombie_processes)]
fn run_measured(cmd: &mut Command) -> (String, u64) {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let pid = child.id() as libc::pid_t;
    let mut stdout = child.stdout.expect("piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting on the pid of a child we spawned and have not reaped.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(rc, pid, "wait4");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child failed: {status}"
    );
    (reader.join().expect("reader"), usage.ru_maxrss as u64)
}

fn python() -> PathBuf {
    let out = Command::new(workspace().join("scripts/bench-python.sh"))
        .output()
        .expect("run scripts/bench-python.sh");
    assert!(out.status.success(), "scripts/bench-python.sh failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn http_ok(port: u16, path: &str) -> bool {
    use std::io::Read;
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").is_err() {
        return false;
    }
    let mut r = String::new();
    let _ = s.read_to_string(&mut r);
    r.starts_with("HTTP/1.1 200")
}

fn main() {
    outpost_models::bench_support::pin_to_one_core();
    let dir = workspace().join("target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    let input = dir.join("readings.jsonl");
    let readings = write_benchmark_input(&input, SENSORS, PER_SENSOR);
    // `-- --outpost-only N`: N replays of Outpost alone (for a profiler).
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--outpost-only") {
        let n: usize = args.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or(5);
        for _ in 0..n {
            let (s, inf, _, cpu) = outpost_replay_cpu(&input);
            println!(
                "{readings} readings, {inf} inferences in {s:.3} s: {:.0} readings/s; inference thread {cpu:.3} s CPU ({:.0} %)",
                readings as f64 / s,
                100.0 * cpu / s
            );
        }
        return;
    }
    let model = LoadedModel::load_static(
        bundled::MANIFEST,
        bundled::WEIGHTS,
        &burn::tensor::Device::flex(),
    )
    .expect("bundled model");
    let onnx = dir.join("basicmotions-fcn.onnx");
    std::fs::write(&onnx, model.to_onnx().expect("ONNX export")).expect("write ONNX");
    let manifest = dir.join("basicmotions-fcn.json");
    std::fs::write(&manifest, bundled::MANIFEST).expect("write manifest");
    let py = python();
    let script = workspace().join("tests/benches/python/pipeline.py");
    let py_cmd = || {
        let mut c = Command::new(&py);
        c.arg(&script).arg(&onnx).arg(&manifest);
        c
    };

    println!(
        "# End to end on one core (CPU 0): {readings} readings, {SENSORS} sensors, median of {RUNS} runs"
    );
    let mut ours = Vec::new();
    let mut infer_share = Vec::new();
    let mut theirs = Vec::new();
    let mut py_stages = None;
    let mut py_rss = 0;
    let (mut o_inf, mut o_classes) = (0, Default::default());
    let mut py_out = serde_json::Value::Null;
    for _ in 0..RUNS {
        let (s, inf, classes, cpu) = outpost_replay_cpu(&input);
        ours.push(s);
        infer_share.push(cpu / s);
        (o_inf, o_classes) = (inf, classes);
        let (out, rss) = run_measured(py_cmd().arg(&input).args(["60000", "100", "50"]));
        py_out = serde_json::from_str(out.trim()).expect("python JSON");
        theirs.push(py_out["seconds"].as_f64().expect("seconds"));
        py_stages = Some(py_out["stages"].clone());
        py_rss = py_rss.max(rss);
    }
    let (o, p) = (median(ours), median(theirs));
    println!("| pipeline | seconds | readings/s | vs Python |");
    println!("|---|---:|---:|---:|");
    println!(
        "| Outpost (replay pipeline, flex) | {o:.3} | {:.0} | {:.1}× |",
        readings as f64 / o,
        p / o
    );
    println!(
        "| Python (NumPy 2.1.3 + ONNX Runtime 1.20.1, 1 thread) | {p:.3} | {:.0} | 1.0× |",
        readings as f64 / p
    );
    println!(
        "Outpost: the inference thread's CPU time is {:.0} % of the wall time",
        100.0 * median(infer_share)
    );
    println!("Python stages (s): {}", py_stages.unwrap_or_default());
    let same = o_inf == py_out["windows"].as_u64().unwrap_or(0)
        && o_classes
            .iter()
            .all(|(k, v)| py_out["classes"][k].as_u64() == Some(*v));
    println!(
        "Same work: Outpost {o_inf} inferences {o_classes:?}; Python {} windows {}: {}",
        py_out["windows"],
        py_out["classes"],
        if same { "identical" } else { "DIFFERENT" }
    );

    // Footprint.
    let bin = workspace().join("target/release/outpost");
    if !bin.exists() {
        println!("\n(footprint skipped: build target/release/outpost first)");
        return;
    }
    println!("\n# Footprint: `outpost run` (release) against the Python pipeline");
    let size = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
    let mut ready = Vec::new();
    let mut rss = 0;
    for _ in 0..RUNS {
        let port = free_port();
        let cfg = dir.join("footprint.toml");
        std::fs::write(
            &cfg,
            format!(
                "[gateway]\nid = \"bench\"\n[[sources]]\ntype = \"simulated\"\nsensors = 8\nrate_hz = 500.0\nrealtime = true\n[outbox]\nkind = \"memory\"\n[metrics]\nlisten = \"127.0.0.1:{port}\"\nlog_interval_s = 0\n"
            ),
        )
        .expect("footprint config");
        let start = Instant::now();
        let mut child = Command::new(&bin)
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn outpost");
        while !http_ok(port, "/readyz") {
            assert!(start.elapsed() < Duration::from_secs(30), "not ready");
            std::thread::sleep(Duration::from_millis(1));
        }
        ready.push(start.elapsed().as_secs_f64());
        std::thread::sleep(Duration::from_secs(10));
        rss = rss.max(vm_hwm_kib(child.id()));
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut py_ready = Vec::new();
    for _ in 0..RUNS {
        let start = Instant::now();
        let (out, _) = run_measured(py_cmd().arg("--ready"));
        assert!(out.contains("ready_s"), "{out}");
        py_ready.push(start.elapsed().as_secs_f64());
    }
    let (r, pr) = (median(ready), median(py_ready));
    println!("| | Outpost | Python | Outpost / Python |");
    println!("|---|---:|---:|---:|");
    println!(
        "| start to ready | {:.1} ms | {:.1} ms | {:.2} |",
        r * 1e3,
        pr * 1e3,
        r / pr
    );
    println!(
        "| peak RSS | {:.1} MiB (run, 4,000 readings/s) | {:.1} MiB (the file above) | {:.2} |",
        rss as f64 / 1024.0,
        py_rss as f64 / 1024.0,
        rss as f64 / py_rss as f64
    );
    println!(
        "| binary | {:.1} MiB (x86-64, stripped) | | |",
        size as f64 / 1048576.0
    );
}
