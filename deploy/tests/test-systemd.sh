#!/usr/bin/env bash
# The systemd units: `systemd-analyze verify` passes with no output at all
# (warnings fail too), for outpost.service alone, with the I2C drop-in, and
# for the Azure SAS renewal units; the hardening directives the unit promises
# are there; `systemd-analyze security --offline=yes` rates it at most
# $OUTPOST_MAX_EXPOSURE (default 1.5; 1.2 measured with systemd 252).
#
# verify checks that ExecStart's binary exists and is executable, and that
# every unit named in After=/Wants= exists. So the units are laid out in a
# temporary root as installed (the binary under test as /usr/bin/outpost)
# with the host's *.target units beside them, and checked with --root=.
# Two negative controls show that the check can fail: a misspelt directive
# and a missing binary.
#
#   deploy/tests/test-systemd.sh PATH_TO_OUTPOST_BINARY
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need systemd-analyze
setup_tmp
setup_binary "$@"
echo "$TEST_NAME: $(systemd-analyze --version | head -n1)"

unit="$DEPLOY/systemd/outpost.service"
R="$TMP/root"
mkdir -p "$R/usr/bin" "$R/usr/lib/outpost" "$R/lib/systemd/system" "$R/etc/systemd/system"
ln "$OUTPOST" "$R/usr/bin/outpost" 2>/dev/null || cp "$OUTPOST" "$R/usr/bin/outpost"
install -m 0755 "$DEPLOY/azure/outpost-azure-sas" "$R/usr/lib/outpost/outpost-azure-sas"
install -m 0644 "$unit" "$DEPLOY/systemd/outpost-azure-sas.service" \
    "$DEPLOY/systemd/outpost-azure-sas.timer" "$R/lib/systemd/system/"
host_units=""
for d in /lib/systemd/system /usr/lib/systemd/system; do
    if compgen -G "$d/*.target" >/dev/null; then
        host_units=$d
        break
    fi
done
[[ -n "$host_units" ]] || skip "no systemd target units on this host"
cp -a "$host_units"/*.target "$R/lib/systemd/system/"
cp -a "$host_units"/*.target.wants "$R/lib/systemd/system/" 2>/dev/null || true

# verify_clean UNIT...: exit status 0 and not a line of output.
verify_clean() {
    local out rc=0
    out=$(systemd-analyze verify --root="$R" "$@" 2>&1) || rc=$?
    if [[ $rc -ne 0 || -n "$out" ]]; then
        printf '%s\n' "$out" | sed 's/^/        | /' >&2
        return 1
    fi
}

check "verify: outpost.service, installed layout" verify_clean outpost.service
check "verify: outpost-azure-sas.service and .timer" verify_clean outpost-azure-sas.service outpost-azure-sas.timer
mkdir -p "$R/etc/systemd/system/outpost.service.d"
cp "$DEPLOY/systemd/i2c.conf" "$R/etc/systemd/system/outpost.service.d/i2c.conf"
check "verify: outpost.service with the I2C drop-in (deploy/systemd/i2c.conf)" verify_clean outpost.service

exposure() {
    systemd-analyze security --offline=yes --root="$R" outpost.service 2>&1 |
        sed -n 's/.*Overall exposure level for outpost.service: \([0-9.]*\).*/\1/p'
}
i2c_score=$(exposure)
rm -rf "$R/etc/systemd/system/outpost.service.d"
score=$(exposure)
[[ -n "$score" ]] || fail "systemd-analyze security --offline=yes gave no overall exposure level"
max=${OUTPOST_MAX_EXPOSURE:-1.5}
check "security --offline=yes: exposure $score <= $max (I2C drop-in: $i2c_score)" \
    awk -v s="$score" -v m="$max" 'BEGIN { exit !(s <= m) }'
check "security --offline=yes: with the I2C drop-in still under 2.0" \
    awk -v s="$i2c_score" 'BEGIN { exit !(s < 2.0) }'

# Negative controls.
cp "$unit" "$TMP/good.service"
sed -i 's/^ProtectHome=yes/ProtectHomme=yes/' "$R/lib/systemd/system/outpost.service"
check_fails "negative control: a misspelt directive fails verify" verify_clean outpost.service
cp "$TMP/good.service" "$R/lib/systemd/system/outpost.service"
rm "$R/usr/bin/outpost"
check_fails "negative control: a missing /usr/bin/outpost fails verify" verify_clean outpost.service

# The directives the unit promises, exactly.
for line in \
    "Type=notify" \
    "NotifyAccess=main" \
    "ExecStart=/usr/bin/outpost run --config /etc/outpost/outpost.toml" \
    "WatchdogSec=30" \
    "Restart=on-failure" \
    "RestartSec=5" \
    "User=outpost" \
    "Group=outpost" \
    "StateDirectory=outpost" \
    "StateDirectoryMode=0700" \
    "ConfigurationDirectory=outpost" \
    "ConfigurationDirectoryMode=0750" \
    "UMask=0077" \
    "StandardOutput=journal" \
    "StandardError=journal" \
    "MemoryHigh=192M" \
    "MemoryMax=256M" \
    "NoNewPrivileges=yes" \
    "CapabilityBoundingSet=" \
    "AmbientCapabilities=" \
    "ProtectSystem=strict" \
    "ProtectHome=yes" \
    "PrivateTmp=yes" \
    "PrivateDevices=yes" \
    "ProtectProc=invisible" \
    "ProcSubset=pid" \
    "ProtectKernelTunables=yes" \
    "ProtectKernelModules=yes" \
    "ProtectKernelLogs=yes" \
    "ProtectControlGroups=yes" \
    "ProtectClock=yes" \
    "ProtectHostname=yes" \
    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6" \
    "RestrictNamespaces=yes" \
    "LockPersonality=yes" \
    "MemoryDenyWriteExecute=yes" \
    "RestrictRealtime=yes" \
    "SystemCallArchitectures=native" \
    "SystemCallFilter=@system-service"; do
    grep -qxF -- "$line" "$unit" || fail "outpost.service lacks the line '$line'"
done
ok "outpost.service has all 39 promised directives, verbatim"
check_no_grep "no DynamicUser= (the outbox needs a stable owner)" "^DynamicUser=" "$unit"
check_no_grep "no Environment=OUTPOST_STATE_DIR (the runtime reads \$STATE_DIRECTORY)" "OUTPOST_STATE_DIR" "$unit"
check_grep "I2C: DeviceAllow explained in the unit, commented" "^#.*DeviceAllow=char-i2c rw" "$unit"

# The stop timeout leaves room for the drain the installed config allows.
stop_s=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)$/\1/p' "$unit")
drain_ms=$(sed -n 's/^shutdown_timeout_ms *= *\([0-9]*\).*/\1/p' "$DEPLOY/etc/outpost.toml")
check "TimeoutStopSec (${stop_s}s) exceeds gateway.shutdown_timeout_ms (${drain_ms}ms)" \
    test "$((stop_s * 1000))" -gt "${drain_ms:-10000}"

finish
