#!/usr/bin/env bash
# Installs every Debian package ksave's build, harness and tests need.
# Idempotent: does nothing when all are present, so `make test` can call it.
set -euo pipefail

packages=(
  # QEMU and disk tooling (qemu-system-x86 removes qemu-img: we use truncate + sgdisk)
  qemu-system-x86 gdisk
  # UEFI machines (OVMF)
  ovmf
  # kernel A's userspace; the store checks' tools (blkid and wipefs are
  # util-linux's, sfdisk is fdisk's, mkfs.ext4 and e2fsck e2fsprogs')
  kexec-tools busybox-static cpio fdisk
  # the test kernel
  linux-source-6.1 linux-source-6.12 build-essential bc bison flex libelf-dev libssl-dev xz-utils
  # GRUB multiboot2 boots (restore issue)
  grub-pc-bin grub-common xorriso mtools
  # inspecting exports
  binutils
  # the Debian test system (issue "A real distribution"): its root file
  # system, ext4 from a directory, GRUB for UEFI, the package
  debootstrap e2fsprogs grub-efi-amd64-bin
  # image files (issue 21): the file systems and LVM the stores are made on
  xfsprogs btrfs-progs lvm2
  # encrypted stores (issue 22): LUKS volumes the tests make and unlock
  cryptsetup-bin
  # ksave's RPM (issue 23): rpmbuild is in Debian's rpm
  rpm
  # linting the shell scripts (make lint)
  shellcheck
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  exit 0
fi
echo "qemu/deps.sh: installing ${missing[*]}" >&2
SUDO=
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
