#!/bin/sh
# The image in a file (`ksave setup --file`) on a file system made by its
# own tools on the test disk's partition 2: hibernate, power off, be
# resumed by another boot (the harness: kernel C, then QEMU -kernel with
# ksave.file=), twice; the file's extents the same throughout; then the
# refusals, each before anything is written; then the file system checked
# clean by its own checker.
#   KSAVE_FS  ext4: the file deliberately fragmented (the free space made
#               into 512 KiB holes first); refused once the file has moved
#             btrfs: first a RAID1 btrfs over both partitions (refused),
#               then a single-device btrfs; refused once a balance has
#               moved the file
#             xfs, btrfs-single: XFS (btrfs) on the partition alone;
#               the harness resumes round 1, then writes to it before
#               resuming round 2: refused
#             xfs-lvm: XFS on an LVM volume of two linear segments, the
#               second before the first on the disk; refused once the
#               file's blocks are shared (a reflink)
# busybox's shell runs its own applets before programs of the same name:
# coreutils' cp (--reflink) is called by path.
# shellcheck source=SCRIPTDIR/../lib/test.sh # in the initramfs, as qemu/mkinitramfs.sh installs it
. /lib/ksave-test/test.sh
fs=${KSAVE_FS:-ext4}
scratch=$(test_partition 2) || exit 1
image=/mnt/var/lib/ksave/image
mkdir -p /mnt

case $fs in
  ext4)
    mkfs.ext4 -q -F "$scratch" || { say "mkfs.ext4 failed"; exit 1; }
    mount -t ext4 "$scratch" /mnt || { say "mount failed"; exit 1; }
    # The image file can only be made of 512 KiB holes.
    fragment_free_space /mnt 524288
    fsdev=$scratch
    ;;
  btrfs)
    # A btrfs over both partitions, RAID1 data: refused with its name.
    first=$(test_partition 1) || exit 1
    mkfs.btrfs -q -f -d raid1 -m raid1 "$first" "$scratch" >/dev/null || { say "mkfs.btrfs raid1 failed"; exit 1; }
    mount -t btrfs -o device="$first" "$scratch" /mnt || { say "mount failed"; exit 1; }
    if ksave setup --file /mnt/image --size 64M --elf /ksave.elf --no-precheck > /tmp/why 2>&1; then say "setup took a file on RAID1 btrfs"; exit 1; fi
    cat /tmp/why
    grep -q "RAID1 chunk" /tmp/why || { say "setup refused the RAID1 btrfs, but not for RAID1"; exit 1; }
    [ -e /mnt/image ] && { say "the refused setup left its file behind"; exit 1; }
    say "refused: RAID1"
    umount /mnt
    wipefs -q -a "$first" "$scratch"
    # Then the image in a file on a single-device btrfs (Fedora's layout).
    mkfs.btrfs -q -f "$scratch" >/dev/null || { say "mkfs.btrfs failed"; exit 1; }
    mount -t btrfs "$scratch" /mnt || { say "mount failed"; exit 1; }
    fsdev=$scratch
    ;;
  xfs)
    mkfs.xfs -q -f "$scratch" || { say "mkfs.xfs failed"; exit 1; }
    mount -t xfs "$scratch" /mnt || { say "mount failed"; exit 1; }
    fsdev=$scratch
    ;;
  btrfs-single)
    mkfs.btrfs -q -f "$scratch" >/dev/null || { say "mkfs.btrfs failed"; exit 1; }
    mount -t btrfs "$scratch" /mnt || { say "mount failed"; exit 1; }
    fsdev=$scratch
    ;;
  xfs-lvm)
    # No udev here: LVM makes its device nodes itself.
    export DM_DISABLE_UDEV=1 LVM_SUPPRESS_FD_WARNINGS=1
    mkdir -p /run/lvm /run/lock/lvm
    if ! { lvm pvcreate -q -y "$scratch" && lvm vgcreate -q vg "$scratch" \
      && lvm lvcreate -q -y -L 200M -n first vg && lvm lvcreate -q -y -L 400M -n root vg \
      && lvm lvcreate -q -y -l 100%FREE -n rest vg \
      && lvm lvremove -q -y vg/first && lvm lvextend -q -L +200M vg/root; }; then
      say "LVM set-up failed"; exit 1
    fi
    dmsetup table vg-root
    [ "$(dmsetup table vg-root | grep -c linear)" = 2 ] || { say "vg/root is not two linear segments"; exit 1; }
    fsdev=/dev/mapper/vg-root
    mkfs.xfs -q "$fsdev" || { say "mkfs.xfs failed"; exit 1; }
    mount -t xfs "$fsdev" /mnt || { say "mount failed"; exit 1; }
    # Something in the volume's first segment, so that the image file
    # reaches into its second (which lies before it on the disk). Written
    # O_DIRECT: scaffolding, not memory the story's image should hold (the
    # default store, half of RAM, has no room for it).
    dd if=/dev/urandom of=/mnt/ballast bs=1M count=64 oflag=direct conv=fsync 2>/dev/null || { say "dd ballast failed"; exit 1; }
    ;;
