#!/usr/bin/env bash
# Builds a GRUB rescue ISO whose one menu entry boots ksave by multiboot2,
# with the serial console on COM1.   mkgrubiso.sh OUT.iso KSAVE_ELF [ARGS...]
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
menuentry "ksave" { multiboot2 /boot/ksave.elf $*; boot }
CFG
grub-mkrescue -o "$out.tmp" "$stage" 2>/dev/null
mv "$out.tmp" "$out"
