#!/usr/bin/env bash
# deploy/package.sh and what it builds: the .deb's exact contents, modes and
# owners, its control fields and conffiles, its md5sums, the tarball's
# contents, refusals (wrong architecture, not an ELF file), and the
# maintainer scripts' behaviour (first install, upgrade, remove, purge) run
# against a temporary root with the system commands replaced by stubs that
# record their calls.
#
#   deploy/tests/test-package.sh PATH_TO_OUTPOST_BINARY
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need dpkg-deb readelf tar gzip md5sum dash
setup_tmp
setup_binary "$@"
setup_dist

echo "$TEST_NAME: $DEB"

# --- Refusals -----------------------------------------------------------------
other=arm64
[[ "$DEB_ARCH" == arm64 ]] && other=amd64
check_fails "package.sh refuses a $DEB_ARCH binary declared as $other" \
    "$DEPLOY/package.sh" --fast --out "$TMP/bad" "$OUTPOST" "$other"
check_fails "package.sh refuses an architecture it does not know (i386)" \
    "$DEPLOY/package.sh" --fast --out "$TMP/bad" "$OUTPOST" i386
printf '#!/bin/sh\necho hi\n' >"$TMP/script"
chmod +x "$TMP/script"
check_fails "package.sh refuses a file that is not ELF" \
    "$DEPLOY/package.sh" --fast --out "$TMP/bad" "$TMP/script" "$DEB_ARCH"
check "nothing was written for the refused builds" test -z "$(find "$TMP/bad" -name '*.deb' -o -name '*.tar.gz' 2>/dev/null)"

# --- The .deb's file list: exact paths, modes and owners ----------------------
examples=(aws-iot-core-443.toml aws-iot-core.toml azure-iot-hub-sas.toml azure-iot-hub-x509.toml
    emqx.toml full.toml hivemq.toml mosquitto-bridge.conf mosquitto-bridge.toml)
{
    echo "drwxr-xr-x root/root ./"
    echo "drwxr-xr-x root/root ./etc/"
    echo "drwxr-x--- root/root ./etc/outpost/"
    echo "-rw-r----- root/root ./etc/outpost/outpost.toml"
    echo "drwxr-xr-x root/root ./lib/"
    echo "drwxr-xr-x root/root ./lib/systemd/"
    echo "drwxr-xr-x root/root ./lib/systemd/system/"
    echo "-rw-r--r-- root/root ./lib/systemd/system/outpost-azure-sas.service"
    echo "-rw-r--r-- root/root ./lib/systemd/system/outpost-azure-sas.timer"
    echo "-rw-r--r-- root/root ./lib/systemd/system/outpost.service"
    echo "drwxr-xr-x root/root ./usr/"
    echo "drwxr-xr-x root/root ./usr/bin/"
    echo "-rwxr-xr-x root/root ./usr/bin/outpost"
    echo "drwxr-xr-x root/root ./usr/lib/"
    echo "drwxr-xr-x root/root ./usr/lib/outpost/"
    echo "-rwxr-xr-x root/root ./usr/lib/outpost/outpost-azure-sas"
    echo "drwxr-xr-x root/root ./usr/share/"
    echo "drwxr-xr-x root/root ./usr/share/doc/"
    echo "drwxr-xr-x root/root ./usr/share/doc/outpost/"
    echo "-rw-r--r-- root/root ./usr/share/doc/outpost/README.md"
    echo "-rw-r--r-- root/root ./usr/share/doc/outpost/copyright"
    echo "drwxr-xr-x root/root ./usr/share/doc/outpost/examples/"
    for e in "${examples[@]}"; do echo "-rw-r--r-- root/root ./usr/share/doc/outpost/examples/$e"; done
    echo "drwxr-xr-x root/root ./usr/share/doc/outpost/examples/systemd/"
    echo "-rw-r--r-- root/root ./usr/share/doc/outpost/examples/systemd/i2c.conf"
} | LC_ALL=C sort -k3 >"$TMP/want.list"
dpkg-deb -c "$DEB" | awk '{ print $1, $2, $6 }' | LC_ALL=C sort -k3 >"$TMP/got.list"
if diff -u "$TMP/want.list" "$TMP/got.list" >"$TMP/list.diff"; then
    ok "dpkg-deb -c: exactly the $(wc -l <"$TMP/want.list") expected paths with their modes, all root/root"
else
    cat "$TMP/list.diff" >&2
    fail "dpkg-deb -c differs from the expected list"
