#!/usr/bin/env bash
# Package an already-built `outpost` binary: a Debian package and a tarball
# with an offline installer. Compiles nothing.
#
#   deploy/package.sh [options] BINARY ARCH
#
#   BINARY  the outpost executable, e.g. target/aarch64-unknown-linux-gnu/release/outpost
#   ARCH    its Debian architecture: amd64, arm64 or armhf (checked against
#           the ELF header)
#
# Options:
#   --out DIR          where the packages go (default: target/dist)
#   --version V        package version (default: [workspace.package] version
#                      of the workspace Cargo.toml)
#   --fast             gzip -1 for both outputs (tests; the default is xz for
#                      the .deb and gzip -9 for the tarball)
#   --deb-compress C   xz (default), gzip, zstd or none
#   --maintainer M     the .deb's Maintainer field
#                      (default: $DEB_MAINTAINER, else a placeholder)
#
# Writes:
#   DIR/outpost_VERSION_ARCH.deb       dpkg -i / apt install ./...
#   DIR/outpost-VERSION-ARCH.tar.gz    outpost-VERSION-ARCH/install.sh
#
# A glibc binary gets Depends: libc6 (>= the newest GLIBC_ symbol version it
# needs), libgcc-s1 when it links libgcc_s; a static (musl) binary none.
# SOURCE_DATE_EPOCH (default: the last commit's time) fixes the timestamps,
# so the same inputs give the same archives. Needs dpkg-deb and readelf.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

die() { echo "package.sh: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

out="$repo/target/dist"
version=""
fast=0
deb_compress=xz
maintainer=${DEB_MAINTAINER:-"Outpost maintainers <outpost@example.invalid>"}
args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) out=${2:?--out needs a directory}; shift 2 ;;
        --version) version=${2:?--version needs a value}; shift 2 ;;
        --fast) fast=1; shift ;;
        --deb-compress) deb_compress=${2:?--deb-compress needs xz, gzip, zstd or none}; shift 2 ;;
        --maintainer) maintainer=${2:?--maintainer needs a value}; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) args+=("$1"); shift ;;
    esac
done
[[ ${#args[@]} -eq 2 ]] || { usage >&2; exit 2; }
bin=${args[0]}
arch=${args[1]}

for tool in dpkg-deb readelf tar gzip md5sum; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install dpkg binutils)"
done
[[ -f "$bin" && -x "$bin" ]] || die "$bin: not an executable file"
case "$deb_compress" in xz | gzip | zstd | none) ;; *) die "--deb-compress: $deb_compress" ;; esac

# --- The version -------------------------------------------------------------
if [[ -z "$version" ]]; then
    version=$(awk '
        /^\[/ { section = $0 }
        section == "[workspace.package]" && $1 == "version" {
            gsub(/[" ]/, "", $3); print $3; exit
        }' "$repo/Cargo.toml")
    [[ -n "$version" ]] || die "no version in [workspace.package] of $repo/Cargo.toml"
fi
[[ "$version" =~ ^[0-9][A-Za-z0-9.+~-]*$ ]] || die "version $version is not a Debian version"

# --- The binary: architecture and libraries ----------------------------------
header=$(LC_ALL=C readelf -h "$bin" 2>/dev/null) || die "$bin: not an ELF file"
machine=$(sed -n 's/^ *Machine: *//p' <<<"$header")
flags=$(sed -n 's/^ *Flags: *//p' <<<"$header")
case "$arch" in
    amd64) [[ "$machine" == *X86-64* ]] || die "$bin is '$machine', not amd64" ;;
    arm64) [[ "$machine" == AArch64 ]] || die "$bin is '$machine', not arm64" ;;
    armhf)
        [[ "$machine" == ARM ]] || die "$bin is '$machine', not armhf"
        [[ "$flags" == *hard-float* ]] || die "$bin is ARM without the hard-float ABI, not armhf"
        ;;
    *) die "architecture $arch: use amd64, arm64 or armhf" ;;
esac

depends=()
interp=$(LC_ALL=C readelf -lW "$bin" | sed -n 's/.*Requesting program interpreter: \(.*\)\]/\1/p')
if [[ -n "$interp" ]]; then
    [[ "$interp" != *musl* ]] || die "$bin is dynamically linked against musl; build it static"
    glibc=$(LC_ALL=C readelf -VW "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1)
    [[ -n "$glibc" ]] || die "$bin: dynamically linked but no GLIBC_ symbol versions"
    depends+=("libc6 (>= $glibc)")
    while read -r lib; do
        case "$lib" in
            libc.so.6 | libm.so.6 | libpthread.so.0 | libdl.so.2 | librt.so.1 | ld-linux*) ;;
            libgcc_s.so.1) depends+=("libgcc-s1 (>= 3.0)") ;;
            *) die "$bin needs $lib, which this script does not know a package for" ;;
        esac
    done < <(LC_ALL=C readelf -dW "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
fi
depends+=("adduser | passwd")
depends_line=$(
    IFS=,
    echo "${depends[*]}" | sed 's/,/, /g'
)

export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || date +%s)}

mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "$out/.package.XXXXXX")
trap 'rm -rf "$work"' EXIT

