#!/usr/bin/env bash
# Builds kernel A's initramfs: busybox, kexec-tools with its libraries, the
# ksave image, /init, the test scenarios, and host programs for /usr/bin
# (the ksave CLI, memtest) with their libraries.
#   mkinitramfs.sh OUT.cpio.gz KSAVE_ELF [PROGRAM...]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$1 elf=$2
shift 2
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,scenarios}
cp /bin/busybox "$stage/bin/busybox"
if ldd /bin/busybox >/dev/null 2>&1; then  # ldd fails on static binaries
  echo "mkinitramfs.sh: /bin/busybox is not static (install busybox-static)" >&2; exit 1
fi

# A dynamic binary and every library it loads, at the same paths.
add_dynamic() {
  install -D -m 0755 "$1" "$stage$2"
  ldd "$1" | grep -o '/[^ ]*' | while read -r lib; do
    install -D -m 0755 "$lib" "$stage$lib"
  done
}
add_dynamic "$(command -v kexec)" /usr/sbin/kexec
# The real tools ksave setup and the store tests run, in /bin before
# busybox's applets of the same names (its --install leaves them be).
for tool in blkid wipefs sfdisk mkfs.ext4 e2fsck filefrag e4defrag chattr lsattr fallocate cp \
    mkfs.xfs xfs_repair xfs_db mkfs.btrfs btrfs dmsetup lvm cryptsetup; do
  add_dynamic "$(command -v "$tool")" "/bin/$tool"
done
# LVM's commands are the one program under their names.
for cmd in pvcreate vgcreate lvcreate lvchange vgchange; do ln -s lvm "$stage/bin/$cmd"; done
for program in "$@"; do
  add_dynamic "$program" "/usr/bin/$(basename "$program")"
done

install -m 0644 "$elf" "$stage/ksave.elf"
install -m 0755 "$here/initramfs/init" "$stage/init"
install -m 0755 "$here"/initramfs/scenarios/*.sh "$stage/scenarios/"
install -D -m 0644 "$here/initramfs/lib/test.sh" "$stage/lib/ksave-test/test.sh"

mkdir -p "$(dirname "$out")"
(cd "$stage" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -6 > "$out.tmp"
mv "$out.tmp" "$out"
