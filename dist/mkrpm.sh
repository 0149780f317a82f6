#!/usr/bin/env bash
# Builds ksave's RPM (Fedora, RHEL, openSUSE: dracut and systemd) with
# rpmbuild, from the same files as the .deb (dist/mkdeb.sh) and the same
# install and removal steps (dist/maintscript.sh).
#   mkrpm.sh OUT.rpm KSAVE_CLI KSAVE_ELF KSAVE_EFI
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$1 cli=$2 elf=$3 efi=$4
top=$(mktemp -d)
trap 'rm -rf "$top"' EXIT
stage=$top/stage
version=$("$here/stage.sh" "$stage" "$cli" "$elf" "$efi")
# The RPM's systems build their initramfs with dracut: no initramfs-tools
# hook (its directories would be ksave's alone there, left behind by rpm -e).
rm -r "$stage/usr/share/initramfs-tools"
# The scriptlets: the shared functions, then what each does. %postun with
# 0 is the removal (on an upgrade the new package's %post runs first, then
# the old one's %postun with 1, which does nothing).
scriptlet() { cat "$here/maintscript.sh"; echo "$1"; }
{
  sed "s/@VERSION@/$version/" "$here/rpm/ksave.spec"
  echo "%post"; scriptlet 'ksave_systemd_reload; ksave_initramfs_rebuild'
  echo "%postun"
  # shellcheck disable=SC2016 # $1 is the scriptlet's own, at install time
  scriptlet 'if [ "$1" -eq 0 ]; then ksave_systemd_reload; ksave_initramfs_rebuild; ksave_uefi_forget; ksave_forget_store; fi'
  echo "%files"
  (cd "$stage" && find . -type f | sed 's|^\.||' | sort)
  # Its own directories, drop-in ones included (the rest belong to
  # systemd and dracut).
  (cd "$stage" && find ./usr/lib/ksave ./usr/lib/dracut/modules.d/90ksave ./usr/share/doc/ksave ./usr/lib/systemd/system -mindepth 0 -type d \
    | grep -v '^\./usr/lib/systemd/system$' | sed 's|^\.|%dir |' | sort)
} > "$top/ksave.spec"
rpmbuild --quiet -bb --nodeps \
  --define "_topdir $top" --define "_rpmdir $top/out" --define "stage $stage" \
  --define "_build_id_links none" --define "debug_package %{nil}" --define "__os_install_post %{nil}" \
  "$top/ksave.spec" >&2
mv "$top"/out/x86_64/ksave-"$version"-1.x86_64.rpm "$out"
echo "$out"
