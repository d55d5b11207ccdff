#!/usr/bin/env bash
# The configurations: every deploy/examples/*.toml and deploy/etc/outpost.toml
# passes `outpost check` (and a broken copy does not); the cloud presets keep
# the rules of their broker (python3's tomllib reads them); the Mosquitto
# bridge configuration loads in a real Mosquitto; the Azure SAS token helper
# writes the token the Azure samples compute.
#
# `outpost check` validates the configuration and loads the model; it does
# not open the certificate, key or password files a configuration names
# (they are read when `outpost run` starts), so no placeholder files are
# needed here, and a missing file shows up only at start.
#
#   deploy/tests/test-configs.sh PATH_TO_OUTPOST_BINARY
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
setup_tmp
setup_binary "$@"
echo "$TEST_NAME: $(disp "$OUTPOST")"

# --- outpost check -------------------------------------------------------------
configs=("$DEPLOY"/examples/*.toml "$DEPLOY/etc/outpost.toml")
[[ ${#configs[@]} -ge 9 ]] || fail "expected at least 9 configurations, found ${#configs[@]}"
for f in "${configs[@]}"; do
    if "$OUTPOST" check --config "$f" >"$TMP/check.out" 2>&1 && grep -q ": ok (" "$TMP/check.out"; then
        ok "outpost check: $(disp "$f")"
    else
        sed 's/^/        | /' "$TMP/check.out" >&2
        fail "outpost check: $(disp "$f")"
    fi
done
# Negative control: a misspelt key and a bad value are reported with their paths.
sed -e 's/^max_publish_rate = 100/max_publish_rat = 100/' -e 's/^port = 8883/port = 0/' \
    "$DEPLOY/examples/aws-iot-core.toml" >"$TMP/broken.toml"
if "$OUTPOST" check --config "$TMP/broken.toml" >"$TMP/check.out" 2>&1; then
    fail "negative control: outpost check accepted a broken configuration"
fi
check_grep "negative control: the misspelt key is reported" "uplink.max_publish_rat" "$TMP/check.out"
check_grep "negative control: the bad port is reported" "uplink.broker.port" "$TMP/check.out"

# --- The presets keep their broker's rules ------------------------------------------
if command -v python3 >/dev/null && python3 -c 'import tomllib' 2>/dev/null; then
    if python3 - "$DEPLOY" >"$TMP/presets.out" 2>&1 <<'EOF'; then
import sys, tomllib, pathlib

deploy = pathlib.Path(sys.argv[1])
def load(name):
    return tomllib.loads((deploy / name).read_text())

problems = []
def want(cond, msg):
    print(("ok    " if cond else "FAIL  ") + msg)
    if not cond:
        problems.append(msg)

for name in ["aws-iot-core.toml", "aws-iot-core-443.toml"]:
    c = load("examples/" + name); u = c["uplink"]; b = u["broker"]; t = b["tls"]
    want(b["client_id"] == c["gateway"]["id"], f"{name}: client_id = gateway.id (the thing name)")
    want(0 < u["max_publish_rate"] <= 100, f"{name}: max_publish_rate <= 100 (AWS: 100/s per connection)")
    want(0 < u["batch_max_bytes"] <= 128 * 1024 - 4096, f"{name}: batches leave room under AWS's 128 KiB")
    want(u["max_inflight"] <= 100, f"{name}: max_inflight within AWS's in-flight limit")
    want(all(k in t for k in ("ca_file", "cert_file", "key_file")), f"{name}: mutual TLS with Amazon's CA")
    want(u["topic"].count("/") + 1 <= 7 and not u["topic"].startswith("$"), f"{name}: topic within AWS's 7 slashes, not reserved")
    want(u.get("allow_plaintext", False) is False, f"{name}: no plaintext")
    want(u["health_topic"] == "dt/outpost/{gateway}/health", f"{name}: health and last will on dt/outpost/<thing>/health (the policy's topic)")
    if name == "aws-iot-core.toml":
        want(b["port"] == 8883 and not t.get("alpn"), f"{name}: port 8883, no ALPN")
    else:
        want(b["port"] == 443 and t.get("alpn") == ["x-amzn-mqtt-ca"], f"{name}: port 443 with ALPN x-amzn-mqtt-ca")

for name in ["azure-iot-hub-sas.toml", "azure-iot-hub-x509.toml"]:
    c = load("examples/" + name); u = c["uplink"]; b = u["broker"]
    dev = c["gateway"]["id"]; host = b["host"]
    want(host.endswith(".azure-devices.net") and b["port"] == 8883, f"{name}: <hub>.azure-devices.net:8883")
    want(b["client_id"] == dev, f"{name}: client_id = device id = gateway.id")
    want(b["username"] == f"{host}/{dev}/?api-version=2021-04-12", f"{name}: username <hub>/<device>/?api-version=2021-04-12")
    want(u["topic"].startswith("devices/{gateway}/messages/events/"), f"{name}: topic devices/<device>/messages/events/")
    want(u.get("compression", "none") == "none", f"{name}: no compression (a /zstd suffix would enter the property bag)")
    want(u["health_topic"].startswith("devices/{gateway}/messages/events/") and u.get("health_retain") is False,
         f"{name}: health on devices/<device>/messages/events/, not retained (IoT Hub has no retained messages)")
    want(0 < u["batch_max_bytes"] <= 256 * 1024 - 8192, f"{name}: batches under IoT Hub's 256 KB")
    want("tls" in b and u.get("allow_plaintext", False) is False, f"{name}: TLS")
    if name.endswith("sas.toml"):
        want("file" in b.get("password", {}), f"{name}: the SAS token from a file")
        want("cert_file" not in b["tls"], f"{name}: no client certificate")
    else:
        want("password" not in b, f"{name}: no password")
        want("cert_file" in b["tls"] and "key_file" in b["tls"], f"{name}: client certificate and key")

for name in ["emqx.toml", "hivemq.toml"]:
    c = load("examples/" + name); u = c["uplink"]; b = u["broker"]
    want(b["port"] == 8883 and "tls" in b and not u.get("allow_plaintext", False), f"{name}: TLS on 8883")
    want("file" in b.get("password", {}) and b.get("username"), f"{name}: user name, password from a file")

c = load("examples/mosquitto-bridge.toml"); u = c["uplink"]; b = u["broker"]
want(u.get("allow_plaintext") is True and b["host"] in ("127.0.0.1", "::1", "localhost"), "mosquitto-bridge.toml: plaintext only to the loopback broker")
want(u["topic"].startswith("outpost/"), "mosquitto-bridge.toml: publishes under outpost/ (what the bridge forwards)")

for p in sorted((deploy / "examples").glob("*.toml")):
    c = tomllib.loads(p.read_text()); u = c.get("uplink")
    if u and u.get("allow_plaintext"):
        want(u["broker"]["host"] in ("127.0.0.1", "::1", "localhost"), f"{p.name}: allow_plaintext only toward loopback")

c = load("etc/outpost.toml")
want("state_dir" not in c["gateway"], "etc/outpost.toml: state_dir unset, so $STATE_DIRECTORY applies")
want(c["outbox"]["kind"] == "disk" and "dir" not in c["outbox"], "etc/outpost.toml: disk outbox under the state directory")
want("uplink" not in c, "etc/outpost.toml: nothing leaves the site until an uplink is configured")
want(c["metrics"]["listen"].startswith("127.0.0.1:"), "etc/outpost.toml: metrics on loopback only")
sys.exit(1 if problems else 0)
EOF
        sed 's/^/  /' "$TMP/presets.out"
        CHECKS=$((CHECKS + $(grep -c '^ok' "$TMP/presets.out")))
    else
        sed 's/^/  /' "$TMP/presets.out" >&2
        fail "a preset breaks its broker's rules"
    fi
else
    without "python3 with tomllib (3.11+) not found: the presets' broker rules are not checked"
fi

# --- The Mosquitto bridge configuration loads in Mosquitto ------------------------
if command -v mosquitto >/dev/null; then
    port=$((20000 + RANDOM % 20000))
    mq="$TMP/mosquitto"
    mkdir -p "$mq/conf.d"
    # Installed as the file's header says: in conf.d/, included by a main
    # configuration with what Debian 12's /etc/mosquitto/mosquitto.conf sets
    # (persistence and its location; a second persistence_location is an
    # error). On a free port, with state and certificates under $TMP,
    # logging to stderr, as the current user.
    printf 'persistence true\npersistence_location %s/\nuser %s\nlog_dest stderr\nlog_type all\ninclude_dir %s/conf.d\n' \
        "$mq" "$(id -un)" "$mq" >"$mq/mosquitto.conf"
    sed -e "s|^listener 1883 127.0.0.1|listener $port 127.0.0.1|" \
        -e "s|/etc/mosquitto/certs/|$mq/|" \
        "$DEPLOY/examples/mosquitto-bridge.conf" >"$mq/conf.d/outpost-bridge.conf"
    mosquitto -c "$mq/mosquitto.conf" >"$mq/log" 2>&1 &
    mpid=$!
    for _ in $(seq 50); do
        grep -q "running" "$mq/log" && break
        kill -0 "$mpid" 2>/dev/null || break
        sleep 0.1
    done
    running=0
    kill -0 "$mpid" 2>/dev/null && running=1
    kill "$mpid" 2>/dev/null || true
    wait "$mpid" 2>/dev/null || true
    if [[ $running -eq 1 ]] && grep -q "running" "$mq/log"; then
        ok "mosquitto-bridge.conf: Mosquitto $(mosquitto -h 2>&1 | sed -n 's/^mosquitto version //p' | head -n1) loads it and runs"
    else
        sed 's/^/        | /' "$mq/log" >&2
        fail "mosquitto-bridge.conf: Mosquitto did not start with it"
    fi
    check_no_grep "mosquitto-bridge.conf: no configuration error" "Error: (Unknown|Invalid|Duplicate|Empty)" "$mq/log"
    check_grep "mosquitto-bridge.conf: the bridge subscribes locally to outpost/#" \
        "Bridge .* doing local SUBSCRIBE on topic outpost/#" "$mq/log"
    # Negative control: Mosquitto exits at once on an option it does not know
    # (exit status 3 or so, not timeout's 124 after running on).
    echo "bogus_option true" >>"$mq/conf.d/outpost-bridge.conf"
    rc=0
    timeout 5 mosquitto -c "$mq/mosquitto.conf" >"$mq/log.bad" 2>&1 || rc=$?
    check "negative control: Mosquitto refuses an unknown option (exit $rc)" \
        test "$rc" -ne 0 -a "$rc" -ne 124
    check_grep "negative control: ... naming it" 'Unknown configuration variable "bogus_option"' "$mq/log.bad"
else
    without "mosquitto not installed: the bridge configuration was not loaded"
fi

# --- The Azure SAS token helper ---------------------------------------------------------
sas="$DEPLOY/azure/outpost-azure-sas"
az="$TMP/azure"
mkdir -p "$az"
printf 'c2VjcmV0IGRldmljZSBrZXkgZm9yIHRoZSBvdXRwb3N0IHRlc3Qh\n' >"$az/key"
export OUTPOST_AZURE_HUB=my-hub.azure-devices.net OUTPOST_AZURE_DEVICE='gw-plant-3:a(1)' \
    OUTPOST_AZURE_KEY_FILE="$az/key" OUTPOST_AZURE_SAS_FILE="$az/token"
check "outpost-azure-sas: writes a token" env OUTPOST_AZURE_EXPIRY=1900000000 "$sas"
check_mode "$az/token" 640
if command -v python3 >/dev/null; then
    want=$(python3 - "$az/key" <<'EOF'
# The token as Microsoft's Python sample computes it.
import sys
from base64 import b64encode, b64decode
from hashlib import sha256
from hmac import HMAC
from urllib.parse import quote_plus, urlencode
uri = "my-hub.azure-devices.net/devices/gw-plant-3:a(1)"
expiry = 1900000000
key = open(sys.argv[1]).read().strip()
sig = b64encode(HMAC(b64decode(key), ("%s\n%d" % (quote_plus(uri), expiry)).encode(), sha256).digest())
print("SharedAccessSignature " + urlencode({"sr": uri, "sig": sig, "se": str(expiry)}))
EOF
    )
    check_eq "outpost-azure-sas: the token Microsoft's sample computes" "$want" "$(cat "$az/token")"
else
    without "python3 not found: the SAS token is not compared with Microsoft's sample"
fi
before=$(sha256sum <"$az/token")
check "outpost-azure-sas: a token far from expiry is kept" "$sas"
check_eq "outpost-azure-sas: ... unchanged" "$before" "$(sha256sum <"$az/token")"
check "outpost-azure-sas --force: renews anyway" "$sas" --force
se=$(sed -n 's/.*&se=\([0-9]*\)$/\1/p' "$az/token")
left=$((se - $(date +%s)))
check "outpost-azure-sas: the renewed token expires in 30 days ($left s)" \
    test "$left" -gt $((30 * 86400 - 600)) -a "$left" -le $((30 * 86400))
OUTPOST_AZURE_RENEW_BEFORE=$((40 * 86400)) "$sas" >/dev/null
check "outpost-azure-sas: renews when within OUTPOST_AZURE_RENEW_BEFORE of expiry" \
    test "$(sha256sum <"$az/token")" != "$before"

finish