esac

ksave setup --file "$image" --elf /ksave.elf > /tmp/setup.log 2>&1 || { cat /tmp/setup.log; say "setup --file failed"; exit 1; }
cat /tmp/setup.log
# The zeros setup wrote are stale once ksave writes under the file system:
# none of them may stay in memory (a hibernation would hold them).
memtest cached --file "$image" > /tmp/cached || { say "memtest cached failed"; exit 1; }
grep -q "cached: 0 of" /tmp/cached || { say "setup left the image file in the page cache: $(cat /tmp/cached)"; exit 1; }
say "after setup, $(sed 's/^memtest: //' /tmp/cached)"
[ "$(stat -c %a "$image")" = 600 ] || { say "the image file is not 0600"; exit 1; }
lsattr "$image" | cut -c1-22 | grep -q i || { say "the image file is not immutable"; exit 1; }
extents=$(sed -n 's/.* in \([0-9]*\) extents.*/\1/p' /tmp/setup.log)
filefrag -v "$image" > /tmp/extents.before
if [ "$fs" = xfs-lvm ]; then
  # The file reaches the volume's second segment (from 400 MiB on: XFS
  # block 102400), which lies before the first on the disk.
  awk '$1 ~ /^[0-9]+:$/ { e = $5; sub(":", "", e); if (e + 0 >= 102400) found = 1 } END { exit !found }' /tmp/extents.before \
    || { cat /tmp/extents.before; say "the image file does not reach the second segment"; exit 1; }
fi
say "image file: $extents extents; $(sed -n 's/.*resumes it with: //p' /tmp/setup.log)"

memtest_start "${KSAVE_MEMTEST_MIB:-64}"
dd if=/dev/urandom of=/tmp/file bs=1M count=8 2>/dev/null
want=$(sha256sum /tmp/file | cut -d' ' -f1)
if ! { cp /tmp/file /mnt/kept && sync; }; then say "could not write a file on $fs"; exit 1; fi
last=0
for round in 1 2; do
  say "hibernating ($round)"
  ksave hibernate || { say "hibernate failed"; exit 1; }
  memtest_check
  count=$(sed 's/.*count //' /tmp/memtest.result)
  [ "$count" -gt "$last" ] || { say "counter did not carry on: $count after $last"; exit 1; }
  [ "$(sha256sum /mnt/kept | cut -d' ' -f1)" = "$want" ] || { say "the file on $fs changed"; exit 1; }
  say "resumed ($round): memory and the file system intact, count $last -> $count"
  last=$count
done
filefrag -v "$image" > /tmp/extents.after
cmp -s /tmp/extents.before /tmp/extents.after || { diff /tmp/extents.before /tmp/extents.after; say "the image file's extents changed"; exit 1; }
say "extents unchanged: $extents"
# A snapshot, then the store as status shows it and the image verified
# through the file itself (what ksave wrote under the file system).
ksave hibernate --snapshot > /tmp/snapshot.log 2>&1 || { cat /tmp/snapshot.log; say "snapshot failed"; exit 1; }
ksave status | grep -q "^store .*$image" || { ksave status; say "ksave status does not show the image file"; exit 1; }
ksave verify "$image" > /tmp/verify 2>&1 || { cat /tmp/verify; say "ksave verify of the image file failed"; exit 1; }
say "snapshot verified through the file: $(tail -1 /tmp/verify)"

