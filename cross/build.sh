#!/usr/bin/env bash
# Release binaries of `outpost` for ARM gateways.
#
#   cross/build.sh            aarch64-unknown-linux-gnu and
#                             armv7-unknown-linux-gnueabihf (glibc >= 2.34,
#                             Debian 12's cross toolchains; what CI tests)
#   cross/build.sh --musl     also the static musl builds
#                             (aarch64-unknown-linux-musl,
#                             armv7-unknown-linux-musleabihf) for gateways
#                             with an older glibc, linked by zig through
#                             cargo-zigbuild (cross/setup-musl.sh installs both
#                             from PyPI and adds the rustup targets)
#   cross/build.sh TARGET...  only these targets
#   cross/build.sh --features gpu [...]
#                             with GPU inference (burn's wgpu backend, for
#                             Jetson-class boards); adds about 20 minutes of
#                             build per target, and is not what CI tests
#
# Binaries go to target/<target>/release/outpost (stripped: see
# [profile.release] in Cargo.toml); their sizes are printed and written to
# target/cross-sizes.txt. Needs scripts/setup.sh (cross gcc, rustup targets).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

GNU=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
MUSL=(aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf)

features=()
if [[ "${1:-}" == --features ]]; then
    [[ $# -ge 2 ]] || { echo "cross/build.sh: --features needs a value" >&2; exit 2; }
    features=(--features "$2")
    shift 2
fi

targets=()
case "${1:-}" in
    "") targets=("${GNU[@]}") ;;
    --musl) targets=("${GNU[@]}" "${MUSL[@]}") ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) targets=("$@") ;;
esac

# Cargo's output directory (CARGO_TARGET_DIR when set).
tgt="${CARGO_TARGET_DIR:-target}"
mkdir -p "$tgt"
: >"$tgt/cross-sizes.txt"
report() { # target, seconds
    local bin="$tgt/$1/release/outpost" size line
    size=$(stat -c %s "$bin")
    line="$1 $size bytes ($(awk "BEGIN{printf \"%.1f\", $size/1048576}") MiB), built in $2 s"
    echo "cross/build.sh: $line"
    echo "$line" >>"$tgt/cross-sizes.txt"
}
# The glibc targets in one cargo invocation: the release profile's fat LTO
# ends each target's build with a long single-threaded step, and one
# invocation runs the two targets' steps side by side on two cores (about a
# third less wall time than one target after the other).
gnu=() musl=()
for t in "${targets[@]}"; do
    case "$t" in *-musl*) musl+=("$t") ;; *) gnu+=("$t") ;; esac
done
if [[ ${#gnu[@]} -gt 0 ]]; then
    start=$(date +%s)
    cargo build --locked --release -p outpost-runtime --bin outpost \
        $(printf -- '--target %s ' "${gnu[@]}") ${features[@]+"${features[@]}"}
    for t in "${gnu[@]}"; do report "$t" "$(($(date +%s) - start))"; done
fi
for t in ${musl[@]+"${musl[@]}"}; do
    start=$(date +%s)
    command -v cargo-zigbuild >/dev/null || {
        echo "cross/build.sh: cargo-zigbuild not found; run cross/setup-musl.sh" >&2
        exit 1
    }
    cargo zigbuild --locked --release -p outpost-runtime --bin outpost --target "$t" ${features[@]+"${features[@]}"}
    report "$t" "$(($(date +%s) - start))"
done