fi
for f in "$DEPLOY"/examples/*; do
    grep -qF "./usr/share/doc/outpost/examples/$(basename "$f")" "$TMP/got.list" ||
        fail "deploy/examples/$(basename "$f") is not shipped (add it to this test's list)"
done
ok "every file of deploy/examples/ is shipped"

# --- Control fields -----------------------------------------------------------
field() { dpkg-deb -f "$DEB" "$1"; }
check_eq "Package" outpost "$(field Package)"
check_eq "Version (workspace Cargo.toml)" "$VERSION" "$(field Version)"
check_eq "Architecture" "$DEB_ARCH" "$(field Architecture)"
glibc=$(readelf -VW "$OUTPOST" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1)
if [[ -n "$glibc" ]]; then
    check_grep "Depends: libc6 (>= $glibc), the newest GLIBC_ version the binary needs" \
        "^libc6 \(>= ${glibc//./\\.}\)" <(field Depends)
fi
if readelf -dW "$OUTPOST" | grep -q 'NEEDED.*libgcc_s'; then
    check_grep "Depends: libgcc-s1 (the binary links libgcc_s)" "libgcc-s1" <(field Depends)
fi
check_grep "Depends: adduser | passwd (the postinst makes a user)" "adduser \| passwd" <(field Depends)
check_grep "Maintainer set" ".+<.+@.+>" <(field Maintainer)
check_grep "Description set" "^edge inference gateway" <(field Description)
size=$(field Installed-Size)
bin_kb=$(($(stat -c %s "$OUTPOST") / 1024))
check "Installed-Size ($size KiB) covers the binary ($bin_kb KiB)" test "$size" -ge "$bin_kb"
dpkg-deb -e "$DEB" "$TMP/control"
check_eq "conffiles: /etc/outpost/outpost.toml only" "/etc/outpost/outpost.toml" "$(cat "$TMP/control/conffiles")"
for s in postinst prerm postrm; do
    check_mode "$TMP/control/$s" 755
    check "$s: POSIX sh syntax (dash -n)" dash -n "$TMP/control/$s"
done
check_same "$DEPLOY/debian/postinst" "$TMP/control/postinst"

# --- Contents ---------------------------------------------------------------------
dpkg-deb -x "$DEB" "$TMP/data"
check "md5sums match every file" bash -c "cd '$TMP/data' && md5sum --quiet -c '$TMP/control/md5sums'"
check_same "$OUTPOST" "$TMP/data/usr/bin/outpost"
check_same "$DEPLOY/systemd/outpost.service" "$TMP/data/lib/systemd/system/outpost.service"
check_same "$DEPLOY/etc/outpost.toml" "$TMP/data/etc/outpost/outpost.toml"
check_same "$DEPLOY/README.md" "$TMP/data/usr/share/doc/outpost/README.md"
check "the packaged binary runs: outpost version" "$TMP/data/usr/bin/outpost" version

# --- The tarball ------------------------------------------------------------------
name="outpost-$VERSION-$DEB_ARCH"
tar -tzf "$TARBALL" | LC_ALL=C sort >"$TMP/tar.list"
{
    for p in "" README.md VERSION copyright install.sh bin/ bin/outpost etc/ etc/outpost.toml examples/ \
        lib/ lib/outpost-azure-sas systemd/ systemd/i2c.conf systemd/outpost-azure-sas.service \
        systemd/outpost-azure-sas.timer systemd/outpost.service; do
        echo "$name/$p"
    done
    for e in "${examples[@]}"; do echo "$name/examples/$e"; done
} | LC_ALL=C sort >"$TMP/tar.want"
if diff -u "$TMP/tar.want" "$TMP/tar.list" >"$TMP/tar.diff"; then
    ok "tarball: exactly the $(wc -l <"$TMP/tar.want") expected paths under $name/"
else
    cat "$TMP/tar.diff" >&2
    fail "tarball contents differ"
fi
check_eq "tarball: all owned by 0/0" "" "$(tar -tvzf "$TARBALL" --numeric-owner | awk '$2 != "0/0"')"
check_eq "tarball: install.sh is executable" "-rwxr-xr-x" "$(tar -tvzf "$TARBALL" "$name/install.sh" | awk '{print $1}')"
check_eq "tarball: VERSION" "$VERSION $DEB_ARCH" "$(tar -xOzf "$TARBALL" "$name/VERSION")"

# --- Maintainer scripts against a temporary root, with stubs ------------------
# The scripts honour $DPKG_ROOT for paths; user, ownership and systemd
# commands are stubs on PATH that append their command line to $LOG.
mroot="$TMP/mroot"
cp -a "$TMP/data" "$mroot"
stubs="$TMP/stubs"
mkdir -p "$stubs"
LOG="$TMP/calls.log"
for c in adduser addgroup useradd groupadd deluser delgroup userdel groupdel chown chgrp \
    systemctl deb-systemd-invoke; do
    printf '#!/bin/sh\necho "%s $*" >>"%s"\n' "$c" "$LOG" >"$stubs/$c"
done
# getent: the user exists when STUB_USER_EXISTS=1.
printf '#!/bin/sh\necho "getent $*" >>"%s"\n[ "${STUB_USER_EXISTS:-0}" = 1 ] && echo "outpost:x:999:999::/var/lib/outpost:/usr/sbin/nologin" && exit 0\nexit 2\n' \
    "$LOG" >"$stubs/getent"
# deb-systemd-helper: was-enabled answers STUB_WAS_ENABLED (0: yes, as on a first install).
printf '#!/bin/sh\necho "deb-systemd-helper $*" >>"%s"\ncase "$*" in *was-enabled*) exit "${STUB_WAS_ENABLED:-0}";; esac\nexit 0\n' \
    "$LOG" >"$stubs/deb-systemd-helper"
chmod +x "$stubs"/*
maint() { # maint SCRIPT ARGS...
    : >"$LOG"
    env PATH="$stubs:$PATH" DPKG_ROOT="$mroot" dash "$TMP/control/$1" "${@:2}"
}
called() { grep -qxF -- "$1" "$LOG"; }
not_called() { ! grep -qE -- "$1" "$LOG"; }

mkdir -p "$mroot/run/systemd/system" # systemd "runs" in the temporary root
maint postinst configure
check "first install: system group created" called "addgroup --system --quiet outpost"
check "first install: system user, no home, nologin" called \
    "adduser --system --quiet --ingroup outpost --no-create-home --home /var/lib/outpost --shell /usr/sbin/nologin --gecos Outpost edge gateway outpost"
check "first install: state directory owned by outpost" called "chown outpost:outpost $mroot/var/lib/outpost"
check_mode "$mroot/var/lib/outpost" 700
check "first install: /etc/outpost group outpost" called "chgrp outpost $mroot/etc/outpost"
check_mode "$mroot/etc/outpost" 750
check "first install: unit enabled" called "deb-systemd-helper enable outpost.service"
check "first install: daemon-reload" called "systemctl --system daemon-reload"
check "first install: service started" called "deb-systemd-invoke start outpost.service"

echo "segment" >"$mroot/var/lib/outpost/state-file"
maint prerm upgrade "$VERSION"
check "upgrade: prerm does not stop the service" not_called "stop"
STUB_USER_EXISTS=1 STUB_WAS_ENABLED=1 maint postinst configure 0.0.1
check "upgrade: no user created (it exists)" not_called "^(adduser|useradd|addgroup|groupadd) "
check "upgrade: the administrator's enable/disable choice kept" called "deb-systemd-helper update-state outpost.service"
check "upgrade: service restarted with the new binary" called "deb-systemd-invoke restart outpost.service"
check_eq "upgrade: state contents untouched" "segment" "$(cat "$mroot/var/lib/outpost/state-file")"

maint prerm remove
check "remove: prerm stops the service" called "deb-systemd-invoke stop outpost.service outpost-azure-sas.timer"
STUB_USER_EXISTS=1 maint postrm remove
check "remove: configuration kept" test -f "$mroot/etc/outpost/outpost.toml"
check "remove: state kept" test -f "$mroot/var/lib/outpost/state-file"
check "remove: user kept" not_called "^(deluser|userdel)"
STUB_USER_EXISTS=1 maint postrm purge
check_absent "$mroot/var/lib/outpost"
check_absent "$mroot/etc/outpost"
check "purge: user removed" called "deluser --system --quiet outpost"
check "purge: group removed" called "delgroup --system --quiet outpost"

rm -rf "$mroot/run/systemd/system" # no systemd running (a container, a chroot)
cp -a "$TMP/data/etc" "$mroot/"        # dpkg unpacks again before configure
maint postinst configure
check "without systemd: unit still enabled for the next boot" called "deb-systemd-helper enable outpost.service"
check "without systemd: nothing started or reloaded" not_called "^(systemctl|deb-systemd-invoke) "

finish
