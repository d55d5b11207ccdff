# Helpers shared by deploy/tests/test-*.sh (sourced, not run).
#
# Each test script takes the outpost binary as its first argument, prints one
# line per check ("ok" or "FAIL"), exits 1 at the first failure and 77 when
# a tool it needs is missing (run.sh reports that as a skip). Part of a test
# that cannot run for want of a tool prints a SKIP line and goes on (run.sh
# lists it). In CI (CI=true or CI=1, as CI services set it) every skip, whole
# or partial, is a failure instead: scripts/setup.sh installs every tool these
# tests use, so a skip there means a test that silently stopped testing.
# Temporary files live under one directory, removed on exit unless
# OUTPOST_TEST_KEEP=1.

set -euo pipefail

# Mosquitto lives in /usr/sbin, not on every user's PATH.
export PATH="$PATH:/usr/sbin:/sbin"

DEPLOY=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO=$(cd "$DEPLOY/.." && pwd)
TEST_NAME=$(basename "$0" .sh)
CHECKS=0

ok() {
    CHECKS=$((CHECKS + 1))
    echo "  ok    $*"
}
fail() {
    echo "  FAIL  $*" >&2
    exit 1
}
# Whether this is a CI run, where a skip is a failure.
in_ci() { [[ "${CI:-}" == true || "${CI:-}" == 1 ]]; }
# skip REASON: the whole test cannot run here.
skip() {
    if in_ci; then
        echo "  FAIL  skipped, and CI (CI=$CI) allows no skip: $*" >&2
        exit 1
    fi
    echo "  SKIP  $*"
    exit 77
}
# without REASON: part of the test cannot run here; the rest goes on.
without() {
    if in_ci; then
        fail "skipped, and CI (CI=$CI) allows no skip: $*"
    fi
    echo "  SKIP  $*"
    [[ -z "${OUTPOST_TEST_SKIPS:-}" ]] || echo "$TEST_NAME: $*" >>"$OUTPOST_TEST_SKIPS"
}
note() { echo "  ..    $*"; }

# check DESCRIPTION COMMAND...: the command must succeed.
check() {
    local desc=$1 out
    shift
    if out=$("$@" 2>&1); then
        ok "$desc"
    else
        [[ -z "$out" ]] || printf '%s\n' "$out" | sed 's/^/        | /' >&2
        fail "$desc"
    fi
}
# check_fails DESCRIPTION COMMAND...: the command must fail.
check_fails() {
    local desc=$1
    shift
    if "$@" >/dev/null 2>&1; then fail "$desc (it succeeded)"; else ok "$desc"; fi
}
check_eq() {
    local desc=$1 want=$2 got=$3
    if [[ "$want" == "$got" ]]; then
        ok "$desc"
    else
        fail "$desc: want '$want', got '$got'"
    fi
}
# A path for display: $TMP/... for the temporary directory, repo-relative
# for the source tree.
disp() {
    local p=$1
    if [[ -n "$ROOT_FOR_DISPLAY" && "$p" == "$ROOT_FOR_DISPLAY"/* ]]; then
        p="\$TMP${p#"$ROOT_FOR_DISPLAY"}"
    elif [[ "$p" == "$REPO"/* ]]; then
        p=${p#"$REPO"/}
    fi
    printf '%s' "$p"
}
check_mode() {
    local path=$1 want=$2 got
    [[ -e "$path" ]] || fail "$(disp "$path"): missing"
    got=$(stat -c %a "$path")
    check_eq "mode $want: $(disp "$path")" "$want" "$got"
}
check_file() { check "present: $(disp "$1")" test -e "$1"; }
check_absent() { check "absent: $(disp "$1")" test ! -e "$1"; }
check_same() { check "same bytes: $(disp "$2") = $(disp "$1")" cmp -s "$1" "$2"; }
check_grep() {
    local desc=$1 pattern=$2 file=$3
    if grep -qE -- "$pattern" "$file"; then ok "$desc"; else fail "$desc: /$pattern/ not in $file"; fi
}
check_no_grep() {
    local desc=$1 pattern=$2 file=$3
    if grep -qE -- "$pattern" "$file"; then fail "$desc: /$pattern/ found in $file"; else ok "$desc"; fi
}
ROOT_FOR_DISPLAY=""

need() {
    local t
    for t in "$@"; do
        command -v "$t" >/dev/null || skip "$t is not installed"
    done
}

# The binary under test, as an absolute path. A copy is taken (after
# setup_tmp), so that a rebuild of target/ during the run cannot change it
# between two checks; run.sh takes one copy for all tests
# (OUTPOST_TEST_SNAPSHOT=1).
setup_binary() {
    [[ $# -ge 1 ]] || {
        echo "usage: $0 PATH_TO_OUTPOST_BINARY" >&2
        exit 2
    }
    OUTPOST=$(realpath "$1")
    [[ -f "$OUTPOST" && -x "$OUTPOST" ]] || fail "$OUTPOST is not an executable file"
    if [[ "${OUTPOST_TEST_SNAPSHOT:-0}" != 1 ]]; then
        [[ -n "${TMP:-}" ]] || fail "setup_tmp must come before setup_binary"
        mkdir -p "$TMP/bin"
        cp "$OUTPOST" "$TMP/bin/outpost"
        OUTPOST="$TMP/bin/outpost"
    fi
}

setup_tmp() {
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/outpost-$TEST_NAME.XXXXXX")
    ROOT_FOR_DISPLAY=$TMP
    if [[ "${OUTPOST_TEST_KEEP:-0}" == 1 ]]; then
        trap 'echo "  ..    kept $TMP"' EXIT
    else
        trap 'rm -rf "$TMP"' EXIT
    fi
}

# The workspace version, as package.sh reads it.
workspace_version() {
    awk '/^\[/ { s = $0 } s == "[workspace.package]" && $1 == "version" { gsub(/[" ]/, "", $3); print $3; exit }' \
        "$REPO/Cargo.toml"
}

# The .deb and tarball of the binary under test: from $OUTPOST_TEST_DIST
# (run.sh builds them once), else built here with package.sh --fast.
setup_dist() {
    VERSION=$(workspace_version)
    DEB_ARCH=$(dpkg --print-architecture 2>/dev/null || echo amd64)
    if [[ -n "${OUTPOST_TEST_DIST:-}" && -f "$OUTPOST_TEST_DIST/outpost_${VERSION}_${DEB_ARCH}.deb" ]]; then
        DIST=$OUTPOST_TEST_DIST
    else
        DIST="$TMP/dist"
        note "building the packages (package.sh --fast)"
        "$DEPLOY/package.sh" --fast --out "$DIST" "$OUTPOST" "$DEB_ARCH" >/dev/null
    fi
    DEB="$DIST/outpost_${VERSION}_${DEB_ARCH}.deb"
    TARBALL="$DIST/outpost-$VERSION-$DEB_ARCH.tar.gz"
    [[ -f "$DEB" && -f "$TARBALL" ]] || fail "packages missing in $DIST"
}

finish() { echo "$TEST_NAME: $CHECKS checks passed"; }
