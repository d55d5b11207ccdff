#!/usr/bin/env bash
# Does the real gateway fit the unit's sandbox? Where systemd is not PID 1
# (containers, CI) the unit cannot be started, so this runs `outpost run`
# under strace the way the unit would (state in $STATE_DIRECTORY, the
# notification socket, the watchdog), with a simulated source, the site MQTT
# source, the disk outbox, a QoS 1 uplink to a local Mosquitto (when
# installed) and a /metrics scrape, then checks the trace against the unit:
#   - every system call is allowed by its SystemCallFilter= lines
#     (@system-service minus @privileged and @resources);
#   - no writable+executable or newly executable memory (MemoryDenyWriteExecute=);
#   - sockets only of the families in RestrictAddressFamilies=;
#   - files written only under the state directory (ProtectSystem=strict).
# Skipped (exit 77) without strace, or where ptrace is not permitted.
#
#   deploy/tests/test-sandbox.sh PATH_TO_OUTPOST_BINARY
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need strace systemd-analyze timeout
setup_tmp
setup_binary "$@"
strace -f -qq -o /dev/null true 2>/dev/null || skip "strace cannot trace here (ptrace not permitted)"
echo "$TEST_NAME: $(disp "$OUTPOST") under $(strace -V | head -n1)"

unit="$DEPLOY/systemd/outpost.service"
state="$TMP/state"
mkdir -p "$state"
chmod 0700 "$state"
free_port() { echo $((20000 + RANDOM % 20000)); }
mport=$(free_port)
bport=$(free_port)
site_port=$(free_port) # nothing listens: the site source keeps retrying

uplink=""
mpid=""
if command -v mosquitto >/dev/null; then
    printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$bport" >"$TMP/mosquitto.conf"
    mosquitto -c "$TMP/mosquitto.conf" >"$TMP/mosquitto.log" 2>&1 &
    mpid=$!
    uplink="[uplink]
allow_plaintext = true
topic = \"outpost/{gateway}/agg/{group}\"
[uplink.broker]
host = \"127.0.0.1\"
port = $bport"
else
    without "mosquitto not installed: no uplink in the traced run"
fi
cat >"$TMP/outpost.toml" <<EOF
[gateway]
id = "sandbox"
[[sources]]
type = "simulated"
rate_hz = 50.0
[[sources]]
type = "mqtt"
name = "site"
topics = ["sensors/+/data"]
sensor_from = "topic:1"
[sources.broker]
host = "127.0.0.1"
port = $site_port
[aggregation]
window_ms = 1000
idle_close_ms = 500
[outbox]
kind = "disk"
fsync_interval_ms = 100
[metrics]
listen = "127.0.0.1:$mport"
log_interval_s = 1
$uplink
EOF

# systemd's notification socket, played by a small listener.
notify_pid=""
if command -v python3 >/dev/null; then
    python3 - "$TMP/notify" "$TMP/notify.log" <<'EOF' &
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
s.settimeout(30)
with open(sys.argv[2], "w", buffering=1) as log:
    try:
        while True:
            log.write(s.recv(256).decode() + "\n")
    except OSError:
        pass
EOF
    notify_pid=$!
    for _ in $(seq 50); do [[ -S "$TMP/notify" ]] && break; sleep 0.1; done
else
    without "python3 not found: no notification socket (READY=1 and WATCHDOG=1 not checked)"
fi

cleanup_procs() {
    [[ -n "$mpid" ]] && kill "$mpid" 2>/dev/null
    [[ -n "$notify_pid" ]] && kill "$notify_pid" 2>/dev/null
    wait 2>/dev/null || true
}

env STATE_DIRECTORY="$state" NOTIFY_SOCKET="$TMP/notify" WATCHDOG_USEC=2000000 \
    timeout -s TERM 10 strace -f -qq -o "$TMP/trace" "$OUTPOST" run --config "$TMP/outpost.toml" \
    >"$TMP/outpost.log" 2>&1 &
run_pid=$!
# Scrape /metrics once the gateway is up, as Prometheus would.
for _ in $(seq 80); do
    grep -q "outpost ready" "$TMP/outpost.log" 2>/dev/null && break
    sleep 0.1
done
sleep 3
if exec 3<>"/dev/tcp/127.0.0.1/$mport"; then
    printf 'GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
    cat <&3 >"$TMP/metrics.out" || true
    exec 3<&-
fi
wait "$run_pid" || true
cleanup_procs

check_grep "the gateway ran: ready" "outpost ready" "$TMP/outpost.log"
check_grep "the gateway drained on SIGTERM" "outpost stopped" "$TMP/outpost.log"
check_grep "the metrics endpoint answered" "^outpost_aggregates_total" "$TMP/metrics.out"
if [[ -n "$uplink" ]]; then
    acked=$(sed -n 's/.*outpost stopped.* acked=\([0-9]*\).*/\1/p' "$TMP/outpost.log" | tail -n1)
    check "the uplink delivered aggregates (acked=${acked:-0})" test "${acked:-0}" -gt 0
