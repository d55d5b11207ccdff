//! Helpers of the workspace's benchmarks (not part of the model API).

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
