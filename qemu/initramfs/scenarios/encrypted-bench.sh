#!/bin/sh
# `make bench`: the same memory saved plain (ksave's partition, partition
# 1), sealed (a file on ext4 on LUKS2, partition 2) and sealed on one CPU
# (`--one-cpu`), in turns, each resumed by the harness (kernel C after
# the unlock); and the kernel's own dm-crypt throughput in this VM.
# shellcheck source=SCRIPTDIR/../lib/test.sh # in the initramfs, as qemu/mkinitramfs.sh installs it
. /lib/ksave-test/test.sh
export DM_DISABLE_UDEV=1
mkdir -p /run/cryptsetup /mnt
plain=$(test_partition 1) || exit 1
volume=$(test_partition 2) || exit 1
printf %s "$LUKS_PASSPHRASE" | cryptsetup luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file - "$volume" \
  || { say "luksFormat failed"; exit 1; }
luks_open "$volume" "$LUKS_PASSPHRASE" || { say "the volume did not unlock"; exit 1; }
if ! { mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 /dev/mapper/root && mount -t ext4 /dev/mapper/root /mnt; }; then say "ext4 on the volume failed"; exit 1; fi
KSAVE_CONF=/etc/ksave-plain.conf ksave setup --partition "$plain" --allow-plaintext --elf /ksave.elf --no-precheck > /tmp/setup.log 2>&1 \
  || { cat /tmp/setup.log; say "setup of the partition failed"; exit 1; }
KSAVE_CONF=/etc/ksave-sealed.conf ksave setup --file /mnt/image --size 640M --elf /ksave.elf --no-precheck > /tmp/setup.log 2>&1 \
  || { cat /tmp/setup.log; say "setup of the file failed"; exit 1; }
KSAVE_CONF=/etc/ksave-sealed.conf ksave status > /tmp/status
say "encrypted store: $(sed -n 's/^resume args  \(.*\) (.*/\1/p' /tmp/status)"
# dm-crypt's own rate in this VM (memory only), next to ksave's.
cryptsetup benchmark -c aes-xts-plain64 -s 512 2>/dev/null | sed -n 's/^ *aes-xts *512b *\([0-9.]*\) MiB\/s *\([0-9.]*\) MiB\/s.*/ksave-metric dm_crypt_encrypt_mib_s=\1 dm_crypt_decrypt_mib_s=\2/p'
memtest_start "${KSAVE_MEMTEST_MIB:-256}"
for round in 1 2 3 4 5 6 7 8 9; do
  case $((round % 3)) in
    1) store=plain one_cpu= ;;
    2) store=sealed one_cpu= ;;
    *) store=sealed one_cpu=--one-cpu ;;
  esac
  say "hibernating ($round, $store${one_cpu:+, one CPU})"
  KSAVE_CONF=/etc/ksave-$store.conf ksave hibernate $one_cpu || { say "hibernate failed"; exit 1; }
  memtest_check
  say "resumed ($round)"
done
say "bench done"
