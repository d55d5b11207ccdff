#!/usr/bin/env bash
# Install Outpost from this unpacked tarball (outpost-VERSION-ARCH/), offline.
#
#   sudo ./install.sh               install, or upgrade in place
#   sudo ./install.sh --rollback    swap back to the binary before the last upgrade
#   sudo ./install.sh --uninstall   remove the program; keep /etc/outpost, /var/lib/outpost
#   sudo ./install.sh --purge       remove everything, the outpost user included
#
# Options:
#   --root DIR    operate on DIR instead of / (a staging or test root): files
#                 only; the user, ownership and systemd steps are printed,
#                 not done
#   --no-start    install or upgrade without enabling or (re)starting the service
#   -h, --help
#
# What goes where (the same paths as the .deb):
#   /usr/bin/outpost                          the binary
#   /usr/lib/outpost/outpost.previous         the binary before the last upgrade (rollback)
#   /usr/lib/outpost/outpost-azure-sas        Azure SAS token renewal helper
#   /lib/systemd/system/outpost.service       the unit (+ outpost-azure-sas.{service,timer})
#   /etc/outpost/outpost.toml                 the configuration, root:outpost 0640
#   /usr/share/doc/outpost/                   README.md, examples/
#   /var/lib/outpost/                         state (outbox ...), outpost:outpost 0700
#
# Upgrades never overwrite /etc/outpost/outpost.toml: when it differs from
# the new default, the default is written beside it as outpost.toml.new.
# They never touch what is in /var/lib/outpost.
set -euo pipefail

src=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=/
action=install
start=1

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --root) root=${2:?--root needs a directory}; shift 2 ;;
        --root=*) root=${1#--root=}; shift ;;
        --rollback) action=rollback; shift ;;
        --uninstall) action=uninstall; shift ;;
        --purge) action=purge; shift ;;
        --no-start) start=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

[[ -d "$root" ]] || die "--root $root: no such directory"
root=$(cd "$root" && pwd)
# R: prefix for paths; live: operating on this machine's own root.
if [[ "$root" == / ]]; then
    R=""
    live=1
    [[ $(id -u) -eq 0 ]] || die "run as root (or with --root DIR for a staging root)"
else
    R="$root"
    live=0
fi

BIN=/usr/bin/outpost
LIB=/usr/lib/outpost
UNITS=/lib/systemd/system
ETC=/etc/outpost
DOC=/usr/share/doc/outpost
STATE=/var/lib/outpost

# Steps that only make sense on the live system: done there, printed for --root.
run_live() {
    if [[ $live -eq 1 ]]; then
        "$@"
    else
        say "would run: $*"
    fi
}

systemd_running() { [[ $live -eq 1 && -d /run/systemd/system ]]; }

ensure_user() {
    if [[ $live -eq 0 ]]; then
        say "would create the system group and user 'outpost' if missing:"
        say "  groupadd --system outpost"
        say "  useradd --system --gid outpost --no-create-home --home-dir $STATE --shell /usr/sbin/nologin outpost"
        return
    fi
    if ! getent group outpost >/dev/null; then
        groupadd --system outpost
        say "created system group outpost"
    fi
    if ! getent passwd outpost >/dev/null; then
        useradd --system --gid outpost --no-create-home --home-dir "$STATE" \
            --shell /usr/sbin/nologin --comment "Outpost edge gateway" outpost
        say "created system user outpost"
    fi
}

# Refuse to mix with the .deb: dpkg owns these paths then.
check_no_deb() {
    if [[ $live -eq 1 ]] && command -v dpkg-query >/dev/null &&
        dpkg-query -W -f='${Status}' outpost 2>/dev/null | grep -q 'ok installed'; then
        die "the outpost .deb is installed; upgrade, roll back or remove it with apt/dpkg instead"
    fi
}

# Copy src to dst atomically (a temporary file beside dst, then rename).
put() {
    local mode=$1 from=$2 to=$3 tmp
    tmp=$(mktemp "$(dirname "$to")/.install.XXXXXX")
    cp "$from" "$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$to"
}

