#!/usr/bin/env bash
# A GRUB rescue ISO (BIOS and UEFI) that boots the Debian test disk's own
# kernel and initramfs from its root file system, serial console on COM1
# (output only: what the harness types is for the shell, not for GRUB).
#   mkdebianiso.sh OUT.iso ROOT_PARTUUID [KERNEL ARGS...]
# KSAVE_KERNEL_VERSION: which installed kernel (default 6.12-ksave).
set -euo pipefail
version=${KSAVE_KERNEL_VERSION:-6.12-ksave}
out=$1
# udev names /dev/disk/by-partuuid/ in lower case, and initramfs-tools looks there.
root_guid=$(echo "$2" | tr '[:upper:]' '[:lower:]')
shift 2
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/boot/grub"
cat > "$stage/boot/grub/grub.cfg" <<CFG
set timeout=0
serial --unit=0 --speed=115200
terminal_output serial
insmod part_gpt
insmod ext2
search --no-floppy --set=root --label debian-root
menuentry "Debian (ksave test system)" {
  linux /boot/vmlinuz-$version root=PARTUUID=$root_guid ro console=ttyS0,115200 panic=-1 quiet $*
  initrd /boot/initrd.img-$version
}
CFG
grub-mkrescue -o "$out.tmp" "$stage" 2>/dev/null
mv "$out.tmp" "$out"
