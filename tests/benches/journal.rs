//! The ingest journal's cost: readings per second of `outpost run` (the
//! release binary) over the same file of readings with the journal on and
//! off, in the same run, alternating, three runs each; the medians, their
//! ratio (goal ≥ 0.8) and the spread of each side.
//!
//! ```sh
//! cargo build --release -p outpost-runtime
//! cargo bench -p outpost-tests --bench journal
//! ```
//!
//! Both sides: a file source of 400,000 readings (8 sensors), the bundled
//! model, 10 s aggregation windows, the disk outbox syncing every 100 ms,
//! no uplink. With the journal on, every reading is also written and synced
//! (in groups of up to 4,096) before it goes on, and every aggregate's done
//! record is synced before its outbox append.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use outpost_tests::{reading, workspace};

const SENSORS: usize = 8;
const PER_SENSOR: usize = 50_000;
const RUNS: usize = 3;

fn write_input(path: &Path) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create input"));
    let base = 1_700_000_000_000i64;
    for k in 0..PER_SENSOR {
        for s in 0..SENSORS {
            let v = (k % 97) as f32 / 97.0;
            writeln!(
                out,
                "{}",
                reading(
                    &format!("s{s}"),
                    base + k as i64 * 100,
                    &[v, -v, 0.5, v, 0.0, 1.0]
                )
            )
            .expect("write input");
        }
    }
}

/// Seconds for one run of `outpost run` over `input`.
fn run(bin: &Path, input: &Path, dir: &Path, journal: bool) -> f64 {
    let state = dir.join(format!("state-{}", journal));
    let _ = std::fs::remove_dir_all(&state);
    let cfg = dir.join("bench.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nid = \"bench\"\nstate_dir = {state:?}\n\n[[sources]]\ntype = \"file\"\npath = {input:?}\n\n\
             [aggregation]\nwindow_ms = 10000\n\n[outbox]\nkind = \"disk\"\n\n[journal]\nenabled = {journal}\n\n\
             [audit]\nenabled = false\n\n[log]\nlevel = \"warn\"\n",
        ),
    )
    .expect("write config");
    let start = Instant::now();
    let status = Command::new(bin)
        .args(["run", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("outpost runs");
    let t = start.elapsed().as_secs_f64();
    assert!(status.success(), "outpost run failed ({status})");
    t
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let bin = workspace().join("target/release/outpost");
    if !bin.exists() {
        eprintln!("build the release binary first: cargo build --release -p outpost-runtime");
        std::process::exit(1);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("in.jsonl");
    write_input(&input);
    let n = (SENSORS * PER_SENSOR) as f64;
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        off.push(n / run(&bin, &input, dir.path(), false));
        on.push(n / run(&bin, &input, dir.path(), true));
    }
    let spread = |v: &[f64]| {
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, 0f64), |(l, h), x| (l.min(*x), h.max(*x)));
        format!("{lo:.0} to {hi:.0}")
    };
    let (m_on, m_off) = (median(on.clone()), median(off.clone()));
    println!("# Ingest journal: readings/s of `outpost run`, {n} readings, median of {RUNS}");
    println!("journal on : {m_on:.0} readings/s (runs {})", spread(&on));
    println!("journal off: {m_off:.0} readings/s (runs {})", spread(&off));
    println!("ratio on/off: {:.2} (goal >= 0.8)", m_on / m_off);
}
