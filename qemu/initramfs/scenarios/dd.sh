#!/bin/sh
# Baseline for `make bench`: Linux's own raw throughput to the test
# partition with O_DIRECT, 4 MiB blocks. Debian's busybox dd prints no
# timing, so the harness times the lines around each dd on the host.
# shellcheck source=SCRIPTDIR/../lib/test.sh # in the initramfs, as qemu/mkinitramfs.sh installs it
. /lib/ksave-test/test.sh
part=$(test_partition 1) || exit 1
count=$((${KSAVE_DD_MIB:-256} / 4))
say "dd write: start"
dd if=/dev/zero of="$part" bs=4M count=$count oflag=direct 2>/dev/null || { say "dd write failed"; exit 1; }
say "dd write: done"
say "dd read: start"
dd if="$part" of=/dev/null bs=4M count=$count iflag=direct 2>/dev/null || { say "dd read failed"; exit 1; }
say "dd read: done"
