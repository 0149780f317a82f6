#!/bin/sh
# `ksave hibernate --snapshot` on a live system holding known data
# (memtest), then proof that the system and its data are intact.
#   KSAVE_PARTUUID  the image partition      KSAVE_LZ4=1      compress
#   KSAVE_KEXEC_TOOLS=1  load through kexec-tools, not kexec_load(2)
#   KSAVE_EXPECT    ok | too-small | wrong-guid | io-error | cpu-exception
#                   | iommu-left-on (a snapshot works; a power-off is refused)
#                   | reformatted (setup refuses what is not ksave's, and a
#                     store made a file system since setup is never written)
#                   | cloned (the disk has a clone, vda: neither is written)
#                   | driver-ram (virtio-mem RAM plugged: refused, named)
# shellcheck source=SCRIPTDIR/../lib/test.sh # in the initramfs, as qemu/mkinitramfs.sh installs it
. /lib/ksave-test/test.sh
expect=${KSAVE_EXPECT:-ok}

# refused WHAT ARGS...: `ksave setup ARGS` must fail, naming WHAT.
refused() {
  what=$1; shift
  if ksave setup --elf /ksave.elf --no-precheck "$@" 2>/tmp/why; then say "setup took $*, which is $what"; exit 1; fi
  grep -q "$what" /tmp/why || { say "setup refused $*, but not for \"$what\": $(cat /tmp/why)"; exit 1; }
  say "setup refused: $what"
}

if [ "$expect" = reformatted ]; then
  # Partition 2 (Linux data type) is no store until claimed, and nothing
  # that holds or uses data is ever taken.
  scratch=$(test_partition 2) || exit 1
  disk=/dev/$(basename "$(readlink -f "/sys/class/block/${scratch#/dev/}/..")")
  refused "not ksave's store" --partition "$scratch"
  mkfs.ext4 -q -F "$scratch" || { say "mkfs.ext4 failed"; exit 1; }
  refused "ext4 filesystem signature" --partition "$scratch" --claim --yes
  mkdir -p /mnt
  mount -t ext4 "$scratch" /mnt || { say "mount failed"; exit 1; }
  refused "mounted at /mnt" --partition "$scratch" --claim --yes
  umount /mnt
  wipefs -q -a "$scratch"
  mkswap "$scratch" >/dev/null || { say "mkswap failed"; exit 1; }
  swapon "$scratch" || { say "swapon failed"; exit 1; }
  refused "active swap" --partition "$scratch" --claim --yes
  swapoff "$scratch"
  wipefs -q -a "$scratch"
  sfdisk -q --part-type "$disk" 2 C12A7328-F81F-11D2-BA4B-00A0C93EC93B || { say "sfdisk failed"; exit 1; }
  refused "EFI system partition" --partition "$scratch" --claim --yes
  sfdisk -q --part-type "$disk" 2 0FC63DAF-8483-4772-8E79-3D69D8477DE4
  # Empty and unused: --claim makes it ksave's.
  ksave setup --elf /ksave.elf --no-precheck --partition "$scratch" --claim --yes || { say "setup --claim failed"; exit 1; }
  blkid -p -o value -s PART_ENTRY_TYPE "$scratch" | grep -qi 173db3cf || { say "setup --claim did not set ksave's type"; exit 1; }
  say "setup claimed $scratch"
fi
if [ "$expect" = too-small ]; then
  # Smaller than the worst case is taken, with a note: ksave counts what a
  # save needs before it writes.
  ksave setup --partuuid "$KSAVE_PARTUUID" --elf /ksave.elf > /tmp/setup.log || { say "setup refused a small partition"; exit 1; }
  cat /tmp/setup.log
  grep -q "less than the worst case" /tmp/setup.log || { say "setup gave no note of the small store"; exit 1; }
  say "setup took the small store, with a note"
fi
if [ "$expect" = cloned ]; then
  # A clone of the disk is attached (vda, the harness's copy): one
  # PARTUUID on two disks. Setup refuses to guess ...
  refused "is on 2 partitions" --partuuid "$KSAVE_PARTUUID"
  # ... so set up while the clone's copy has another GUID, then make it a
  # clone again: a clone made after setup.
  sfdisk -q --part-uuid /dev/vda 1 0C10E000-0000-4000-8000-000000000001 || { say "sfdisk failed"; exit 1; }
  ksave setup --partuuid "$KSAVE_PARTUUID" --elf /ksave.elf || { say "setup failed"; exit 1; }
  sfdisk -q --part-uuid /dev/vda 1 "$KSAVE_PARTUUID" || { say "sfdisk failed"; exit 1; }
  say "a clone of the store's disk, made after setup"
else
  ksave setup --partuuid "$KSAVE_PARTUUID" --elf /ksave.elf ${KSAVE_LZ4:+--lz4} || { say "setup failed"; exit 1; }
fi
memtest_start "${KSAVE_MEMTEST_MIB:-256}"
# Every CPU comes back after ksave returns: it borrows the ones the kernel
# took offline for the jump (to code LZ4) and parks them again (INIT).
cpus=$(cat /sys/devices/system/cpu/online)

case $expect in
  ok)
    say "jump: ksave hibernate --snapshot ${KSAVE_KEXEC_TOOLS:+--kexec-tools}"
    ksave hibernate --snapshot ${KSAVE_KEXEC_TOOLS:+--kexec-tools} || { say "hibernate failed"; exit 1; }
    ;;
  iommu-left-on)
    say "jump: ksave hibernate --snapshot, the IOMMU translating"
    ksave hibernate --snapshot || { say "hibernate failed"; exit 1; }
    memtest_check
    # The disk works after the jump back: the IOMMU translates for A again.
    scratch=$(test_partition 2) || exit 1
    dd if=/tmp/manifest of="$scratch" bs=4096 conv=fsync 2>/dev/null || { say "disk write after the snapshot failed"; exit 1; }
    say "jump: ksave hibernate (a power-off must be refused)"
    ksave hibernate && { say "hibernate did not fail"; exit 1; }
    say "hibernate refused (as it must)"
    ;;
  wrong-guid)
    # A stale setup: the recorded partition is gone.
    sed -i 's/^partuuid=.*/partuuid=DEADBEEF-0000-4000-8000-000000000001/' /etc/ksave.conf
    ;;
  reformatted)
    # Someone makes a file system on the store after setup and fills it.
    store=$(test_partition 1) || exit 1
    mkfs.ext4 -q -F "$store" || { say "mkfs.ext4 failed"; exit 1; }
    if ! { mount -t ext4 "$store" /mnt && cp /tmp/manifest /mnt/kept && umount /mnt; }; then say "could not fill the new file system"; exit 1; fi
    ;;
