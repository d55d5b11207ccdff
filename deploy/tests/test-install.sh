#!/usr/bin/env bash
# deploy/install.sh from the unpacked tarball into a temporary root
# (--root): files and modes, the installed binary runs and checks its
# configuration; an upgrade keeps a modified configuration (the new default
# goes to outpost.toml.new) and the state, and keeps the old binary for
# --rollback; --rollback swaps back and forth; --uninstall keeps config and
# state; --purge removes everything. Never touches the real system: every
# install.sh call here has --root.
#
#   deploy/tests/test-install.sh PATH_TO_OUTPOST_BINARY
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need tar gzip dpkg-deb cmp
setup_tmp
setup_binary "$@"
setup_dist

echo "$TEST_NAME: $TARBALL"
src="$TMP/src"
mkdir -p "$src"
tar -C "$src" -xzf "$TARBALL"
src="$src/outpost-$VERSION-$DEB_ARCH"
ROOT="$TMP/root"
mkdir -p "$ROOT"
inst() { "$src/install.sh" --root "$ROOT" "$@" >"$TMP/install.out" 2>&1 || {
    cat "$TMP/install.out" >&2
    return 1
}; }
# A digest of everything under a directory: names, modes, contents.
tree_digest() { (cd "$1" && find . -printf '%p %m %s\n' | LC_ALL=C sort && find . -type f -print0 |
    LC_ALL=C sort -z | xargs -0 -r sha256sum) | sha256sum | cut -d' ' -f1; }

# --- Refusals -------------------------------------------------------------------
check_fails "install.sh refuses an unknown option" "$src/install.sh" --root "$ROOT" --bogus
check_fails "install.sh refuses a --root that does not exist" "$src/install.sh" --root "$TMP/nope"
mkdir -p "$TMP/empty-src"
cp "$src/install.sh" "$TMP/empty-src/"
check_fails "install.sh refuses to run outside an unpacked tarball" "$TMP/empty-src/install.sh" --root "$ROOT"
check_fails "--rollback with nothing installed fails" "$src/install.sh" --root "$ROOT" --rollback
check "the refusals wrote nothing" test -z "$(ls -A "$ROOT")"

# --- First install --------------------------------------------------------------------
check "install.sh --root: first install" inst
check_grep "prints the user it would create (not created under --root)" \
    "would create the system group and user 'outpost'" "$TMP/install.out"
