#!/bin/sh
# The kexec-jump round trip: jump to ksave, come back, jump again without
# reloading (re-entry), come back; memory must be untouched throughout.
# shellcheck source=SCRIPTDIR/../lib/test.sh # in the initramfs, as qemu/mkinitramfs.sh installs it
. /lib/ksave-test/test.sh

say "filling 64 MiB of tmpfs with random data"
dd if=/dev/urandom of=/tmp/data bs=1M count=64 2>/dev/null || exit 1
want=$(sha256sum /tmp/data | cut -d' ' -f1)
say "sha256 before: $want"

range="--mem-min=$KSAVE_MEM_MIN --mem-max=$KSAVE_MEM_MAX"
say "loading: kexec -t elf-x86_64 --load-preserve-context --args-none $range /ksave.elf"
# shellcheck disable=SC2086 # $range is two options: split on purpose
kexec -t elf-x86_64 --load-preserve-context --args-none $range /ksave.elf || { say "kexec load failed"; exit 1; }

for round in 1 2; do
  say "jump $round: kexec -e"
  # kexec-tools 2.0.25 exits 255 ("Bad file descriptor") even after a good
  # jump back: its status says nothing about ksave.
  kexec -e
  say "back from jump $round (kexec exit $?)"
  got=$(sha256sum /tmp/data | cut -d' ' -f1)
  if [ "$got" != "$want" ]; then
    say "sha256 after jump $round differs: $got"
    exit 1
  fi
  say "sha256 after jump $round matches"
done