esac
if [ "$expect" = cpu-exception ]; then
  # ksave faults mid-save on purpose: it must come back, and the tool refuse.
  say "jump: ksave hibernate --snapshot --selftest-fault-in-save"
  ksave hibernate --snapshot --selftest-fault-in-save && { say "hibernate did not fail"; exit 1; }
  say "hibernate refused (as it must)"
elif [ "$expect" = io-error ] || [ "$expect" = too-small ]; then
  # The host's checks pass; the disk fails under ksave, or ksave counts
  # more than the store holds and writes nothing.
  say "jump: ksave hibernate --snapshot"
  ksave hibernate --snapshot >/tmp/why 2>&1; rc=$?
  cat /tmp/why
  [ "$rc" = 0 ] && { say "hibernate did not fail"; exit 1; }
  if [ "$expect" = too-small ]; then
    if ! { grep -q "this save needs" /tmp/why && grep -q "what would help: .*--drop-caches" /tmp/why; }; then
      say "the refusal does not say what was needed and what would help"; exit 1
    fi
  fi
  say "hibernate refused (as it must)"
elif [ "$expect" = driver-ram ]; then
  # RAM a driver added is not in the firmware's map (MHP_NO_FIRMWARE_MEMMAP):
  # no image holds it, so no hibernate may go ahead, checked or not.
  mib=0
  sed -n 's/^ *\([0-9a-f]*-[0-9a-f]*\) : System RAM (virtio_mem)$/\1/p' /proc/iomem > /tmp/driver-ram
  while read -r span; do
    mib=$((mib + ((0x${span#*-} - 0x${span%-*} + 1) >> 20)))
  done < /tmp/driver-ram
  [ "$mib" -gt 0 ] || { say "no RAM from virtio-mem in /proc/iomem"; exit 1; }
  say "RAM a driver added: $mib MiB"
  for how in "" --no-precheck; do
    # shellcheck disable=SC2086 # an option or none
    ksave hibernate --snapshot $how 2>/tmp/why && { say "hibernate $how went ahead with RAM a driver added"; exit 1; }
    cat /tmp/why >&2
    grep -q "System RAM (virtio_mem) at 0x.* is RAM a driver added" /tmp/why || { say "hibernate $how refused, but not naming the RAM: $(cat /tmp/why)"; exit 1; }
    [ "$(cat /sys/kernel/kexec_loaded)" = 0 ] || { say "hibernate $how loaded ksave before it refused"; exit 1; }
  done
  say "hibernate refused the RAM a driver added, naming it, nothing loaded"
elif [ "$expect" != ok ] && [ "$expect" != iommu-left-on ]; then
  # The host's own check refuses first ...
  ksave hibernate --snapshot 2>/tmp/why && { say "hibernate passed the host check"; exit 1; }
  cat /tmp/why >&2
  if [ "$expect" = reformatted ]; then
    grep -q "ext4 filesystem signature" /tmp/why || { say "the host check refused, but not for the file system"; exit 1; }
  elif [ "$expect" = cloned ]; then
    grep -q "is on 2 partitions" /tmp/why || { say "the host check refused, but not for the clone"; exit 1; }
  fi
  say "host check refused (as it must)"
  # ... and with it skipped, ksave itself must refuse, report, and return.
  say "jump: ksave hibernate --snapshot --no-precheck"
  ksave hibernate --snapshot --no-precheck && { say "hibernate did not fail"; exit 1; }
  say "hibernate refused (as it must)"
fi
if [ "$expect" = reformatted ]; then
  e2fsck -fn "$store" >/tmp/fsck 2>&1 || { say "the file system on the store was damaged: $(cat /tmp/fsck)"; exit 1; }
  if ! { mount -t ext4 -o ro "$store" /mnt && cmp -s /tmp/manifest /mnt/kept && umount /mnt; }; then say "the file on the store changed"; exit 1; fi
  say "the file system on the store is intact (e2fsck -fn, its file)"
fi
memtest_check
[ "$(cat /sys/devices/system/cpu/online)" = "$cpus" ] || { say "CPUs online after ksave returned: $(cat /sys/devices/system/cpu/online), before: $cpus"; exit 1; }
say "still running, memory intact, CPUs online: $cpus"
ksave status
if [ "$expect" = ok ]; then
  scratch=$(test_partition 2) || exit 1
  dd if=/tmp/manifest of="$scratch" bs=4096 conv=fsync 2>/dev/null || { say "could not store the manifest"; exit 1; }
  say "manifest stored"
fi
memtest_stop