fi
check "the disk outbox was written under \$STATE_DIRECTORY" test -d "$state/outbox"
if [[ -n "$notify_pid" ]]; then
    check_grep "READY=1 reached the notification socket" "^READY=1$" "$TMP/notify.log"
    check_grep "WATCHDOG=1 reached the notification socket" "^WATCHDOG=1$" "$TMP/notify.log"
fi

# --- System calls against SystemCallFilter= -----------------------------------------
expand() { # the system calls of a set, groups expanded
    systemd-analyze syscall-filter "$1" | sed -n '2,$p' | sed 's/^ *//' | grep -vE '^(#|$)' |
        while read -r n; do
            case "$n" in @*) expand "$n" ;; *) echo "$n" ;; esac
        done
}
: >"$TMP/allow"
: >"$TMP/deny"
while read -r value; do
    if [[ "$value" == "~"* ]]; then
        for g in ${value#\~}; do expand "$g" >>"$TMP/deny"; done
    else
        for g in $value; do expand "$g" >>"$TMP/allow"; done
    fi
done < <(sed -n 's/^SystemCallFilter=//p' "$unit")
LC_ALL=C sort -u "$TMP/allow" -o "$TMP/allow"
LC_ALL=C sort -u "$TMP/deny" -o "$TMP/deny"
LC_ALL=C comm -23 "$TMP/allow" "$TMP/deny" >"$TMP/allowed"
check "the unit's filter allows a plausible set ($(wc -l <"$TMP/allowed") calls)" test "$(wc -l <"$TMP/allowed")" -gt 200
grep -oE '^[0-9]+ +[a-z_0-9]+\(' "$TMP/trace" | awk '{ sub(/\(/, "", $2); print $2 }' | LC_ALL=C sort -u >"$TMP/used"
check "the trace holds system calls ($(wc -l <"$TMP/used") distinct)" test "$(wc -l <"$TMP/used")" -gt 20
denied=$(LC_ALL=C comm -23 "$TMP/used" "$TMP/allowed" | tr '\n' ' ')
check_eq "SystemCallFilter=: every call made is allowed" "" "$denied"
for c in openat connect sendto epoll_wait fdatasync rename; do
    grep -qx "$c" "$TMP/used" || fail "expected $c in the trace: the run did not exercise the pipeline"
done
ok "the run exercised files, sockets, epoll, fdatasync and rename"

# --- MemoryDenyWriteExecute= ---------------------------------------------------------
check_no_grep "MemoryDenyWriteExecute=: no writable+executable mapping" \
    '^[0-9]+ +(mmap|mprotect|pkey_mprotect)\(.*(PROT_WRITE\|PROT_EXEC|PROT_EXEC\|PROT_WRITE)' "$TMP/trace"
check_no_grep "MemoryDenyWriteExecute=: no mapping made executable afterwards" \
    '^[0-9]+ +(mprotect|pkey_mprotect)\(.*PROT_EXEC' "$TMP/trace"

# --- RestrictAddressFamilies= -------------------------------------------------------------
families=$(sed -n 's/^RestrictAddressFamilies=//p' "$unit")
used_fams=$(grep -oE '^[0-9]+ +socket(pair)?\(AF_[A-Z0-9]+' "$TMP/trace" | grep -oE 'AF_[A-Z0-9]+' | sort -u | tr '\n' ' ')
bad=""
for f in $used_fams; do
    [[ " $families " == *" $f "* ]] || bad+="$f "
done
check_eq "RestrictAddressFamilies=: sockets only of $families (used: $used_fams)" "" "$bad"

# --- ProtectSystem=strict: writes only under the state directory ------------------------
grep -E '^[0-9]+ +(openat|open|creat)\(.*O_(WRONLY|RDWR|CREAT)' "$TMP/trace" | grep -v ' = -1 ' |
    grep -oE '"[^"]*"' | tr -d '"' | LC_ALL=C sort -u >"$TMP/written"
grep -E '^[0-9]+ +(mkdir|mkdirat|rename|renameat2?|unlink|unlinkat)\(' "$TMP/trace" | grep -v ' = -1 ' |
    grep -oE '"[^"]*"' | tr -d '"' | LC_ALL=C sort -u >>"$TMP/written"
outside=$(grep -vE "^($state/|/dev/null$)" "$TMP/written" | grep -v '^/dev/' | tr '\n' ' ' || true)
check "files written: $(wc -l <"$TMP/written") paths, all under \$STATE_DIRECTORY" test -z "$outside" -a -s "$TMP/written"
[[ -z "$outside" ]] || note "written outside: $outside"

# What ProcSubset=pid and PrivateDevices= hide, for the record (not fatal:
# glibc copes with a missing /proc/sys/vm/overcommit_memory).
hidden=$(grep -oE '"/proc/[^"]*"' "$TMP/trace" | tr -d '"' | grep -vE '^/proc/(self|thread-self|[0-9]+)(/|$)' | sort -u | tr '\n' ' ')
[[ -z "$hidden" ]] || note "reads that ProcSubset=pid answers with ENOENT: $hidden"

finish
