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
# Exit status 1 if any test failed; a test whose tool is missing (exit 77)
# is reported as skipped. OUTPOST_TEST_KEEP=1 keeps the temporary files.
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

passed=() failed=() skipped=()
for t in "${tests[@]}"; do
    script="$here/test-$t.sh"
    [[ -x "$script" ]] || { echo "run.sh: no test $t ($script)" >&2; failed+=("$t"); continue; }
    echo
    rc=0
    "$script" "$tmp/outpost" || rc=$?
    case $rc in
        0) passed+=("$t") ;;
        77) skipped+=("$t") ;;
        *) failed+=("$t") ;;
    esac
done

echo
echo "run.sh: passed: ${passed[*]:-none}; skipped: ${skipped[*]:-none}; failed: ${failed[*]:-none} ($(($(date +%s) - start)) s)"
[[ ${#failed[@]} -eq 0 ]]
