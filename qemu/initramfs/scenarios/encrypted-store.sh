#!/bin/sh
# The image in a file on an encrypted root: ext4 on LUKS2 on the test
# disk's partition 2, unlocked with its passphrase. The images there are
# sealed; the harness checks the disk for plaintext between the boots.
#   KSAVE_PHASE  first: format the volume; a plaintext store refused while
#                  a swap on the volume is active; set up; hibernate, be
#                  resumed (by kernel C, after the unlock), the key block
#                  destroyed then; hibernate again (the harness then tries
#                  a wrong passphrase)
#                again: the image the last boot refused is not resumed
#                  now (its key block goes, or went then); set up again,
#                  hibernate (the harness tampers with what ksave wrote)
#                live: as a live system would, unlock the volume of the
#                  hibernated system, mount it and write a file
# shellcheck source=SCRIPTDIR/../lib/test.sh # in the initramfs, as qemu/mkinitramfs.sh installs it
. /lib/ksave-test/test.sh
# No udev here: device-mapper makes its nodes itself.
export DM_DISABLE_UDEV=1
mkdir -p /run/cryptsetup /mnt
volume=$(test_partition 2) || exit 1
image=/mnt/var/lib/ksave/image
phase=${KSAVE_PHASE:-first}

if [ "$phase" = first ]; then
  # PBKDF2 at 1000 iterations: an unlock in milliseconds under TCG (the
  # default argon2id would want more memory than this VM has).
  printf %s "$LUKS_PASSPHRASE" | cryptsetup luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file - "$volume" \
    || { say "luksFormat failed"; exit 1; }
fi
luks_open "$volume" "$LUKS_PASSPHRASE" || { say "the volume did not unlock"; exit 1; }
if [ "$phase" = live ]; then
  if ! { mount -t ext4 /dev/mapper/root /mnt && echo live > /mnt/written-by-a-live-system && umount /mnt; }; then
    say "could not mount the volume"; exit 1
  fi
  say "mounted the hibernated system's volume"
  exit 0
fi
# Inode tables written now, not by ext4lazyinit in the background: a
# kernel thread (the kexec jump freezes user space only) writing through
# dm-crypt while the devices suspend for the jump is suspected of the one
# hang seen in this story (2 runs of 10; see the note of issue 22).
[ "$phase" = first ] && { mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 /dev/mapper/root || { say "mkfs.ext4 failed"; exit 1; }; }
mount -t ext4 /dev/mapper/root /mnt || { say "mount failed"; exit 1; }

if [ "$phase" = first ]; then
  # An encrypted swap makes a plaintext store a leak: refused by name.
  if ! { dd if=/dev/zero of=/mnt/swap bs=1M count=16 2>/dev/null && chmod 600 /mnt/swap && mkswap /mnt/swap >/dev/null && swapon /mnt/swap; }; then
    say "could not start a swap on the volume"; exit 1
  fi
  if ksave setup --partition "$(test_partition 1)" --elf /ksave.elf --no-precheck > /tmp/why 2>&1; then say "setup took a plaintext store on an encrypted machine"; exit 1; fi
  cat /tmp/why
  grep -q "the swap /mnt/swap" /tmp/why || { say "setup refused the plaintext store, but not for the encrypted swap"; exit 1; }
  say "refused: a plaintext store"
  swapoff /mnt/swap && rm /mnt/swap
else
  # The image a wrong passphrase kept from resuming was invalidated then:
  # not resumed now that the volume is unlocked, and its key goes.
  ksave resume --partuuid "$KSAVE_PARTUUID" --file-at "$KSAVE_FILE" --key-at "$KSAVE_KEY_AT" --elf /ksave.elf --or-invalidate > /tmp/resume 2>&1 \
    && { say "an image refused before was resumed"; exit 1; }
  cat /tmp/resume
  grep -q "already resumed or invalidated" /tmp/resume || { say "the image was not refused as invalidated"; exit 1; }
  grep -qE "the key block (is destroyed|holds no key)" /tmp/resume || { say "its key block was not destroyed"; exit 1; }
  if [ -e /mnt/written-by-a-live-system ]; then say "what the live system wrote is there"; fi
  say "not resumed later: invalidated, key block destroyed"
fi

ksave setup --file "$image" --elf /ksave.elf > /tmp/setup.log 2>&1 || { cat /tmp/setup.log; say "setup --file failed"; exit 1; }
cat /tmp/setup.log
grep -q "lies on the encrypted volume" /tmp/setup.log || { say "setup did not take the file as encrypted"; exit 1; }
ksave status > /tmp/status 2>&1 || { cat /tmp/status; say "status failed"; exit 1; }
grep -q "^encrypted    yes" /tmp/status || { cat /tmp/status; say "status does not say encrypted"; exit 1; }
say "encrypted store: $(sed -n 's/^resume args  \(.*\) (.*/\1/p' /tmp/status)"

memtest_start "${KSAVE_MEMTEST_MIB:-64}"
dd if=/dev/urandom of=/tmp/file bs=1M count=8 2>/dev/null
want=$(sha256sum /tmp/file | cut -d' ' -f1)
if ! { cp /tmp/file /mnt/kept && sync; }; then say "could not write a file on the volume"; exit 1; fi

rounds="1 2"
if [ "$phase" = again ]; then
  rounds=3
  if [ -n "$KSAVE_EXPORT" ]; then
    # A snapshot read back by the tool: every chunk's tag checked with the
    # key from the key block (the volume is unlocked), the core file 0600.
    ksave hibernate --snapshot > /tmp/snapshot.log 2>&1 || { cat /tmp/snapshot.log; say "snapshot failed"; exit 1; }
    ksave status | grep -q "^sealed       yes" || { ksave status; say "status does not say the image is sealed"; exit 1; }
    ksave verify "$image" > /tmp/verify 2>&1 || { cat /tmp/verify; say "ksave verify of the sealed image failed"; exit 1; }
    ksave export --elf /mnt/core "$image" > /tmp/export 2>&1 || { cat /tmp/export; say "ksave export of the sealed image failed"; exit 1; }
    [ "$(stat -c %a /mnt/core)" = 600 ] || { say "the core file is not 0600"; exit 1; }
    rm /mnt/core
    say "snapshot verified and exported: $(tail -1 /tmp/verify)"
  fi
fi
for round in $rounds; do
  say "hibernating ($round)"
  ksave hibernate || { say "hibernate failed"; exit 1; }
  memtest_check
  [ "$(sha256sum /mnt/kept | cut -d' ' -f1)" = "$want" ] || { say "the file on the volume changed"; exit 1; }
  # The image is resumed: its key is gone, not even the passphrase (the
  # volume is open) reads it again.
  ksave status --json | grep -q '"key_block":"no key' || { ksave status --json; say "the key block survived the resume"; exit 1; }
  say "resumed ($round): memory and the volume intact, the key block destroyed"
done
say "no more rounds"