do_install() {
    [[ -x "$src/bin/outpost" && -f "$src/systemd/outpost.service" && -f "$src/etc/outpost.toml" ]] ||
        die "$src does not look like an unpacked outpost tarball"
    check_no_deb
    local new_version upgrade=0
    new_version=$(cut -d' ' -f1 "$src/VERSION" 2>/dev/null || echo unknown)
    [[ -e "$R$BIN" ]] && upgrade=1

    ensure_user
    install -d -m 0755 "$R/usr/bin" "$R$LIB" "$R$UNITS" "$R$DOC" "$R$DOC/examples" "$R$DOC/examples/systemd"

    # The binary; the one it replaces is kept for --rollback.
    if [[ $upgrade -eq 1 ]]; then
        if cmp -s "$src/bin/outpost" "$R$BIN"; then
            say "$BIN is already this build; the previous binary is kept as it was"
        else
            put 0755 "$R$BIN" "$R$LIB/outpost.previous"
            if [[ -e "$R$LIB/VERSION" ]]; then
                put 0644 "$R$LIB/VERSION" "$R$LIB/outpost.previous.version"
            else
                echo unknown >"$R$LIB/outpost.previous.version"
            fi
            say "kept the old binary ($(cat "$R$LIB/outpost.previous.version")) as $LIB/outpost.previous (install.sh --rollback restores it)"
        fi
    fi
    put 0755 "$src/bin/outpost" "$R$BIN"
    put 0755 "$src/lib/outpost-azure-sas" "$R$LIB/outpost-azure-sas"
    printf '%s\n' "$new_version" >"$R$LIB/VERSION"

    # Units: always the shipped ones; local changes belong in drop-ins.
    for u in outpost.service outpost-azure-sas.service outpost-azure-sas.timer; do
        put 0644 "$src/systemd/$u" "$R$UNITS/$u"
    done

    # Documentation and presets.
    put 0644 "$src/README.md" "$R$DOC/README.md"
    put 0644 "$src/copyright" "$R$DOC/copyright"
    for f in "$src"/examples/*; do
        put 0644 "$f" "$R$DOC/examples/$(basename "$f")"
    done
    put 0644 "$src/systemd/i2c.conf" "$R$DOC/examples/systemd/i2c.conf"

    # Configuration: never overwritten.
    install -d -m 0750 "$R$ETC"
    if [[ ! -e "$R$ETC/outpost.toml" ]]; then
        put 0640 "$src/etc/outpost.toml" "$R$ETC/outpost.toml"
        say "installed the default configuration $ETC/outpost.toml"
    elif cmp -s "$src/etc/outpost.toml" "$R$ETC/outpost.toml"; then
        rm -f "$R$ETC/outpost.toml.new"
    else
        put 0640 "$src/etc/outpost.toml" "$R$ETC/outpost.toml.new"
        say "kept your $ETC/outpost.toml; the new default is $ETC/outpost.toml.new"
    fi
    run_live chgrp outpost "$R$ETC" "$R$ETC/outpost.toml"
    if [[ -e "$R$ETC/outpost.toml.new" ]]; then
        run_live chgrp outpost "$R$ETC/outpost.toml.new"
    fi

    # State: created when missing; an existing directory is left as it is
    # (systemd's StateDirectory= fixes its owner at start if needed).
    if [[ ! -d "$R$STATE" ]]; then
        install -d -m 0700 "$R$STATE"
        run_live chown outpost:outpost "$R$STATE"
    fi

    if systemd_running; then
        systemctl daemon-reload
        if [[ $start -eq 1 ]]; then
            if [[ $upgrade -eq 1 ]]; then
                systemctl try-restart outpost.service
                say "restarted outpost.service if it was running"
            else
                systemctl enable --now outpost.service
                say "enabled and started outpost.service"
            fi
        fi
    elif [[ $live -eq 1 ]]; then
        say "systemd is not running: enable the service yourself (systemctl enable --now outpost)"
    else
        say "would run: systemctl daemon-reload; systemctl enable --now outpost.service"
    fi
    say "installed outpost $new_version into $root"
}

do_rollback() {
    check_no_deb
    [[ -e "$R$LIB/outpost.previous" ]] || die "no previous binary ($LIB/outpost.previous): nothing to roll back to"
    [[ -e "$R$BIN" ]] || die "$BIN is not installed"
    local tmp cur prev
    cur=$(cat "$R$LIB/VERSION" 2>/dev/null || echo unknown)
    prev=$(cat "$R$LIB/outpost.previous.version" 2>/dev/null || echo unknown)
    # Swap, so that a second --rollback returns to the newer binary.
    tmp=$(mktemp "$R$LIB/.rollback.XXXXXX")
    cp "$R$BIN" "$tmp"
    chmod 0755 "$tmp"
    put 0755 "$R$LIB/outpost.previous" "$R$BIN"
    mv -f "$tmp" "$R$LIB/outpost.previous"
    printf '%s\n' "$prev" >"$R$LIB/VERSION"
    printf '%s\n' "$cur" >"$R$LIB/outpost.previous.version"
    say "rolled back $BIN from $cur to $prev; $LIB/outpost.previous is now $cur (--rollback again to undo)"
    if systemd_running; then
        systemctl try-restart outpost.service
        say "restarted outpost.service if it was running"
    elif [[ $live -eq 0 ]]; then
        say "would run: systemctl try-restart outpost.service"
    fi
}

do_uninstall() {
    check_no_deb
    if systemd_running; then
        systemctl disable --now outpost.service outpost-azure-sas.timer outpost-azure-sas.service 2>/dev/null || true
    elif [[ $live -eq 0 ]]; then
        say "would run: systemctl disable --now outpost.service outpost-azure-sas.timer"
    fi
    rm -f "$R$BIN" "$R$UNITS/outpost.service" "$R$UNITS/outpost-azure-sas.service" "$R$UNITS/outpost-azure-sas.timer"
    rm -rf "$R$LIB" "$R$DOC"
    if systemd_running; then
        systemctl daemon-reload
    fi
    say "removed the program; kept $ETC and $STATE"
}

do_purge() {
    do_uninstall
    rm -rf "$R$ETC" "$R$STATE"
    if [[ $live -eq 1 ]]; then
        if getent passwd outpost >/dev/null; then userdel outpost; fi
        if getent group outpost >/dev/null; then groupdel outpost; fi
        say "removed $ETC, $STATE (the outbox, with any aggregates not yet sent) and the outpost user"
    else
        say "would run: userdel outpost; groupdel outpost"
        say "removed $ETC and $STATE"
    fi
}

case "$action" in
    install) do_install ;;
    rollback) do_rollback ;;
    uninstall) do_uninstall ;;
    purge) do_purge ;;
esac
