#!/usr/bin/env bash
# Tools for the static musl builds (cross/build.sh --musl): zig as the C
# compiler and linker for musl targets, and cargo-zigbuild to drive it, both
# from PyPI into a virtual environment under .cache/zig (git-ignored), plus
# the rustup targets. Idempotent. Debian has no aarch64/armhf musl cross gcc,
# which is why zig is used; ring and zstd compile with it, no cmake or clang.
#
# Afterwards: PATH="$PWD/.cache/zig/bin:$PATH" cross/build.sh --musl
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv=.cache/zig
if [[ ! -x "$venv/bin/cargo-zigbuild" ]]; then
    if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
        if [[ "$(id -u)" -eq 0 ]]; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv
        else
            sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv
        fi
    fi
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "ziglang==0.14.1" "cargo-zigbuild==0.24.0"
fi
failed=()
for t in aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf; do
    if rustup target list --installed | grep -qx "$t"; then
        echo "setup-musl: rust target $t: installed"
    elif ! rustup target add "$t" >/tmp/setup-musl-rustup.log 2>&1; then
        echo "setup-musl: rustup target add $t failed:" >&2
        grep -m2 -E "error|404" /tmp/setup-musl-rustup.log >&2 || true
        failed+=("$t")
    fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "setup-musl: missing targets: ${failed[*]}; cross/build.sh can still build the others by name" >&2
    exit 1
fi
echo "setup-musl: done; run: PATH=\"$PWD/$venv/bin:\$PATH\" cross/build.sh --musl"
