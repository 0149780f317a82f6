#!/bin/sh
# A live system, booted while another system on the disk is hibernated:
# it mounts that system's root file system (or another it had mounted)
# read-write, writes a file and powers off. The hibernated system's next
# boot must not resume.
#   KSAVE_ROOT_PARTUUID  the file system's partition (lower case)
# shellcheck source=SCRIPTDIR/../lib/test.sh # in the initramfs, as qemu/mkinitramfs.sh installs it
. /lib/ksave-test/test.sh
dev=
for _ in $(seq 100); do
  dev=$(blkid -t "PARTUUID=$KSAVE_ROOT_PARTUUID" -o device | head -n 1)
  [ -n "$dev" ] && break
  sleep 0.1
done
[ -n "$dev" ] || { say "no partition with PARTUUID $KSAVE_ROOT_PARTUUID"; exit 1; }
mkdir -p /mnt
mount "$dev" /mnt || { say "mounting $dev failed"; exit 1; }
# Into root's home on a system's root file system, else at the top.
home=/mnt/root
[ -d "$home" ] || home=/mnt
echo "written while the system was hibernated" > "$home/written-by-a-live-system" || { say "writing failed"; exit 1; }
umount /mnt || { say "umount failed"; exit 1; }
say "mounted the hibernated system's root ($dev) read-write and wrote to it"
