#!/bin/sh
# Baseline for `make bench`: Linux's own hibernation (swap partition, same
# kernel, same VM, same memtest load). Returns from the write to
# /sys/power/state only once resumed.
# shellcheck source=SCRIPTDIR/../lib/test.sh # in the initramfs, as qemu/mkinitramfs.sh installs it
. /lib/ksave-test/test.sh
mkswap /dev/sda1 >/dev/null || { say "no swap"; exit 1; }
swapon /dev/sda1 || { say "no swap"; exit 1; }
memtest_start "${KSAVE_MEMTEST_MIB:-256}"
# The same 16 MiB tmpfs file resume.sh holds, so both images hold the same data.
dd if=/dev/urandom of=/tmp/file bs=1M count=16 2>/dev/null
# KSAVE_LIVED_IN set: memory used for a while first, as resume.sh does.
[ -n "$KSAVE_LIVED_IN" ] && lived_in
say "linux: hibernating"
echo disk > /sys/power/state || { say "linux hibernation failed"; exit 1; }
say "linux: resumed"
memtest_check
memtest_stop
