#!/usr/bin/env bash
# Builds ksave's Debian package from a staged tree with dpkg-deb.
#   mkdeb.sh OUT.deb KSAVE_CLI KSAVE_ELF
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$1 cli=$2 elf=$3
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/../tools/Cargo.toml" | head -n 1)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
chmod 0755 "$stage"
install -D -s -m 0755 "$cli" "$stage/usr/sbin/ksave"
install -D -m 0644 "$elf" "$stage/usr/lib/ksave/ksave.elf"
install -D -m 0755 "$here/systemd/hibernate" "$stage/usr/lib/ksave/hibernate"
install -D -m 0644 "$here/systemd/hibernate-service.conf" "$stage/usr/lib/systemd/system/systemd-hibernate.service.d/ksave.conf"
install -D -m 0644 "$here/systemd/logind.conf" "$stage/usr/lib/systemd/system/systemd-logind.service.d/ksave.conf"
install -D -m 0755 "$here/initramfs-tools/hook" "$stage/usr/share/initramfs-tools/hooks/ksave"
install -D -m 0755 "$here/initramfs-tools/local-premount" "$stage/usr/share/initramfs-tools/scripts/local-premount/ksave"
install -D -m 0755 "$here/initramfs-tools/local-bottom" "$stage/usr/share/initramfs-tools/scripts/local-bottom/ksave"
install -D -m 0644 "$here/../README.md" "$stage/usr/share/doc/ksave/README.md"
mkdir -p "$stage/DEBIAN"
sed "s/@VERSION@/$version/" "$here/debian/control" > "$stage/DEBIAN/control"
install -m 0755 "$here/debian/postinst" "$here/debian/postrm" "$stage/DEBIAN/"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$out" >/dev/null
echo "$out"
