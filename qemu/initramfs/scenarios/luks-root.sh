#!/bin/sh
# The Debian test system's encrypted root, made and checked here because
# the host has no device-mapper (qemu/mkdebiandisk.sh, KSAVE_ROOT_LUKS).
#   KSAVE_PHASE  format: LUKS2 on the test disk's partition 1 with the UUID
#                  its crypttab names (KSAVE_LUKS_UUID), and the root file
#                  system (the second disk, label debian-root) copied in
#                check: unlock it, the file system's own check (e2fsck -fn)
# shellcheck source=SCRIPTDIR/../lib/test.sh # in the initramfs, as qemu/mkinitramfs.sh installs it
. /lib/ksave-test/test.sh
# No udev here: device-mapper makes its nodes itself.
export DM_DISABLE_UDEV=1
mkdir -p /run/cryptsetup
volume=$(test_partition 1) || exit 1
case "${KSAVE_PHASE:-}" in
format)
  source=$(blkid -L debian-root) || { say "no disk labelled debian-root"; exit 1; }
  # PBKDF2 at 1000 iterations: an unlock in milliseconds under TCG, where
  # the default argon2id would want more memory than the VM has.
  printf %s "$LUKS_PASSPHRASE" | cryptsetup luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
    --uuid "$KSAVE_LUKS_UUID" --key-file - "$volume" || { say "luksFormat failed"; exit 1; }
  luks_open "$volume" "$LUKS_PASSPHRASE" || { say "the new volume did not unlock"; exit 1; }
  dd if="$source" of=/dev/mapper/root bs=1M conv=fsync 2>/dev/null || { say "copying the root file system in failed"; exit 1; }
  cryptsetup close root || { say "closing the volume failed"; exit 1; }
  say "root file system encrypted: LUKS2 $KSAVE_LUKS_UUID on $volume"
  ;;
check)
  luks_open "$volume" "$LUKS_PASSPHRASE" || { say "the volume did not unlock"; exit 1; }
  e2fsck -fn /dev/mapper/root || { say "e2fsck -fn found errors"; exit 1; }
  cryptsetup close root
  say "root file system clean"
  ;;
*)
  say "unknown phase ${KSAVE_PHASE:-}"
  exit 1
  ;;
esac
