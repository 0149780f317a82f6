#!/usr/bin/env bash
# Builds the KEXEC_JUMP test kernel from Debian's linux-source-6.12 and prints
# the bzImage path. Cached outside the repo under $KSAVE_CACHE (default
# ~/.cache/ksave), keyed by a hash of the source tarball's version, the config
# fragment and this script, so a clean clone reuses an earlier build.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tarball=/usr/src/linux-source-6.12.tar.xz
fragment=$here/kernel.config
[ -f "$tarball" ] || "$here/deps.sh" >&2
[ -f "$tarball" ] || { echo "build-kernel.sh: $tarball missing" >&2; exit 1; }

src_version=$(dpkg-query -W -f='${Version}' linux-source-6.12)
key=$( (echo "$src_version"; cat "$fragment" "$0") | sha256sum | cut -c1-16)
cache=${KSAVE_CACHE:-${XDG_CACHE_HOME:-${HOME:-/var/tmp}/.cache}/ksave}/kernel-$key
image=$cache/bzImage
if [ -f "$image" ]; then echo "$image"; exit 0; fi

mkdir -p "$cache"
# One build per output folder at a time: objtool races otherwise.
exec 9>"$cache/.lock"
flock 9
if [ -f "$image" ]; then echo "$image"; exit 0; fi

echo "build-kernel.sh: building kernel $key (about 7 minutes on 2 cores)" >&2
work=$cache/build
rm -rf "$work"; mkdir -p "$work"
trap 'rm -rf "$work"' EXIT  # a failed build leaves nothing half-made behind
tar -xJf "$tarball" -C "$work" --strip-components=1
options=$(grep -v '^#' "$fragment" | grep -v '^$')
enable() { local args=(); for o in $options; do args+=(-e "$o"); done; ./scripts/config "${args[@]}"; }
(
  cd "$work"
  make -s tinyconfig >&2
  enable; make -s olddefconfig >&2
  # On 6.12 the first olddefconfig pass drops some options (KEXEC_JUMP among
  # them) whose dependencies it only enables on that pass: enable them again.
  enable; make -s olddefconfig >&2
  missing=
  for o in $options; do grep -qx "CONFIG_$o=y" .config || missing="$missing $o"; done
  if [ -n "$missing" ]; then
    echo "build-kernel.sh: these options did not survive olddefconfig:$missing" >&2
    exit 1
  fi
  make -s -j"$(( $(nproc) + 1 ))" bzImage >&2
)
cp "$work/arch/x86/boot/bzImage" "$image.tmp"
cp "$work/.config" "$cache/config"
mv "$image.tmp" "$image"
echo "$image"
