//! Helpers of the workspace's benchmarks and tests (not part of the model API).

/// Run this process on CPU 0 only: re-executes itself under `taskset -c 0`
/// (once; `OUTPOST_BENCH_PINNED` marks the child) and exits with its status.
/// Where `taskset` is missing, says so and goes on unpinned.
pub fn pin_to_one_core() {
    if std::env::var_os("OUTPOST_BENCH_PINNED").is_some() {
        return;
    }
    let exe = std::env::current_exe().expect("the benchmark's own path");
    match std::process::Command::new("taskset")
        .args(["-c", "0"])
        .arg(exe)
        .args(std::env::args().skip(1))
        .env("OUTPOST_BENCH_PINNED", "1")
        .status()
    {
        Ok(s) => std::process::exit(s.code().unwrap_or(1)),
        Err(e) => eprintln!("taskset not available ({e}); running unpinned"),
    }
}

/// Median over `rounds` of the mean time per call, the two contenders in
/// alternating rounds so that drift hits both.
pub fn measure(
    round: std::time::Duration,
    rounds: usize,
    mut a: impl FnMut(),
    mut b: impl FnMut(),
) -> (f64, f64) {
    let time = |f: &mut dyn FnMut()| {
        let start = std::time::Instant::now();
        let mut n = 0u32;
        while n < 3 || start.elapsed() < round {
            f();
            n += 1;
        }
        start.elapsed().as_secs_f64() / n as f64
    };
    // Warm-up: caches, allocator, lazily built kernels.
    time(&mut a);
    time(&mut b);
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        ta.push(time(&mut a));
        tb.push(time(&mut b));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (median(&mut ta), median(&mut tb))
}

/// `n` deterministic values in [-2, 2) (xorshift64): roughly normalized
/// model input.
pub fn windows(n: usize) -> Vec<f32> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

/// The largest |a - b| over two outputs of the same length (a peer's, the
/// other device's): how far apart two runs of one model are.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "outputs of the same shape");
    a.iter()
        .zip(b)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max)
}
