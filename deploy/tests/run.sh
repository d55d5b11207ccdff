#!/usr/bin/env bash
# Every deploy/ test against one outpost binary. Needs no network and no
# cargo; never installs anything on this machine (install.sh runs with
# --root into temporary directories only).
#
#   deploy/tests/run.sh PATH_TO_OUTPOST_BINARY [TEST...]
#
#   TEST: package, install, systemd, configs, sandbox (default: all)
#
# The binary is copied once and packaged once (package.sh --fast: gzip -1,
# so that a 400 MB debug binary packs in seconds); the tests share both.
# Exit status 1 if any test failed. A test whose tool is missing (exit 77)
# is reported as skipped, and the parts of tests skipped for a missing tool
# are listed; with CI=true (or 1) in the environment, as CI services set it,
# every skip fails the run instead (scripts/setup.sh installs every tool).
# OUTPOST_TEST_KEEP=1 keeps the temporary files.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
deploy=$(cd "$here/.." && pwd)

[[ $# -ge 1 ]] || {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
    exit 2
}
bin=$(realpath "$1")
shift
[[ -f "$bin" && -x "$bin" ]] || { echo "run.sh: $bin is not an executable file" >&2; exit 2; }
tests=("$@")
[[ ${#tests[@]} -gt 0 ]] || tests=(package install systemd configs sandbox)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/outpost-deploy-tests.XXXXXX")
if [[ "${OUTPOST_TEST_KEEP:-0}" == 1 ]]; then
    trap 'echo "run.sh: kept $tmp"' EXIT
else
    trap 'rm -rf "$tmp"' EXIT
fi

start=$(date +%s)
cp "$bin" "$tmp/outpost"
echo "run.sh: $bin ($(stat -c %s "$bin") bytes), copied to $tmp/outpost"
arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
if ! "$deploy/package.sh" --fast --out "$tmp/dist" "$tmp/outpost" "$arch"; then
    echo "run.sh: package.sh failed" >&2
    exit 1
fi
export OUTPOST_TEST_DIST="$tmp/dist" OUTPOST_TEST_SNAPSHOT=1
# The parts of tests skipped (lib.sh's `without`), one line each.
export OUTPOST_TEST_SKIPS="$tmp/skips"
: >"$OUTPOST_TEST_SKIPS"
ci=0
[[ "${CI:-}" == true || "${CI:-}" == 1 ]] && ci=1

passed=() failed=() skipped=()
for t in "${tests[@]}"; do
    script="$here/test-$t.sh"
    [[ -x "$script" ]] || { echo "run.sh: no test $t ($script)" >&2; failed+=("$t"); continue; }
    echo
    rc=0
    "$script" "$tmp/outpost" || rc=$?
    case $rc in
        0) passed+=("$t") ;;
        77) if [[ $ci == 1 ]]; then failed+=("$t(skipped)"); else skipped+=("$t"); fi ;;
        *) failed+=("$t") ;;
    esac
done

echo
if [[ -s "$OUTPOST_TEST_SKIPS" ]]; then
    echo "run.sh: parts skipped (a tool is missing; scripts/setup.sh installs them):"
    sed 's/^/  SKIP  /' "$OUTPOST_TEST_SKIPS"
    [[ $ci == 0 ]] || failed+=("partial-skips")
fi
echo "run.sh: passed: ${passed[*]:-none}; skipped: ${skipped[*]:-none}; failed: ${failed[*]:-none} ($(($(date +%s) - start)) s)"
if [[ ${#skipped[@]} -gt 0 || -s "$OUTPOST_TEST_SKIPS" ]]; then
    echo "run.sh: SOME TESTS DID NOT RUN (skipped); with CI=true they fail the run"
fi
[[ ${#failed[@]} -eq 0 ]]