# The file's bytes on the disk (ksave writes under the file system: what
# the page cache holds of the file is stale).
on_disk() { dd if="$image" bs=1M iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1; }

# refused WHY: `ksave hibernate` must fail before the jump, saying WHY, and
# write nothing: the image file's bytes stay as they were.
# Its header where setup put it (through the recorded map: the old blocks
# of a file moved since), by its nonce: ksave's first write is a header.
header_nonce() { ksave status --json 2>/dev/null | sed -n 's/.*"nonce":"\([^"]*\)".*/\1/p'; }

refused() {
  before=$(on_disk)
  nonce=$(header_nonce)
  if ksave hibernate >/tmp/why 2>&1; then say "hibernate took a store that is $1"; exit 1; fi
  cat /tmp/why
  grep -q "$1" /tmp/why || { say "hibernate refused, but not for \"$1\""; exit 1; }
  grep -q "loaded in" /tmp/why && { say "hibernate loaded ksave before refusing"; exit 1; }
  [ "$(on_disk)" = "$before" ] || { say "the refused hibernate changed the file"; exit 1; }
  # (A balance may have reused the old blocks already: then there is no
  # old header left to compare.)
  if [ -n "$nonce" ] && [ "$(header_nonce)" != "$nonce" ]; then say "the refused hibernate wrote a header where the map says ($nonce)"; exit 1; fi
  say "refused: $1"
}
chattr -i "$image"
refused "no longer immutable"
case $fs in
  ext4)
    # The file copied and put in its place: same name, same bytes (its map
    # too), other blocks (the filler's, freed for it).
    rm /mnt/filler
    if ! { /bin/cp "$image" "$image.new" && mv "$image.new" "$image" && chattr +i "$image"; }; then say "could not move the file"; exit 1; fi
    refused "blocks moved since setup"
    ;;
  btrfs)
    # A balance relocates every data chunk: the file's blocks move (an
    # immutable file is no exception; see docs/FILESTORE.md).
    chattr +i "$image"
    btrfs balance start -d /mnt >/dev/null 2>&1 || { say "btrfs balance failed"; exit 1; }
    refused "blocks moved since setup"
    ;;
  xfs-lvm)
    /bin/cp --reflink=always "$image" /mnt/clone || { say "reflink failed"; exit 1; }
    chattr +i "$image"
    refused "shared with another file"
    ;;
esac
# The remedy the refusals name: set up again (the file taken again where it
# lies now, its claim kept where its header stays), and saves go on.
rm -f /mnt/clone
ksave setup --file "$image" --elf /ksave.elf > /tmp/setup.log 2>&1 || { cat /tmp/setup.log; say "setup again failed"; exit 1; }
# (the copy and the checks have grown the page cache: what would help,
# as the tool says when the file is too small for it)
ksave hibernate --snapshot --drop-caches > /tmp/snapshot.log 2>&1 || { cat /tmp/snapshot.log; say "a snapshot after setting up again failed"; exit 1; }
ksave verify "$image" > /tmp/verify 2>&1 || { cat /tmp/verify; say "ksave verify after setting up again failed"; exit 1; }
say "set up again: a snapshot taken and verified"
memtest_stop
chattr -i "$image"
umount /mnt || { say "umount failed"; exit 1; }
case $fs in
  ext4) e2fsck -fn "$fsdev" > /tmp/fsck 2>&1 ;;
  btrfs) btrfs check --readonly "$fsdev" > /tmp/fsck 2>&1 ;;
  xfs-lvm) xfs_repair -n "$fsdev" > /tmp/fsck 2>&1 ;;
esac || { cat /tmp/fsck; say "$fs check found damage"; exit 1; }
say "$fs clean ($(tail -1 /tmp/fsck))"
