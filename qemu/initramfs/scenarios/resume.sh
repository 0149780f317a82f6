#!/bin/sh
# The whole story on lived-in memory: prove a snapshot leaves out only free
# pages, hibernate (power off), be resumed by another boot, check
# everything, and do it all a second time.
#   KSAVE_PARTUUID  the image partition
#   KSAVE_NVS_MARK  set: prove the image carries ACPI NVS (UEFI machines)
#   KSAVE_IOMMU     set: the machine has an IOMMU, which must be translating
#   KSAVE_FRESH     set: memory as after boot (no churn, no proof; make bench)
#   KSAVE_INIT_ON_FREE  set: the kernel runs with init_on_free=1 and trusts
#                   free pages to be zero: after each resume, new pages are
#                   checked to be (ksave zeroed the pages it left out)
#   KSAVE_PAGE_POISON  set: the kernel runs with page_poison=1 and checks
#                   the poison in each free page it hands out: no free
#                   page may be left out, and none may be found changed
# shellcheck source=SCRIPTDIR/../lib/test.sh # in the initramfs, as qemu/mkinitramfs.sh installs it
. /lib/ksave-test/test.sh

ksave setup --partuuid "$KSAVE_PARTUUID" --elf /ksave.elf ${KSAVE_LZ4:+--lz4} || { say "setup failed"; exit 1; }
scratch=$(test_partition 2) || exit 1
if [ -n "$KSAVE_IOMMU" ]; then
  # shellcheck disable=SC2012 # counting entries, and group names are numbers
  groups=$(ls /sys/kernel/iommu_groups 2>/dev/null | wc -l)
  [ "$groups" -gt 0 ] || { say "no IOMMU groups: DMA remapping is off"; exit 1; }
  say "DMA remapping on: iommu groups $groups"
fi
memtest_start "${KSAVE_MEMTEST_MIB:-256}"
dd if=/dev/urandom of=/tmp/file bs=1M count=16 2>/dev/null
want=$(sha256sum /tmp/file | cut -d' ' -f1)

check() {
  memtest_check
  count=$(sed 's/.*count //' /tmp/memtest.result)
  [ "$(sha256sum /tmp/file | cut -d' ' -f1)" = "$want" ] || { say "tmpfs file changed"; exit 1; }
  # The disk still works: write the file to partition 2 and read it back.
  dd if=/tmp/file of="$scratch" bs=1M count=16 oflag=direct 2>/dev/null || { say "disk write failed"; exit 1; }
  [ "$(dd if="$scratch" bs=1M count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)" = "$want" ] || { say "disk read back differs"; exit 1; }
}

# page_poison=1: what the kernel would call corruption, from its log.
poison_errors() {
  dmesg | grep "pagealloc: " | head -3
}

# A poisoning kernel's snapshot leaves no free page out: the tool saves
# them all, poison and all.
prove_poison_kept() {
  grep -qw page_poison=1 /proc/cmdline || { say "page_poison=1 is not on the command line"; exit 1; }
  lived_in
  ksave hibernate --snapshot > /tmp/snapshot.log || { cat /tmp/snapshot.log; say "snapshot failed"; exit 1; }
  cat /tmp/snapshot.log
  grep -q "poisons its free pages" /tmp/snapshot.log || { say "the tool did not see the poisoning"; exit 1; }
  free=$(sed -n 's/.*pages_free=\([0-9]*\).*/\1/p' /tmp/snapshot.log)
  [ "${free:-x}" = 0 ] || { say "${free:-no count of} free pages left out of a poisoning kernel's image"; exit 1; }
  [ -z "$(poison_errors)" ] || { say "poison found changed before any resume: $(poison_errors)"; exit 1; }
  say "page poisoning: no free page left out"
}

check
# Memory that has been used for a while: the free pages hold old data. A
# snapshot proves what the image leaves out is free, then the story runs on
# lived-in memory.
if [ -n "$KSAVE_PAGE_POISON" ]; then
  prove_poison_kept
  check
elif [ -z "$KSAVE_FRESH" ]; then
  prove_free_left_out
  check
fi
last=$count
# Every CPU comes back: ksave's resume borrows the others and parks them
# again (INIT), the state the kernel starts them from after the jump back.
cpus=$(cat /sys/devices/system/cpu/online)
say "CPUs online: $cpus"
for round in 1 2; do
  [ -z "$KSAVE_FRESH" ] && lived_in
  say "hibernating ($round), count $last"
  [ -n "$KSAVE_NVS_MARK" ] && nvs_mark
  ksave hibernate ${KSAVE_ONE_CPU:+--one-cpu} || { say "hibernate failed"; exit 1; }
  check
  [ -n "$KSAVE_NVS_MARK" ] && nvs_check
  [ "$count" -gt "$last" ] || { say "counter did not carry on: $count after $last"; exit 1; }
  [ "$(cat /sys/devices/system/cpu/online)" = "$cpus" ] || { say "CPUs online after the resume: $(cat /sys/devices/system/cpu/online), before: $cpus"; exit 1; }
  if [ -n "$KSAVE_INIT_ON_FREE" ]; then
    grep -qw init_on_free=1 /proc/cmdline || { say "init_on_free=1 is not on the command line"; exit 1; }
    memtest zeroed --percent 60 || { say "new pages held old data after the resume"; exit 1; }
  fi
  if [ -n "$KSAVE_PAGE_POISON" ]; then
    # New pages, most of them free ones: the kernel checks each one's poison.
    memtest zeroed --percent 60 || { say "new pages held old data after the resume"; exit 1; }
    [ -z "$(poison_errors)" ] || { say "the kernel found its free pages' poison changed after the resume: $(poison_errors)"; exit 1; }
  fi
  say "resumed ($round): memory, tmpfs and disk intact, count $last -> $count"
  last=$count
done
memtest_stop