check_grep "prints the systemd steps (not run under --root)" "would run: systemctl" "$TMP/install.out"
check_mode "$ROOT/usr/bin/outpost" 755
check_same "$OUTPOST" "$ROOT/usr/bin/outpost"
check_mode "$ROOT/lib/systemd/system/outpost.service" 644
check_same "$DEPLOY/systemd/outpost.service" "$ROOT/lib/systemd/system/outpost.service"
check_mode "$ROOT/lib/systemd/system/outpost-azure-sas.service" 644
check_mode "$ROOT/lib/systemd/system/outpost-azure-sas.timer" 644
check_mode "$ROOT/usr/lib/outpost/outpost-azure-sas" 755
check_mode "$ROOT/etc/outpost" 750
check_mode "$ROOT/etc/outpost/outpost.toml" 640
check_same "$DEPLOY/etc/outpost.toml" "$ROOT/etc/outpost/outpost.toml"
check_absent "$ROOT/etc/outpost/outpost.toml.new"
check_mode "$ROOT/var/lib/outpost" 700
check_eq "state directory starts empty" "" "$(ls -A "$ROOT/var/lib/outpost")"
check_file "$ROOT/usr/share/doc/outpost/README.md"
for f in "$DEPLOY"/examples/*; do
    check_same "$f" "$ROOT/usr/share/doc/outpost/examples/$(basename "$f")"
done
check_same "$DEPLOY/systemd/i2c.conf" "$ROOT/usr/share/doc/outpost/examples/systemd/i2c.conf"
check_eq "records the installed version" "$VERSION" "$(cat "$ROOT/usr/lib/outpost/VERSION")"

# The tarball installs the same files as the .deb, plus its VERSION record
# and the state directory (which the .deb's postinst makes).
dpkg-deb -c "$DEB" | awk '{ print $6 }' | sed 's|^\.||; s|/$||; /^$/d' | LC_ALL=C sort >"$TMP/deb.paths"
(cd "$ROOT" && find . -mindepth 1 | sed 's|^\.||') | LC_ALL=C sort |
    grep -vxE '/usr/lib/outpost/VERSION|/var|/var/lib|/var/lib/outpost' >"$TMP/root.paths"
if diff -u "$TMP/deb.paths" "$TMP/root.paths" >"$TMP/paths.diff"; then
    ok "the tarball installs exactly the .deb's paths"
else
    cat "$TMP/paths.diff" >&2
    fail "the tarball and the .deb install different paths"
fi

# --- (e) The installed binary runs -------------------------------------------------
"$ROOT/usr/bin/outpost" version >"$TMP/version.out"
check_grep "installed binary: outpost version prints $VERSION" "^outpost ${VERSION//./\\.}$" "$TMP/version.out"
check_grep "installed binary: the bundled model is embedded" "^model [a-z0-9-]+@" "$TMP/version.out"
check "installed binary: outpost check accepts the installed configuration" \
    "$ROOT/usr/bin/outpost" check --config "$ROOT/etc/outpost/outpost.toml"

# --- Upgrade ----------------------------------------------------------------------------
# The operator's edits and the gateway's state.
echo '# edited by the operator' >>"$ROOT/etc/outpost/outpost.toml"
cp "$ROOT/etc/outpost/outpost.toml" "$TMP/operator.toml"
mkdir -p "$ROOT/var/lib/outpost/outbox/quarantine"
head -c 65536 /dev/urandom >"$ROOT/var/lib/outpost/outbox/00000000000000000001.seg"
printf '42\n' >"$ROOT/var/lib/outpost/outbox/acked"
chmod 0600 "$ROOT/var/lib/outpost/outbox/acked"
state_before=$(tree_digest "$ROOT/var/lib/outpost")

# A newer release: another binary (the same program with bytes appended:
# still a valid ELF executable, different contents), a changed default
# configuration and version.
new="$TMP/src-new/outpost-next"
mkdir -p "$TMP/src-new"
cp -a "$src" "$new"
cat "$OUTPOST" >"$new/bin/outpost"
printf '\nupgrade-marker\n' >>"$new/bin/outpost"
printf '\n# a new default option\n' >>"$new/etc/outpost.toml"
echo "$VERSION+next $DEB_ARCH" >"$new/VERSION"
src_old=$src
src=$new
check "upgrade: install.sh of the newer release" inst
check_same "$new/bin/outpost" "$ROOT/usr/bin/outpost"
check_same "$OUTPOST" "$ROOT/usr/lib/outpost/outpost.previous"
check_mode "$ROOT/usr/lib/outpost/outpost.previous" 755
check_eq "upgrade: previous version recorded" "$VERSION" "$(cat "$ROOT/usr/lib/outpost/outpost.previous.version")"
check_eq "upgrade: new version recorded" "$VERSION+next" "$(cat "$ROOT/usr/lib/outpost/VERSION")"
check_same "$TMP/operator.toml" "$ROOT/etc/outpost/outpost.toml"
check_same "$new/etc/outpost.toml" "$ROOT/etc/outpost/outpost.toml.new"
check_mode "$ROOT/etc/outpost/outpost.toml.new" 640
check_grep "upgrade: says where the new default went" "outpost.toml.new" "$TMP/install.out"
check_eq "upgrade: state untouched (names, modes, bytes)" "$state_before" "$(tree_digest "$ROOT/var/lib/outpost")"
check "upgrade: the new binary runs" "$ROOT/usr/bin/outpost" version

check "upgrade again with the same release (idempotent)" inst
check_same "$OUTPOST" "$ROOT/usr/lib/outpost/outpost.previous"
check_same "$TMP/operator.toml" "$ROOT/etc/outpost/outpost.toml"
check_eq "idempotent: state untouched" "$state_before" "$(tree_digest "$ROOT/var/lib/outpost")"

cp "$ROOT/etc/outpost/outpost.toml.new" "$ROOT/etc/outpost/outpost.toml"
check "operator adopts the new default; install again" inst
check_absent "$ROOT/etc/outpost/outpost.toml.new"
cp "$TMP/operator.toml" "$ROOT/etc/outpost/outpost.toml"

# --- Rollback ------------------------------------------------------------------------------
check "install.sh --rollback" inst --rollback
check_same "$OUTPOST" "$ROOT/usr/bin/outpost"
check_same "$new/bin/outpost" "$ROOT/usr/lib/outpost/outpost.previous"
check_eq "rollback: version record follows" "$VERSION" "$(cat "$ROOT/usr/lib/outpost/VERSION")"
check_grep "rollback: says what it did" "rolled back .* to $VERSION" "$TMP/install.out"
check_same "$TMP/operator.toml" "$ROOT/etc/outpost/outpost.toml"
check_eq "rollback: state untouched" "$state_before" "$(tree_digest "$ROOT/var/lib/outpost")"
check "rollback: the restored binary runs" "$ROOT/usr/bin/outpost" version
check "install.sh --rollback again: forward to the newer binary" inst --rollback
check_same "$new/bin/outpost" "$ROOT/usr/bin/outpost"
check "and back (the older binary for the rest of the test)" inst --rollback
check_same "$OUTPOST" "$ROOT/usr/bin/outpost"

# --- Uninstall, reinstall, purge -------------------------------------------------------
src=$src_old
check "install.sh --uninstall" inst --uninstall
check_absent "$ROOT/usr/bin/outpost"
check_absent "$ROOT/lib/systemd/system/outpost.service"
check_absent "$ROOT/lib/systemd/system/outpost-azure-sas.timer"
check_absent "$ROOT/usr/lib/outpost"
check_absent "$ROOT/usr/share/doc/outpost"
check_same "$TMP/operator.toml" "$ROOT/etc/outpost/outpost.toml"
check_eq "uninstall: state kept" "$state_before" "$(tree_digest "$ROOT/var/lib/outpost")"

check "reinstall after --uninstall" inst
check_same "$TMP/operator.toml" "$ROOT/etc/outpost/outpost.toml"
check_eq "reinstall: state kept" "$state_before" "$(tree_digest "$ROOT/var/lib/outpost")"
check_absent "$ROOT/usr/lib/outpost/outpost.previous"

check "install.sh --purge" inst --purge
check_grep "purge: prints the user it would delete" "would run: userdel outpost" "$TMP/install.out"
check_absent "$ROOT/etc/outpost"
check_absent "$ROOT/var/lib/outpost"
check_absent "$ROOT/usr/bin/outpost"
check_eq "purge: no file left in the root" "" "$(find "$ROOT" -type f)"

finish
