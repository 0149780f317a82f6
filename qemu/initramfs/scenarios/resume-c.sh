#!/bin/sh
# Kernel C's early userspace: resume a hibernated system if there is one,
# else carry on booting. One boot entry does both.
#   KSAVE_LUKS=N   the image file lies on LUKS partition N: unlocked first
#                  (with KSAVE_LUKS_PASS, else the right passphrase), as an
#                  initramfs does before it resumes; KSAVE_KEY_AT says where
#                  the key block is.
# shellcheck source=SCRIPTDIR/../lib/test.sh # in the initramfs, as qemu/mkinitramfs.sh installs it
. /lib/ksave-test/test.sh
say "kernel C: looking for an image to resume"
if [ -n "$KSAVE_LUKS" ]; then
  if luks_open "$(test_partition "$KSAVE_LUKS")" "${KSAVE_LUKS_PASS:-$LUKS_PASSPHRASE}"; then
    # For the harness only, which searches the disk for it afterwards: the
    # data key, read through the volume as `ksave resume` reads it.
    at=${KSAVE_KEY_AT##*:}
    key=$(dd if=/dev/mapper/root bs=4096 skip=$((at / 4096)) count=1 iflag=direct 2>/dev/null | od -An -v -tx1 -j40 -N32 | tr -d ' \n')
    say "key block holds $key"
  else
    say "the volume stays locked"
  fi
fi
ksave resume --partuuid "$KSAVE_PARTUUID" ${KSAVE_FILE:+--file-at "$KSAVE_FILE"} ${KSAVE_KEY_AT:+--key-at "$KSAVE_KEY_AT"} --elf /ksave.elf ${KSAVE_LUKS:+--or-invalidate}
say "nothing resumed (ksave resume exit $?): booting normally"
