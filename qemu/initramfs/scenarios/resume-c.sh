#!/bin/sh
# Kernel C's early userspace: resume a hibernated system if there is one,
# else carry on booting. One boot entry does both.
# shellcheck source=SCRIPTDIR/../lib/test.sh # in the initramfs, as qemu/mkinitramfs.sh installs it
. /lib/ksave-test/test.sh
say "kernel C: looking for an image to resume"
ksave resume --partuuid "$KSAVE_PARTUUID" ${KSAVE_FILE:+--file-at "$KSAVE_FILE"} --elf /ksave.elf
say "nothing resumed (ksave resume exit $?): booting normally"
