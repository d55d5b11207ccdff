#!/usr/bin/env bash
# Puts the UCR/UEA (and UCI Daphnet) datasets used by Outpost's tests and
# training into the git-ignored cache <repo>/.cache/datasets/:
#
#   BasicMotions/BasicMotions_{TRAIN,TEST}.ts
#   ItalyPowerDemand/ItalyPowerDemand_{TRAIN,TEST}.ts
#   ACSF1/ACSF1_{TRAIN,TEST}.ts
#   Daphnet_S06R02E0/S06R02E0.csv
#
# Sources, per dataset, in order:
#   1. the cache itself, when every file is there with the expected checksum;
#   2. a local mirror: $OUTPOST_DATASETS_MIRROR, then <repo>/../shared/datasets;
#   3. the aeon 1.6.0 wheel from PyPI (`pip download`), whose package data holds
#      the files under aeon/datasets/data/<Dataset>/.
#
# Every file is checked against a pinned SHA-256, whatever its source.
# Idempotent: a second run with a complete cache does nothing.
#
# Usage: scripts/fetch-datasets.sh [--no-mirror] [-h|--help]
#
# Environment:
#   OUTPOST_DATASETS_CACHE      cache directory (default <repo>/.cache/datasets)
#   OUTPOST_DATASETS_MIRROR     directory laid out like the cache, tried first
#   OUTPOST_DATASETS_NO_MIRROR  =1: ignore all mirrors (same as --no-mirror)
#   OUTPOST_AEON_WHEEL          path to an already downloaded
#                               aeon-1.6.0-py3-none-any.whl (skips pip download)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$SCRIPT_DIR")"

AEON_VERSION="1.6.0"
WHEEL_PREFIX="aeon/datasets/data"

CACHE="${OUTPOST_DATASETS_CACHE:-$REPO_ROOT/.cache/datasets}"
NO_MIRROR="${OUTPOST_DATASETS_NO_MIRROR:-0}"

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --no-mirror) NO_MIRROR=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "fetch-datasets: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

# dataset|path relative to the cache|sha256
FILES=(
    "BasicMotions|BasicMotions/BasicMotions_TRAIN.ts|8dc43cc6306cb679c888c01e26f91772ac4441a916da43bac8b79734a538b9d6"
    "BasicMotions|BasicMotions/BasicMotions_TEST.ts|79213102bc6fca1a398ad98ce1185dff0208fa3d1465e687f48288946b0ff8dc"
    "ItalyPowerDemand|ItalyPowerDemand/ItalyPowerDemand_TRAIN.ts|341269cb7e6cef96846b30e774580beec79addb93848ba360145219115a74b7c"
    "ItalyPowerDemand|ItalyPowerDemand/ItalyPowerDemand_TEST.ts|26122451f87dd0387ef90b18bc8a86c041371b8a1c068004922b939971247144"
    "ACSF1|ACSF1/ACSF1_TRAIN.ts|0646b90dc4843e02baed6b2ba345c5601a4991b6796565489cef1b2d92a7537b"
    "ACSF1|ACSF1/ACSF1_TEST.ts|93e8aaeb44a10af181d24a156e60da7021193cd990ca28f263fccf3b905bfebf"
    "Daphnet_S06R02E0|Daphnet_S06R02E0/S06R02E0.csv|5a1d2990fec3846c3e1bc43487f0860e63434bd06b3df763012e97ce23d0d84c"
)
DATASETS=(BasicMotions ItalyPowerDemand ACSF1 Daphnet_S06R02E0)

# Mirrors to try, in order (only existing directories).
MIRRORS=()
if [[ "$NO_MIRROR" != "1" ]]; then
    if [[ -n "${OUTPOST_DATASETS_MIRROR:-}" && -d "$OUTPOST_DATASETS_MIRROR" ]]; then
        MIRRORS+=("$OUTPOST_DATASETS_MIRROR")
    fi
    if [[ -d "$REPO_ROOT/../shared/datasets" ]]; then
        MIRRORS+=("$(cd "$REPO_ROOT/../shared/datasets" && pwd)")
    fi
fi

TMP=""
cleanup() {
    if [[ -n "$TMP" ]]; then rm -rf "$TMP"; fi
}
trap cleanup EXIT

sha256_of() {
    sha256sum "$1" | cut -d' ' -f1
}

