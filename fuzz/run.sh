#!/usr/bin/env bash
# Fuzz every target (or those named) in turn, one process each, niced:
#   fuzz/run.sh [-t SECONDS] [-n] [TARGET...]     (-n: no build, run what is built)
# New corpus inputs go to fuzz/corpus/<target>/, crashes to
# fuzz/artifacts/<target>/ (git-ignored: a crash is fixed, then its input is
# committed to fuzz/regressions/<target>/). Logs: fuzz/target/logs/<target>.log.
# Needs a nightly toolchain and cargo-fuzz; see docs/fuzzing.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
secs=300
if [[ "${1:-}" == "-t" ]]; then
    secs=$2
    shift 2
fi
build=1
if [[ "${1:-}" == "-n" ]]; then
    build=0
    shift
fi
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    mapfile -t targets < <(ls fuzz_targets | sed 's/\.rs$//')
fi
# One build (debug assertions on, no sanitizer: safe Rust; see
# docs/fuzzing.md), then each target's binary run directly, so that a
# source change during the runs does not rebuild between targets.
if [[ $build == 1 ]]; then
    nice -n 10 cargo +nightly fuzz build -a -s none
fi
bin=target/x86_64-unknown-linux-gnu/release
mkdir -p target/logs
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    echo "== $t (${secs} s)"
    start=$(date +%s)
    set +e
    nice -n 10 "$bin/$t" -artifact_prefix="artifacts/$t/" \
        -max_total_time="$secs" -rss_limit_mb=4096 -timeout=20 -print_final_stats=1 \
        "corpus/$t" >"target/logs/$t.log" 2>&1
    rc=$?
    set -e
    grep -E '^#[0-9]+ +(pulse|DONE)|stat::number_of_executed_units|stat::peak_rss_mb' "target/logs/$t.log" | tail -4
    echo "   exit $rc after $(($(date +%s) - start)) s"
done
