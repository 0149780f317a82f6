# shellcheck shell=sh
# What ksave's packages do when installed and removed, shared by the .deb's
# maintainer scripts and the RPM's scriptlets: dist/mkdeb.sh and
# dist/mkrpm.sh put these functions in front of each (POSIX sh).

# systemd reads the drop-ins again; logind reads the hibernation check's
# environment when it starts.
ksave_systemd_reload() {
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
    systemctl try-restart systemd-logind.service || true
  fi
}

# Every installed kernel's initramfs, not only the newest: an older kernel
# picked at boot must resume (or invalidate) an image too, and after a
# removal no initramfs may carry ksave. With the system's generator.
ksave_initramfs_rebuild() {
  if command -v update-initramfs >/dev/null 2>&1; then
    update-initramfs -u -k all
  elif command -v dracut >/dev/null 2>&1; then
    dracut --regenerate-all --force
  fi
}

# ksave.efi's boot entries (labelled ksave, as `ksave setup --uefi` makes
# them), its directory in the ESP, wherever an ESP is mounted, and its
# firmware variables.
ksave_uefi_forget() {
  if command -v efibootmgr >/dev/null 2>&1 && [ -d /sys/firmware/efi ]; then
    efibootmgr | sed -n 's/^Boot\([0-9A-Fa-f]\{4\}\)\*\{0,1\} ksave\([[:space:]].*\)\{0,1\}$/\1/p' | while read -r entry; do
      efibootmgr -q -b "$entry" -B || true
    done
  fi
  for esp in /boot/efi /efi; do
    rm -rf "$esp/EFI/ksave"
  done
  # ksave.efi's own variables (its last reason, the image it last took);
  # efivarfs makes them immutable.
  for var in /sys/firmware/efi/efivars/Ksave*-6b5f3a1e-8c1d-4e0f-9b7a-5d2c4e6f8a01; do
    [ -e "$var" ] || continue
    chattr -i "$var" 2>/dev/null || true
    rm -f "$var"
  done
}

# Removing ksave for good: its image file and its setup. An image file
# `ksave setup --file` made is ksave's data: immutable, so nothing else could
# remove it. Its map says so; on an encrypted volume the map lies under the
# encryption (the file reads as noise): then the setup's key block and the
# file's immutability do.
ksave_forget_store() {
  file=$(sed -n 's/^file=//p' /etc/ksave.conf 2>/dev/null || true)
  if [ -n "$file" ] && [ -f "$file" ]; then
    if [ "$(head -c 8 "$file")" = KSAVEMAP ] \
      || { grep -q '^key_volume=' /etc/ksave.conf && lsattr -d "$file" 2>/dev/null | cut -d' ' -f1 | grep -q i; }; then
      chattr -i "$file" 2>/dev/null || true
      rm -f "$file"
    fi
  fi
  rm -f /etc/ksave.conf
}