# The files both packages carry, from the source tree.
examples=("$here"/examples/*.toml "$here/examples/mosquitto-bridge.conf")

# --- The .deb ------------------------------------------------------------------
deb="$work/deb"
install -d -m 0755 "$deb/DEBIAN" "$deb/usr/bin" "$deb/lib/systemd/system" \
    "$deb/usr/lib/outpost" "$deb/usr/share/doc/outpost/examples/systemd"
install -d -m 0750 "$deb/etc/outpost"
install -m 0755 "$bin" "$deb/usr/bin/outpost"
install -m 0644 "$here/systemd/outpost.service" "$here/systemd/outpost-azure-sas.service" \
    "$here/systemd/outpost-azure-sas.timer" "$deb/lib/systemd/system/"
install -m 0755 "$here/azure/outpost-azure-sas" "$deb/usr/lib/outpost/outpost-azure-sas"
install -m 0640 "$here/etc/outpost.toml" "$deb/etc/outpost/outpost.toml"
install -m 0644 "$here/README.md" "$deb/usr/share/doc/outpost/README.md"
install -m 0644 "${examples[@]}" "$deb/usr/share/doc/outpost/examples/"
install -m 0644 "$here/systemd/i2c.conf" "$deb/usr/share/doc/outpost/examples/systemd/i2c.conf"
cat >"$deb/usr/share/doc/outpost/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: outpost
Source: $(awk -F'"' '/^repository *=/ {print $2; exit}' "$repo/Cargo.toml")

Files: *
Copyright: The Outpost authors
License: Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
EOF
chmod 0644 "$deb/usr/share/doc/outpost/copyright"

# As dpkg-gencontrol counts it: each file's size in KiB rounded up, 1 per
# directory (apparent sizes: a sparse copy must not shrink it).
installed_kb=$(cd "$deb" && find . -path ./DEBIAN -prune -o -printf '%y %s\n' |
    awk '$1 == "f" { kb += int(($2 + 1023) / 1024); next } { kb += 1 } END { print kb }')
homepage=$(awk -F'"' '/^repository *=/ {print $2; exit}' "$repo/Cargo.toml")
cat >"$deb/DEBIAN/control" <<EOF
Package: outpost
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_kb
Depends: $depends_line
Recommends: openssl
Suggests: mosquitto
Section: net
Priority: optional
Homepage: $homepage
Description: edge inference gateway: sensor readings in, aggregates out
 Outpost ingests sensor readings at a field site (MQTT, files, I2C, Modbus),
 runs ML inference on the gateway's CPU, aggregates the results over time
 windows and forwards only the aggregates to a cloud MQTT broker (AWS IoT
 Core, Azure IoT Hub, EMQX, HiveMQ, a Mosquitto bridge), through a durable
 on-disk outbox that rides out uplink outages.
 .
 Runs as the hardened systemd service outpost.service under its own system
 user; configuration in /etc/outpost, state in /var/lib/outpost.
EOF
echo "/etc/outpost/outpost.toml" >"$deb/DEBIAN/conffiles"
for s in postinst prerm postrm; do
    install -m 0755 "$here/debian/$s" "$deb/DEBIAN/$s"
done
(cd "$deb" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z |
    xargs -0 md5sum) >"$deb/DEBIAN/md5sums"
chmod 0644 "$deb/DEBIAN/control" "$deb/DEBIAN/conffiles" "$deb/DEBIAN/md5sums"

deb_file="$out/outpost_${version}_${arch}.deb"
if [[ $fast -eq 1 ]]; then
    dpkg-deb --root-owner-group -Zgzip -z1 --build "$deb" "$deb_file" >/dev/null
else
    dpkg-deb --root-owner-group "-Z$deb_compress" --build "$deb" "$deb_file" >/dev/null
fi
echo "package.sh: $deb_file"

# --- The tarball ----------------------------------------------------------------
name="outpost-$version-$arch"
t="$work/tar/$name"
install -d -m 0755 "$t/bin" "$t/lib" "$t/systemd" "$t/etc" "$t/examples"
install -m 0755 "$bin" "$t/bin/outpost"
install -m 0755 "$here/azure/outpost-azure-sas" "$t/lib/outpost-azure-sas"
install -m 0644 "$here/systemd/outpost.service" "$here/systemd/outpost-azure-sas.service" \
    "$here/systemd/outpost-azure-sas.timer" "$here/systemd/i2c.conf" "$t/systemd/"
install -m 0644 "$here/etc/outpost.toml" "$t/etc/outpost.toml"
install -m 0644 "${examples[@]}" "$t/examples/"
install -m 0644 "$here/README.md" "$t/README.md"
install -m 0644 "$deb/usr/share/doc/outpost/copyright" "$t/copyright"
install -m 0755 "$here/install.sh" "$t/install.sh"
printf '%s %s\n' "$version" "$arch" >"$t/VERSION"
chmod 0644 "$t/VERSION"

tar_file="$out/$name.tar.gz"
level=9
[[ $fast -eq 1 ]] && level=1
tar -C "$work/tar" --sort=name --owner=0 --group=0 --numeric-owner \
    --mtime="@$SOURCE_DATE_EPOCH" -cf - "$name" | gzip -n "-$level" >"$tar_file"
echo "package.sh: $tar_file"
