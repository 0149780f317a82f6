#!/usr/bin/env bash
# Builds a Debian test system's root file system (debootstrap, minbase,
# systemd as init) and prints its directory. Cached outside the repo under
# $KSAVE_CACHE (default ~/.cache/ksave), keyed by the suite and a hash of
# this script, so a clean clone reuses it. Needs root (debootstrap's chroot).
# Nothing of ksave is in it: qemu/mkdebiandisk.sh installs the kernel and the
# package into a copy for each disk.
#   build-debian.sh [SUITE]
#   bookworm (default)  Debian 12, systemd 252, initramfs-tools: the
#                       reference system
#   trixie              Debian 13, systemd 257, its initramfs made by dracut
#                       (as Fedora's family makes it), and rpm to install
#                       ksave's RPM with
set -euo pipefail
suite=${1:-bookworm}
case $suite in
# minbase + what a systemd system with logind, udev and initramfs-tools is,
# and the initramfs's unlock of an encrypted root (cryptsetup-initramfs: it
# does nothing without a crypttab entry for the initramfs), and efibootmgr
# for ksave.efi's boot entry (the UEFI story).
bookworm) packages=initramfs-tools,cryptsetup-initramfs,efibootmgr ;;
# dracut instead (its systemd initrd; no cryptsetup module without a
# crypttab), and rpm (Debian's, which installs into its own database).
trixie) packages=dracut,rpm,cpio ;;
*) echo "build-debian.sh: unknown suite $suite (bookworm, trixie)" >&2; exit 2 ;;
esac
cache_root=${KSAVE_CACHE:-${XDG_CACHE_HOME:-${HOME:-/var/tmp}/.cache}/ksave}
key=$(sha256sum "$0" | cut -c1-16)
cache=$cache_root/debian-$suite-$key
root=$cache/root
if [ -f "$cache/done" ]; then echo "$root"; exit 0; fi

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
if [ -f "$cache/done" ]; then echo "$root"; exit 0; fi
"$(dirname "$0")/deps.sh" >&2
echo "build-debian.sh: debootstrap $suite (about 3 minutes)" >&2
started=$(date +%s)
rm -rf "$root"
# The mirror the machine's apt already uses.
mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
debootstrap --variant=minbase \
  --include=systemd,systemd-sysv,udev,dbus,libpam-systemd,zstd,kmod,e2fsprogs,procps,$packages \
  "$suite" "$root" "$mirror" >&2

# The machine: a name, no root password on the serial console (a test
# system), the root file system found by the label mkdebiandisk.sh gives it.
echo "ksave-$suite" > "$root/etc/hostname"
chroot "$root" passwd -d root >/dev/null
echo "LABEL=debian-root / ext4 errors=remount-ro 0 1" > "$root/etc/fstab"
mkdir -p "$root/etc/systemd/system/serial-getty@ttyS0.service.d"
cat > "$root/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf" <<'CONF'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200 %I $TERM
CONF
if [ "$suite" = bookworm ]; then
  # No kernel modules (the test kernel has everything built in): do not look
  # for them at initramfs time.
  sed -i 's/^MODULES=.*/MODULES=list/' "$root/etc/initramfs-tools/initramfs.conf"
  # zstd -1 rather than the default -9: every story's setup and package
  # removal rebuilds the initramfs, about 50 s each under TCG at -9.
  echo COMPRESSLEVEL=1 >> "$root/etc/initramfs-tools/initramfs.conf"
  # Built in a chroot, the initramfs must not pick up the build host's swap.
  echo RESUME=none > "$root/etc/initramfs-tools/conf.d/resume"
else
  # Built in a chroot: a generic initramfs (not one for the build host's
  # disks), with no kernel modules to look for (all built in).
  printf '%s\n' 'hostonly="no"' 'omit_drivers+=" .* "' > "$root/etc/dracut.conf.d/90-ksave-test.conf"
fi
# The journal on disk, so the test can see it carry on across a resume and
# read earlier boots.
mkdir -p "$root/var/log/journal"
rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
touch "$cache/done"
echo "build-debian.sh: done in $(($(date +%s) - started)) s, $(du -sm "$root" | cut -f1) MiB" >&2
echo "$root"