# Prints "relpath sha256" for each file of dataset $1.
files_of() {
    local entry ds rel sum
    for entry in "${FILES[@]}"; do
        IFS='|' read -r ds rel sum <<<"$entry"
        if [[ "$ds" == "$1" ]]; then
            echo "$rel $sum"
        fi
    done
}

# True when directory $2 holds every file of dataset $1 with the right checksum.
complete_in() {
    local ds="$1" dir="$2" rel sum
    while read -r rel sum; do
        [[ -f "$dir/$rel" ]] || return 1
        [[ "$(sha256_of "$dir/$rel")" == "$sum" ]] || return 1
    done < <(files_of "$ds")
}

# Copies dataset $1 from directory $2 into the cache, atomically per file.
copy_from() {
    local ds="$1" dir="$2" rel sum
    while read -r rel sum; do
        mkdir -p "$CACHE/$(dirname "$rel")"
        cp "$dir/$rel" "$CACHE/$rel.part"
        chmod 0644 "$CACHE/$rel.part"
        mv -f "$CACHE/$rel.part" "$CACHE/$rel"
    done < <(files_of "$ds")
}

WHEEL=""
get_wheel() {
    if [[ -n "$WHEEL" ]]; then return 0; fi
    if [[ -n "${OUTPOST_AEON_WHEEL:-}" ]]; then
        WHEEL="$OUTPOST_AEON_WHEEL"
        [[ -f "$WHEEL" ]] || { echo "fetch-datasets: OUTPOST_AEON_WHEEL=$WHEEL: no such file" >&2; exit 1; }
        return 0
    fi
    command -v python3 >/dev/null || { echo "fetch-datasets: python3 is required to download the aeon wheel" >&2; exit 1; }
    TMP="$(mktemp -d)"
    echo "fetch-datasets: downloading aeon==$AEON_VERSION wheel from PyPI ..." >&2
    if ! python3 -m pip download --quiet --disable-pip-version-check --no-deps \
        --only-binary=:all: "aeon==$AEON_VERSION" -d "$TMP" >&2; then
        echo "fetch-datasets: pip download of aeon==$AEON_VERSION failed (no network? set OUTPOST_DATASETS_MIRROR or OUTPOST_AEON_WHEEL)" >&2
        exit 1
    fi
    WHEEL="$(find "$TMP" -maxdepth 1 -name "aeon-$AEON_VERSION-*.whl" | head -n 1)"
    [[ -n "$WHEEL" ]] || { echo "fetch-datasets: pip did not produce an aeon-$AEON_VERSION wheel in $TMP" >&2; exit 1; }
}

# Extracts dataset $1 from the aeon wheel into the cache.
extract_from_wheel() {
    local ds="$1"
    get_wheel
    local rels=() rel sum
    while read -r rel sum; do
        rels+=("$rel")
    done < <(files_of "$ds")
    # The program comes from the here-document; the files to extract are arguments.
    python3 - "$WHEEL" "$WHEEL_PREFIX" "$CACHE" "${rels[@]}" <<'PY'
import os
import sys
import zipfile

wheel, prefix, cache = sys.argv[1], sys.argv[2], sys.argv[3]
with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    for rel in sys.argv[4:]:
        member = f"{prefix}/{rel}"
        if member not in names:
            sys.exit(f"fetch-datasets: {member} not found in {wheel}")
        dest = os.path.join(cache, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        part = dest + ".part"
        with z.open(member) as src, open(part, "wb") as out:
            while True:
                chunk = src.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
        os.chmod(part, 0o644)
        os.replace(part, dest)
PY
}

mkdir -p "$CACHE"
for ds in "${DATASETS[@]}"; do
    if complete_in "$ds" "$CACHE"; then
        echo "$ds: cached in $CACHE/$ds"
        continue
    fi
    source=""
    for mirror in "${MIRRORS[@]+"${MIRRORS[@]}"}"; do
        if complete_in "$ds" "$mirror"; then
            copy_from "$ds" "$mirror"
            source="copied from $mirror/$ds"
            break
        fi
    done
    if [[ -z "$source" ]]; then
        extract_from_wheel "$ds"
        source="extracted from aeon-$AEON_VERSION wheel ($WHEEL_PREFIX/$ds)"
    fi
    if ! complete_in "$ds" "$CACHE"; then
        echo "fetch-datasets: $ds: checksum mismatch after fetching ($source)" >&2
        exit 1
    fi
    echo "$ds: $source -> $CACHE/$ds"
done
