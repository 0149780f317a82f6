#!/usr/bin/env bash
# Makes the Debian test system's disk: a GPT with the ext4 root file system
# (partition 1, label debian-root), ksave's partition (2) and, when asked, a
# swap partition (3) set up for Linux's own hibernation the way a Debian
# install sets it up (fstab, initramfs-tools RESUME=). The root is the cached
# debootstrap (qemu/build-debian.sh) plus the test kernel, installed the way
# a kernel package installs one (its initramfs made by the system's
# generator), the ksave package (dpkg -i, or rpm -i, as a user would)
# unless PACKAGE is "none", and the test's own files (qemu/debian/). Needs
# root (chroot).
#   mkdebiandisk.sh OUT.img BZIMAGE PACKAGE.deb|PACKAGE.rpm|none MEMTEST ROOT_PARTUUID KSAVE_PARTUUID KSAVE_MIB [SWAP_MIB SWAP_PARTUUID]
#   KSAVE_SUITE=trixie   Debian 13 with dracut (qemu/build-debian.sh), not 12
#   KSAVE_ROOT_FS=btrfs  the root file system on btrfs (Fedora's layout), not ext4
#   KSAVE_ROOT_LUKS=UUID the root (ext4) on LUKS2, unlocked by the initramfs's
#                        cryptroot at its prompt (crypttab), with a plaintext
#                        /boot (partition 3, label debian-boot) as an
#                        installer makes it. This host has no device-mapper,
#                        so partition 1 is left empty and the root file
#                        system is written to OUT.img.root-ext4 for the
#                        harness to encrypt in a VM (scenario luks-root)
#   KSAVE_ESP=1          an EFI system partition (4, FAT, 64 MiB) mounted at
#                        /boot/efi, as a UEFI install has one, with the
#                        distribution's loader: GRUB at \EFI\debian\grubx64.efi
#                        booting this disk's kernel (grub-mkstandalone)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$1 kernel=$2 package=$3 memtest=$4 root_guid=$5 ksave_guid=$6 ksave_mib=$7 swap_mib=${8:-0} swap_guid=${9:-}
root_mib=1024
root_fs=${KSAVE_ROOT_FS:-ext4}
luks_uuid=${KSAVE_ROOT_LUKS:-}
boot_mib=128
# LUKS2's header (cryptsetup's default data offset) comes before the root.
luks_header_mib=16
esp_mib=0
[ -z "${KSAVE_ESP:-}" ] || esp_mib=64
# The ESP's FAT volume serial, its fstab UUID.
esp_serial=4B5A0E5F
kver=6.12-ksave
suite=${KSAVE_SUITE:-bookworm}
base=$("$here/build-debian.sh" "$suite")
work=$(mktemp -d)
mounted=()
cleanup() {
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount "${mounted[$i]}" 2>/dev/null || umount -l "${mounted[$i]}"; done
  rm -rf "$work"
}
trap cleanup EXIT
cp -a "$base" "$work/root"
root=$work/root
for fs in dev proc sys; do mount --bind "/$fs" "$root/$fs"; mounted+=("$root/$fs"); done

install -m 0644 "$kernel" "$root/boot/vmlinuz-$kver"
# What a kernel package puts next to it; mkinitramfs reads it (compression).
# build-kernel.sh checked that every option of the fragments is =y.
cat "$here/kernel.config" "$here/kernel-6.12.config" | grep -v -e '^#' -e '^$' | sed 's/.*/CONFIG_&=y/' > "$root/boot/config-$kver"
# Its module directory: everything is built in, so only the (empty) lists
# depmod and mkinitramfs read.
mkdir -p "$root/lib/modules/$kver"
touch "$root/lib/modules/$kver/"{modules.order,modules.builtin,modules.builtin.modinfo}
if [ "$swap_mib" -gt 0 ]; then
  # The swap partition is not there in this chroot: the resume hook warns
  # and still copies the setting into the initramfs. udev names by-partuuid
  # in lower case.
  swap_id=$(echo "$swap_guid" | tr '[:upper:]' '[:lower:]')
  echo "PARTUUID=$swap_id none swap sw 0 0" >> "$root/etc/fstab"
  echo "RESUME=PARTUUID=$swap_id" > "$root/etc/initramfs-tools/conf.d/resume"
