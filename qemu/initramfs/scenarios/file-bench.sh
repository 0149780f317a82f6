#!/bin/sh
# make bench: the same memory saved into ksave's partition and into a file
# on ext4 on the same disk, in turns, three times each, each resumed by the
# harness (QEMU -kernel); then
# what `ksave hibernate` spends finding a 1 GiB file's blocks again, in one
# extent and in hundreds.
#   KSAVE_PARTUUID  the partition store
# shellcheck source=SCRIPTDIR/../lib/test.sh # in the initramfs, as qemu/mkinitramfs.sh installs it
. /lib/ksave-test/test.sh
scratch=$(test_partition 2) || exit 1
if ! { mkfs.ext4 -q -F "$scratch" && mkdir -p /mnt && mount -t ext4 "$scratch" /mnt; }; then say "ext4 set-up failed"; exit 1; fi
memtest_start "${KSAVE_MEMTEST_MIB:-256}"
# A fresh file system: the file's blocks are nearly contiguous. The stores
# take turns, so that neither has the other's luck with the host's cache.
ksave setup --file /mnt/one --size 1G --elf /ksave.elf > /tmp/setup.log 2>&1 || { cat /tmp/setup.log; say "setup --file failed"; exit 1; }
cat /tmp/setup.log
say "image file: $(sed -n 's/.* in \([0-9]*\) extents.*/\1/p' /tmp/setup.log) extents; $(sed -n 's/.*resumes it with: //p' /tmp/setup.log)"
for round in 1 2 3 4 5 6; do
  if [ $((round % 2)) = 1 ]; then
    ksave setup --partuuid "$KSAVE_PARTUUID" --elf /ksave.elf > /dev/null || { say "setup failed"; exit 1; }
    store="partition"
  else
    ksave setup --file /mnt/one --elf /ksave.elf > /dev/null || { say "setup --file failed"; exit 1; }
    store="file"
  fi
  say "hibernating ($round, $store)"
  ksave hibernate || { say "hibernate failed"; exit 1; }
  memtest_check
done
# Another 1 GiB file, in hundreds of pieces: the rest of the file system
# filled, every other 4 MiB freed.
fragment_free_space /mnt 4194304
ksave setup --file /mnt/fragmented --size 1G --elf /ksave.elf > /tmp/setup.log 2>&1 || { cat /tmp/setup.log; say "setup --file failed"; exit 1; }
cat /tmp/setup.log
say "fragmented file: $(sed -n 's/.* in \([0-9]*\) extents.*/\1/p' /tmp/setup.log) extents"
ksave hibernate --snapshot > /tmp/snapshot.log 2>&1 || { cat /tmp/snapshot.log; say "snapshot failed"; exit 1; }
grep ksave-metric /tmp/snapshot.log
memtest_stop
say "bench done"
