#!/usr/bin/env bash
# Builds a GRUB rescue ISO whose first menu entry boots ksave by multiboot2,
# with the serial console on COM1.   mkgrubiso.sh OUT.iso KSAVE_ELF [ARGS...]
#
# With LINUX=bzImage INITRD=initramfs LINUX_ARGS="..." in the environment, a
# second entry boots Linux, and the first tells ksave to set CMOS bit
# 0x7e:0 when it has nothing to resume; GRUB then clears the bit and boots
# Linux: one menu that resumes or boots normally. With EFI=ksave.efi too,
# GRUB EFI (no CMOS commands) chainloads ksave.efi instead, which returns
# to GRUB when it does not resume; GRUB falls back to Linux.
set -euo pipefail
out=$1 elf=$2
shift 2
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/boot/grub"
cp "$elf" "$stage/boot/ksave.elf"
cat > "$stage/boot/grub/grub.cfg" <<CFG
set timeout=0
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
CFG
if [ -n "${LINUX:-}" ]; then
  cp "$LINUX" "$stage/boot/bzImage"
  cp "$INITRD" "$stage/boot/initramfs.cpio.gz"
  cp "${EFI:?EFI=ksave.efi too}" "$stage/boot/ksave.efi"
  cat >> "$stage/boot/grub/grub.cfg" <<CFG
set default=0
if [ "\$grub_platform" = efi ]; then
  set fallback=1
  menuentry "ksave.efi: resume a hibernated system" { chainloader /boot/ksave.efi $*; boot }
else
  insmod cmostest
  if cmostest 0x7e:0; then
    cmosclean 0x7e:0
    set default=1
  fi
  menuentry "ksave: resume a hibernated system" { multiboot2 /boot/ksave.elf $* ksave.no_image=cmos:0x7e:0; boot }
fi
menuentry "Linux" { linux /boot/bzImage ${LINUX_ARGS:-}; initrd /boot/initramfs.cpio.gz; boot }
CFG
else
  echo "menuentry \"ksave\" { multiboot2 /boot/ksave.elf $*; boot }" >> "$stage/boot/grub/grub.cfg"
fi
grub-mkrescue -o "$out.tmp" "$stage" 2>/dev/null
mv "$out.tmp" "$out"