fi
if [ "$esp_mib" -gt 0 ]; then
  mkdir -p "$root/boot/efi"
  echo "UUID=${esp_serial:0:4}-${esp_serial:4:4} /boot/efi vfat umask=0077 0 1" >> "$root/etc/fstab"
fi
if [ "$root_fs" = btrfs ]; then
  sed -i 's|^LABEL=debian-root / ext4 .*|LABEL=debian-root / btrfs defaults 0 0|' "$root/etc/fstab"
fi
if [ -n "$luks_uuid" ]; then
  # As Debian's installer leaves an encrypted root: crypttab names the
  # volume, fstab mounts its mapping and the plaintext /boot. Built in a
  # chroot, the root is not on dm-crypt yet, so the cryptsetup hook is told
  # to include the volume ("initramfs") and itself (CRYPTSETUP=y).
  echo "cryptroot UUID=$luks_uuid none luks,discard,initramfs" > "$root/etc/crypttab"
  printf '%s\n' "/dev/mapper/cryptroot / ext4 errors=remount-ro 0 1" "LABEL=debian-boot /boot ext4 defaults 0 2" > "$root/etc/fstab"
  echo CRYPTSETUP=y >> "$root/etc/cryptsetup-initramfs/conf-hook"
fi
if [ "$suite" = bookworm ]; then
  chroot "$root" update-initramfs -c -k "$kver" >&2
else
  # As a kernel package does on a dracut system: its module lists (empty:
  # dracut --regenerate-all takes only kernels that have them), then the
  # kernel's postinst hook makes the initramfs.
  chroot "$root" depmod -a "$kver"
  chroot "$root" /etc/kernel/postinst.d/dracut "$kver" "/boot/vmlinuz-$kver" >&2
fi
case "$package" in
none) ;;
*.rpm)
  # Debian's rpm keeps its own database, which knows none of what dpkg
  # installed (dracut, systemd, /bin/sh): --nodeps. --noplugins: its unshare
  # plugin cannot run in this chroot (a system's rpm -e later runs it).
  cp "$package" "$root/tmp/ksave.rpm"
  chroot "$root" rpm -i --nodeps --noplugins /tmp/ksave.rpm >&2
  rm "$root/tmp/ksave.rpm"
  ;;
*)
  cp "$package" "$root/tmp/ksave.deb"
  chroot "$root" dpkg -i /tmp/ksave.deb >&2
  rm "$root/tmp/ksave.deb"
  ;;
esac
install -m 0755 "$memtest" "$root/usr/local/bin/memtest"
install -m 0755 "$here/debian/e2e" "$root/usr/local/bin/e2e"
install -m 0644 "$here/debian/e2e-ticks.service" "$root/etc/systemd/system/e2e-ticks.service"
echo "KSAVE_PARTUUID=$ksave_guid" > "$root/etc/e2e.conf"
# Root's login shell tells the harness it may type.
echo "echo e2e-console-ready" >> "$root/root/.profile"
for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount "${mounted[$i]}"; done
mounted=()

first=2048
# ksave's store partition type, which ksave setup requires: the harness
# passes diskdrv's part::KSAVE_STORE_TYPE.
ksave_type=${KSAVE_STORE_TYPE:?the harness sets it}
total_mib=$((1 + root_mib + ksave_mib + swap_mib + esp_mib + 1))
[ -z "$luks_uuid" ] || total_mib=$((total_mib + boot_mib))
rm -f "$out"
truncate -s "${total_mib}M" "$out"
if [ -n "$luks_uuid" ]; then
  mv "$root/boot" "$work/boot" && mkdir -m 0755 "$root/boot"
  boot_first=$((first + (root_mib + ksave_mib) * 2048))
  mke2fs -q -F -t ext4 -L debian-boot -d "$work/boot" -E offset=$((boot_first * 512)) "$out" "${boot_mib}M"
  # Inode tables and journal written now, not by ext4lazyinit through
  # dm-crypt after the first mount: the encrypted stories' guard against a
  # hang once suspected of it (docs/ENCRYPTION.md, "Not yet").
  rm -f "$out.root-ext4"
  mke2fs -q -F -t ext4 -L debian-root -d "$root" -E lazy_itable_init=0,lazy_journal_init=0 "$out.root-ext4" "$((root_mib - luks_header_mib))M"
