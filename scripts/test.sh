#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: system packages and
# datasets (scripts/setup.sh), then format, build, lint and every test.
# `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

start=$(date +%s)
# Cargo's output directory (CARGO_TARGET_DIR when set).
tgt="${CARGO_TARGET_DIR:-target}"
# One build, no edits between steps: incremental state would only take disk
# (gigabytes for the test binaries).
export CARGO_INCREMENTAL=0
step() { echo "== $* ($(($(date +%s) - start)) s)"; }

step "setup: system packages and datasets"
scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

# --all-targets: the binaries the end-to-end tests run are built with the
# same feature set as the tests, so `cargo test` reuses every artifact.
# --features gpu: one build with burn's wgpu backend serves the CPU and the
# GPU tests alike (the GPU ones run on lavapipe, installed by setup.sh); the
# build without it is the ARM one below, which is what ships.
features=(--features gpu)
step "cargo build --all-targets ${features[*]}"
cargo build --workspace --all-targets --locked "${features[@]}"

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked "${features[@]}" -- -D warnings

step "cargo test"
cargo test --workspace --locked "${features[@]}"

# The sensor driver is no_std and generic over embedded-hal: it must build
# for a microcontroller as well as for the gateway.
step "ADXL345 driver for thumbv7em-none-eabihf"
cargo build -p outpost-adxl345 --target thumbv7em-none-eabihf --locked

# The ARM release binaries, then the tests that run them under qemu-user
# (replay parity with x86-64, an MQTT smoke test against host Mosquitto).
step "cross/build.sh (aarch64, armv7 release)"
cross/build.sh
step "ARM binaries under qemu"
# --workspace and the same features as above: the same feature resolution,
# so the test binary is the one already built (-p alone would rebuild burn).
cargo test --workspace --locked "${features[@]}" --test cross -- --ignored

# Packaging, install into a temporary root, the systemd unit (verify,
# security score, the binary's system calls against its sandbox), and every
# example configuration through `outpost check`: deploy/README.md.
step "deploy/tests (x86-64 debug binary)"
deploy/tests/run.sh "$tgt/debug/outpost"
# The packages of the ARM binaries just tested under qemu.
step "deploy/package.sh: arm64 and armhf"
deploy/package.sh --out "$tgt/dist" "$tgt/aarch64-unknown-linux-gnu/release/outpost" arm64
deploy/package.sh --out "$tgt/dist" "$tgt/armv7-unknown-linux-gnueabihf/release/outpost" armhf

step "done"
