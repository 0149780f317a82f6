#!/bin/bash
# dracut module (installed as /usr/lib/dracut/modules.d/90ksave): what the
# initramfs-tools hook and boot scripts do, for dracut's systemd initrd
# (Fedora's family; Debian's dracut). It puts ksave's CLI, its image and its
# setup into the initrd, and ksave-resume.service, which resumes the
# hibernated system or invalidates its image before the root is checked or
# mounted. Included in every initrd once ksave is set up.
# shellcheck disable=SC2154 # dracut sets moddir, initdir, systemdsystemunitdir, SYSTEMCTL

check() {
    require_binaries ksave || return 1
    # Set up: the initrd carries the setup it resumes from. Not yet: only
    # when asked for by name.
    [ -f /etc/ksave.conf ] || return 255
    return 0
}

# The unit is ordered against systemd's own initrd units.
depends() {
    echo systemd
}

install() {
    local elf partuuid device
    elf=$(sed -n 's/^elf=//p' /etc/ksave.conf)
    partuuid=$(sed -n 's/^partuuid=//p' /etc/ksave.conf)
    inst_binary /usr/sbin/ksave
    inst_simple "${elf:-/usr/lib/ksave/ksave.elf}"
    inst_simple /etc/ksave.conf
    inst_simple "$moddir/ksave-resume.service" "$systemdsystemunitdir/ksave-resume.service"
    if [ -n "$partuuid" ]; then
        # After the store's partition exists (and, through the unit,
        # cryptsetup.target): waited for as a device, not by a sleep.
        # ksave setup writes the PARTUUID in lower case, as udev names it.
        device=$(systemd-escape -p --suffix=device "/dev/disk/by-partuuid/$partuuid")
        mkdir -p "$initdir$systemdsystemunitdir/ksave-resume.service.d"
        printf '[Unit]\nWants=%s\nAfter=%s\n' "$device" "$device" > "$initdir$systemdsystemunitdir/ksave-resume.service.d/partition.conf"
    fi
    $SYSTEMCTL -q --root "$initdir" add-wants initrd.target ksave-resume.service
}