elif [ "$root_fs" = btrfs ]; then
  # mkfs.btrfs has no offset: make it in a file, put it in place.
  truncate -s "${root_mib}M" "$work/root.img"
  mkfs.btrfs -q -f -L debian-root --rootdir "$root" "$work/root.img" >&2
  dd if="$work/root.img" of="$out" bs=1M seek=$((first / 2048)) conv=notrunc,sparse status=none
  rm "$work/root.img"
else
  mke2fs -q -F -t ext4 -L debian-root -d "$root" -E offset=$((first * 512)) "$out" "${root_mib}M"
fi
# (sgdisk 1.0.9 with -q does not write the table: not quiet, then.)
parts=(-o -n "1:$first:+${root_mib}M" -t 1:8304 -u "1:$root_guid" -c 1:debian-root
  -n "2:0:+${ksave_mib}M" -t "2:$ksave_type" -u "2:$ksave_guid" -c 2:ksave)
if [ "$swap_mib" -gt 0 ]; then parts+=(-n "3:0:+${swap_mib}M" -t 3:8200 -u "3:$swap_guid" -c 3:swap); fi
if [ -n "$luks_uuid" ]; then parts+=(-t 1:8309 -n "3:0:+${boot_mib}M" -t 3:8300 -c 3:debian-boot); fi
if [ "$esp_mib" -gt 0 ]; then parts+=(-n "4:0:+${esp_mib}M" -t 4:ef00 -c "4:EFI system partition"); fi
sgdisk "${parts[@]}" "$out" >/dev/null
if [ "$esp_mib" -gt 0 ]; then
  esp_first=$(sgdisk -i 4 "$out" | sed -n 's/^First sector: \([0-9]*\).*/\1/p')
  esp="$out@@$((esp_first * 512))"
  mformat -i "$esp" -T $((esp_mib * 2048)) -h 64 -s 32 -N "$esp_serial" -v ESP ::
  root_id=$(echo "$root_guid" | tr '[:upper:]' '[:lower:]')
  cat > "$work/grub.cfg" <<CFG
set timeout=0
serial --unit=0 --speed=115200
terminal_output serial
search --no-floppy --set=root --label debian-root
menuentry "Debian (ksave test system, GRUB in the ESP)" {
  linux /boot/vmlinuz-$kver root=PARTUUID=$root_id ro console=ttyS0,115200 panic=-1 quiet
  initrd /boot/initrd.img-$kver
}
CFG
  grub-mkstandalone -O x86_64-efi --locales= --fonts= --themes= \
    --install-modules="part_gpt ext2 linux normal serial terminal search search_label echo test" --modules="part_gpt ext2 serial" \
    -o "$work/grubx64.efi" "boot/grub/grub.cfg=$work/grub.cfg"
  mmd -i "$esp" ::/EFI ::/EFI/debian
  mcopy -i "$esp" "$work/grubx64.efi" ::/EFI/debian/grubx64.efi
fi
if [ "$swap_mib" -gt 0 ]; then
  # mkswap 2.38 has no --offset: make the signature in a file, put it in place.
  truncate -s "${swap_mib}M" "$work/swap"
  mkswap -q "$work/swap" >&2
  dd if="$work/swap" of="$out" bs=1M seek=$((1 + root_mib + ksave_mib)) conv=notrunc,sparse status=none
fi
echo "$out"
