#!/usr/bin/env bash
# A GRUB rescue ISO (BIOS and UEFI) that boots the Debian test disk's own
# kernel and initramfs from its root file system, serial console on COM1
# (output only: what the harness types is for the shell, not for GRUB).
#   mkdebianiso.sh OUT.iso ROOT_PARTUUID|/dev/mapper/NAME [KERNEL ARGS...]
# KSAVE_KERNEL_VERSION: which installed kernel (default 6.12-ksave).
# A root on /dev/mapper (the encrypted root) boots from the plaintext /boot
# file system labelled debian-boot, as an installer lays it out.
set -euo pipefail
version=${KSAVE_KERNEL_VERSION:-6.12-ksave}
out=$1
case "$2" in
/dev/*) root=$2 label=debian-boot boot= ;;
# udev names /dev/disk/by-partuuid/ in lower case, and initramfs-tools looks there.
*) root=PARTUUID=$(echo "$2" | tr '[:upper:]' '[:lower:]') label=debian-root boot=/boot ;;
esac
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
search --no-floppy --set=root --label $label
menuentry "Debian (ksave test system)" {
  linux $boot/vmlinuz-$version root=$root ro console=ttyS0,115200 panic=-1 quiet $*
  initrd $boot/initrd.img-$version
}
CFG
grub-mkrescue -o "$out.tmp" "$stage" 2>/dev/null
mv "$out.tmp" "$out"
