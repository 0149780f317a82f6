#!/usr/bin/env bash
# Builds ksave's Debian package with dpkg-deb from the files dist/stage.sh
# stages and the install and removal steps of dist/maintscript.sh.
#   mkdeb.sh OUT.deb KSAVE_CLI KSAVE_ELF KSAVE_EFI
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$1 cli=$2 elf=$3 efi=$4
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
version=$("$here/stage.sh" "$stage" "$cli" "$elf" "$efi")
mkdir -p "$stage/DEBIAN"
sed "s/@VERSION@/$version/" "$here/debian/control" > "$stage/DEBIAN/control"
# The maintainer scripts: the shared functions, then what each does.
for script in postinst postrm; do
  { printf '#!/bin/sh\nset -e\n'; cat "$here/maintscript.sh" "$here/debian/$script"; } > "$stage/DEBIAN/$script"
  chmod 0755 "$stage/DEBIAN/$script"
done
dpkg-deb --root-owner-group -Zxz --build "$stage" "$out" >/dev/null
echo "$out"
