#!/usr/bin/env bash
# Stages the files ksave's packages install (the .deb: dist/mkdeb.sh, the
# RPM: dist/mkrpm.sh) into DIR, as they lie on the installed system, and
# prints the packages' version (the CLI's).
#   stage.sh DIR KSAVE_CLI KSAVE_ELF KSAVE_EFI
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
stage=$1 cli=$2 elf=$3 efi=$4
mkdir -p "$stage"
chmod 0755 "$stage"
install -D -s -m 0755 "$cli" "$stage/usr/sbin/ksave"
install -D -m 0644 "$elf" "$stage/usr/lib/ksave/ksave.elf"
# The same image for UEFI firmware: `ksave setup --uefi` puts it in the ESP
# with its boot entry (docs/UEFI.md); the removal takes both back.
install -D -m 0644 "$efi" "$stage/usr/lib/ksave/ksave.efi"
# systemd: the sleep services that hibernate run ksave (dist/systemd/sleep),
# and logind offers hibernation without swap where ksave can hibernate
# (dist/systemd/sleep-generator).
install -D -m 0755 "$here/systemd/sleep" "$stage/usr/lib/ksave/sleep"
for verb in hibernate hybrid-sleep suspend-then-hibernate; do
  dropin=$stage/usr/lib/systemd/system/systemd-$verb.service.d/ksave.conf
  mkdir -p "$(dirname "$dropin")"
  sed "s/@VERB@/$verb/g" "$here/systemd/sleep-service.conf" > "$dropin"
  chmod 0644 "$dropin"
done
install -D -m 0755 "$here/systemd/sleep-generator" "$stage/usr/lib/systemd/system-generators/ksave-sleep-generator"
# The initramfs: initramfs-tools (Debian, Ubuntu) or dracut (Fedora's
# family; Debian's dracut), whichever the system has.
install -D -m 0755 "$here/initramfs-tools/hook" "$stage/usr/share/initramfs-tools/hooks/ksave"
install -D -m 0755 "$here/initramfs-tools/local-premount" "$stage/usr/share/initramfs-tools/scripts/local-premount/ksave"
install -D -m 0755 "$here/initramfs-tools/local-bottom" "$stage/usr/share/initramfs-tools/scripts/local-bottom/ksave"
install -D -m 0755 "$here/dracut/90ksave/module-setup.sh" "$stage/usr/lib/dracut/modules.d/90ksave/module-setup.sh"
install -D -m 0644 "$here/dracut/90ksave/ksave-resume.service" "$stage/usr/lib/dracut/modules.d/90ksave/ksave-resume.service"
install -D -m 0644 "$here/../README.md" "$stage/usr/share/doc/ksave/README.md"
sed -n 's/^version = "\(.*\)"/\1/p' "$here/../tools/Cargo.toml" | head -n 1
