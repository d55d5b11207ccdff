#!/usr/bin/env bash
# Prepares a Debian/Ubuntu machine for Outpost's tests. Idempotent.
#
#   1. installs the Debian packages listed in PACKAGES that are missing
#      (apt-get update runs only when something must be installed);
#   2. adds the Rust targets listed in RUST_TARGETS that are missing;
#   3. runs scripts/fetch-datasets.sh (environment variables such as
#      OUTPOST_DATASETS_MIRROR / OUTPOST_DATASETS_NO_MIRROR pass through).
#
# Runs as root, or as a user with sudo (only the apt-get steps use sudo; the
# datasets are fetched as the invoking user so the cache is not root-owned).
#
# The tests start their own mosquitto processes on free ports: the system
# mosquitto service that the Debian package may start on port 1883 is neither
# needed nor used, and this script does not start or enable it.
#
# Usage: scripts/setup.sh [-h|--help]
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# ---------------------------------------------------------------------------
# PACKAGES: Debian packages the tests need. Add to this list as needed, e.g.
#   qemu-user-static gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf
#   mesa-vulkan-drivers
# ---------------------------------------------------------------------------
PACKAGES=(
    mosquitto         # MQTT broker started by the integration tests
    mosquitto-clients # mosquitto_pub / mosquitto_sub
    python3           # scripts/fetch-datasets.sh; deploy/tests (preset rules with tomllib, the SAS token, the notify socket)
    python3-pip       # scripts/fetch-datasets.sh (aeon wheel download fallback)
    openssl           # the TLS end-to-end test makes its own CA and certificates
    gcc-aarch64-linux-gnu    # cross/: linker and C compiler (ring, zstd) for aarch64
    gcc-arm-linux-gnueabihf  # cross/: the same for armv7
    libc6-dev-arm64-cross    # cross/: glibc headers for aarch64 (only recommended by the gcc package)
    libc6-dev-armhf-cross    # cross/: glibc headers for armv7
    qemu-user-static         # cross/: runs the ARM binaries in the tests
    strace                   # deploy/tests/test-sandbox.sh: the gateway's system calls against the unit's filter
    systemd                  # deploy/tests/test-systemd.sh, test-sandbox.sh: systemd-analyze and the target units verified against
    binutils                 # deploy/package.sh: readelf (architecture, glibc version)
    mesa-vulkan-drivers      # lavapipe, a software Vulkan device: the GPU (wgpu) tests run on it
    libvulkan1               # the Vulkan loader wgpu opens at run time
    faketime                 # tests/tests/clock.rs: the gateway's wall clock jumped and set to 1970 (libfaketime)
)

# ---------------------------------------------------------------------------
# RUST_TARGETS: rustup targets to add.
# ---------------------------------------------------------------------------
RUST_TARGETS=(
    aarch64-unknown-linux-gnu     # cross/build.sh, tested under qemu
    armv7-unknown-linux-gnueabihf # cross/build.sh, tested under qemu
    thumbv7em-none-eabihf         # the no_std ADXL345 driver built for a microcontroller
)

case "${1:-}" in
    "") ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "setup: unknown argument: $1" >&2; exit 2 ;;
esac

as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        echo "setup: need root or sudo to run: $*" >&2
        exit 1
    fi
}

installed() {
    dpkg -s "$1" 2>/dev/null | grep -q '^Status: install ok installed$'
}

# 1. Debian packages
missing=()
for pkg in "${PACKAGES[@]}"; do
    if installed "$pkg"; then
        echo "setup: $pkg: installed"
    else
        missing+=("$pkg")
    fi
done
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "setup: installing ${missing[*]}"
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${missing[@]}"
    for pkg in "${missing[@]}"; do
        installed "$pkg" || { echo "setup: $pkg failed to install" >&2; exit 1; }
    done
fi

# The tests run the broker binary themselves; check it is there (it lives in
# /usr/sbin, which may not be on a non-root PATH).
if ! command -v mosquitto >/dev/null && [[ ! -x /usr/sbin/mosquitto ]]; then
    echo "setup: mosquitto binary not found (neither on PATH nor /usr/sbin/mosquitto)" >&2
    exit 1
fi

# 2. Rust targets
if [[ ${#RUST_TARGETS[@]} -gt 0 ]]; then
    if ! command -v rustup >/dev/null; then
        echo "setup: rustup not found; cannot add targets: ${RUST_TARGETS[*]}" >&2
        exit 1
    fi
    have_targets="$(rustup target list --installed)"
    for target in "${RUST_TARGETS[@]}"; do
        if grep -qx "$target" <<<"$have_targets"; then
            echo "setup: rust target $target: installed"
        else
            rustup target add "$target"
        fi
    done
fi

# 3. Datasets
"$SCRIPT_DIR/fetch-datasets.sh"

echo "setup: done"
