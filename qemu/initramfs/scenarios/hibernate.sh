#!/bin/sh
# `ksave hibernate --snapshot` on a live system holding known data
# (memtest), then proof that the system and its data are intact.
#   KSAVE_PARTUUID  the image partition      KSAVE_LZ4=1      compress
#   KSAVE_KEXEC_TOOLS=1  load through kexec-tools, not kexec_load(2)
#   KSAVE_EXPECT    ok | too-small | wrong-guid | io-error | cpu-exception
#                   | iommu-left-on (a snapshot works; a power-off is refused)
# shellcheck source=SCRIPTDIR/../lib/test.sh # in the initramfs, as qemu/mkinitramfs.sh installs it
. /lib/ksave-test/test.sh
expect=${KSAVE_EXPECT:-ok}

setup_flags=
if [ "$expect" = too-small ]; then
  ksave setup --partuuid "$KSAVE_PARTUUID" --elf /ksave.elf && { say "setup accepted a partition too small"; exit 1; }
  say "setup refused (as it must)"
  setup_flags=--no-precheck
fi
ksave setup --partuuid "$KSAVE_PARTUUID" --elf /ksave.elf ${KSAVE_LZ4:+--lz4} $setup_flags || { say "setup failed"; exit 1; }
memtest_start "${KSAVE_MEMTEST_MIB:-256}"

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
esac
if [ "$expect" = cpu-exception ]; then
  # ksave faults mid-save on purpose: it must come back, and the tool refuse.
  say "jump: ksave hibernate --snapshot --selftest-fault-in-save"
  ksave hibernate --snapshot --selftest-fault-in-save && { say "hibernate did not fail"; exit 1; }
  say "hibernate refused (as it must)"
elif [ "$expect" = io-error ]; then
  # The host's checks pass; the disk fails under ksave.
  say "jump: ksave hibernate --snapshot"
  ksave hibernate --snapshot && { say "hibernate did not fail"; exit 1; }
  say "hibernate refused (as it must)"
elif [ "$expect" != ok ] && [ "$expect" != iommu-left-on ]; then
  # The host's own check refuses first ...
  ksave hibernate --snapshot && { say "hibernate passed the host check"; exit 1; }
  say "host check refused (as it must)"
  # ... and with it skipped, ksave itself must refuse, report, and return.
  say "jump: ksave hibernate --snapshot --no-precheck"
  ksave hibernate --snapshot --no-precheck && { say "hibernate did not fail"; exit 1; }
  say "hibernate refused (as it must)"
fi
memtest_check
say "still running, memory intact"
ksave status
if [ "$expect" = ok ]; then
  scratch=$(test_partition 2) || exit 1
  dd if=/tmp/manifest of="$scratch" bs=4096 conv=fsync 2>/dev/null || { say "could not store the manifest"; exit 1; }
  say "manifest stored"
fi
memtest_stop
