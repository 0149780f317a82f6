#!/bin/sh
# Baseline for `make bench`: Linux's own hibernation (swap partition, same
# kernel, same VM, same memtest load). Returns from the write to
# /sys/power/state only once resumed.
say() { echo "ksave-test: $*"; }
mkswap /dev/sda1 >/dev/null && swapon /dev/sda1 || { say "no swap"; exit 1; }
memtest fill --mib "${KSAVE_MEMTEST_MIB:-256}" --seed 42 --manifest /tmp/manifest &
for _ in $(seq 600); do [ -e /tmp/memtest.ready ] && break; sleep 0.1; done
say "linux: hibernating"
echo disk > /sys/power/state || { say "linux hibernation failed"; exit 1; }
say "linux: resumed"
touch /tmp/memtest.check
for _ in $(seq 600); do [ -e /tmp/memtest.check ] || break; sleep 0.1; done
grep -q "data intact" /tmp/memtest.result || { say "memtest data changed"; exit 1; }
touch /tmp/memtest.stop
