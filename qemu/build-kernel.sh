#!/usr/bin/env bash
# Builds a KEXEC_JUMP test kernel from Debian's linux-source-SERIES and
# prints the bzImage path.
#   build-kernel.sh [SERIES]     SERIES: 6.1, 6.12 (default) or 7.3
# 6.1 and 6.12 come from the system's own suite (bookworm); 7.3 from the
# same mirror's trixie-backports, fetched into the cache without touching
# the system's apt sources. Cached outside the repo under $KSAVE_CACHE
# (default ~/.cache/ksave), keyed by a hash of the source package version,
# the config fragments and this script, so a clean clone reuses a build.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
series=${1:-6.12}
case $series in 6.1|6.12|7.3) ;; *) echo "build-kernel.sh: unknown series $series (6.1, 6.12, 7.3)" >&2; exit 2 ;; esac
cache_root=${KSAVE_CACHE:-${XDG_CACHE_HOME:-${HOME:-/var/tmp}/.cache}/ksave}
# Every kernel: kernel.config; this series also: kernel-SERIES.config.
fragments=("$here/kernel.config")
[ -f "$here/kernel-$series.config" ] && fragments+=("$here/kernel-$series.config")

# The source tarball and its package version.
if [ "$series" = 7.3 ]; then
  apt_dir=$cache_root/apt
  tarball=$apt_dir/x/usr/src/linux-source-7.3.tar.xz
  if [ ! -f "$tarball" ]; then
    # shared/KEXEC-JUMP.md: the same mirror's trixie-backports, apt state
    # kept in the cache so the system's sources stay as they are.
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/deb"
    mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    echo "deb $mirror trixie-backports main" > "$apt_dir/sources.list"
    apt_opts=(-o Dir::Etc::sourcelist="$apt_dir/sources.list" -o Dir::Etc::sourceparts=/dev/null -o Dir::State::Lists="$apt_dir/lists")
    apt-get "${apt_opts[@]}" update -q >&2
    (cd "$apt_dir/deb" && apt-get "${apt_opts[@]}" download linux-source-7.3 >&2)
    rm -rf "$apt_dir/x"
    debs=("$apt_dir"/deb/linux-source-7.3_*.deb)
    dpkg -x "${debs[-1]}" "$apt_dir/x"
  fi
  debs=("$apt_dir"/deb/linux-source-7.3_*.deb)
  src_version=$(basename "${debs[-1]}")
else
  tarball=/usr/src/linux-source-$series.tar.xz
  if [ ! -f "$tarball" ]; then
    "$here/deps.sh" >&2
    dpkg-query -W -f='${Status}' "linux-source-$series" 2>/dev/null | grep -q 'install ok installed' || {
      echo "build-kernel.sh: installing linux-source-$series" >&2
      SUDO=; [ "$(id -u)" -ne 0 ] && SUDO=sudo
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "linux-source-$series" >&2
    }
  fi
  src_version=$(dpkg-query -W -f='${Version}' "linux-source-$series")
fi
[ -f "$tarball" ] || { echo "build-kernel.sh: $tarball missing" >&2; exit 1; }

key=$( (echo "$series $src_version"; cat "${fragments[@]}" "$0") | sha256sum | cut -c1-16)
cache=$cache_root/kernel-$series-$key
image=$cache/bzImage
if [ -f "$image" ]; then echo "$image"; exit 0; fi

mkdir -p "$cache"
# One build per output folder at a time: objtool races otherwise.
exec 9>"$cache/.lock"
flock 9
if [ -f "$image" ]; then echo "$image"; exit 0; fi

echo "build-kernel.sh: building Linux $series ($src_version), kernel $key (about 5 minutes on 2 cores)" >&2
started=$(date +%s)
work=$cache/build
rm -rf "$work"; mkdir -p "$work"
trap 'rm -rf "$work"' EXIT  # a failed build leaves nothing half-made behind
tar -xJf "$tarball" -C "$work" --strip-components=1
options=$(cat "${fragments[@]}" | grep -v '^#' | grep -v '^$')
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
echo "build-kernel.sh: Linux $series built in $(( $(date +%s) - started )) s" >&2
echo "$image"
