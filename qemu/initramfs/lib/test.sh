# shellcheck shell=sh
# Sourced by every scenario: the console voice the harness reads, and
# memtest's file protocol (qemu/src/bin/memtest.rs), in one place.
say() { echo "ksave-test: $*"; }

# memtest_start MIB: fill MIB MiB with seeded data and wait until it holds it.
memtest_start() {
  memtest fill --mib "$1" --seed 42 --manifest /tmp/manifest &
  memtest_pid=$!
  for _ in $(seq 600); do [ -e /tmp/memtest.ready ] && break; sleep 0.1; done
  [ -e /tmp/memtest.ready ] || { say "memtest never got ready"; exit 1; }
}

# memtest_check: memtest verifies its data now; a fresh answer or none,
# never an earlier round's. Leaves the answer in /tmp/memtest.result.
memtest_check() {
  rm -f /tmp/memtest.result
  touch /tmp/memtest.check
  for _ in $(seq 600); do [ -e /tmp/memtest.check ] || break; sleep 0.1; done
  [ -e /tmp/memtest.check ] && { say "memtest never answered"; exit 1; }
  grep -q "data intact" /tmp/memtest.result || { say "memtest data changed"; exit 1; }
}

memtest_stop() {
  touch /tmp/memtest.stop
}

# nvs_mark: writes a fresh word into the last page of the largest ACPI NVS
# range,
# firmware memory Linux's own hibernation saves and puts back (OVMF's
# largest is its early-boot RAM, idle once the OS runs). A resume that
# reads the word back proves the image carried NVS and ksave restored it:
# the resuming boot's firmware starts with its own contents there.
nvs_mark() {
  nvs_size=0
  for d in /sys/firmware/memmap/*; do
    [ "$(cat "$d/type")" = "ACPI Non-volatile Storage" ] || continue
    s=$(($(cat "$d/start"))) e=$(($(cat "$d/end")))
    # (e is inclusive; busybox devmem refuses a word that ends a page)
    [ $((e - s)) -gt "$nvs_size" ] && nvs_size=$((e - s)) nvs_addr=$((e + 1 - 4096))
  done
  [ "$nvs_size" -gt 0 ] || { say "no ACPI NVS range to mark"; exit 1; }
  nvs_word=$(($(od -An -N4 -tu4 /dev/urandom)))
  devmem "$nvs_addr" 32 "$nvs_word"
  [ $(($(devmem "$nvs_addr" 32))) = "$nvs_word" ] || { say "could not mark ACPI NVS at $nvs_addr"; exit 1; }
}

# nvs_check: the word nvs_mark wrote is there again.
nvs_check() {
  got=$(($(devmem "$nvs_addr" 32)))
  [ "$got" = "$nvs_word" ] || { say "ACPI NVS not restored: $got at $nvs_addr, $nvs_word was saved"; exit 1; }
  say "ACPI NVS restored (word $nvs_word at $nvs_addr)"
}

# test_partition N: the path of the test disk's partition N (1 holds the
# image, 2 is scratch) on whatever bus it is: sda, vda or nvme0n1. Waits for
# the kernel to have probed it.
test_partition() {
  for _ in $(seq 100); do
    for p in "/dev/sda$1" "/dev/vda$1" "/dev/nvme0n1p$1"; do
      [ -b "$p" ] && { echo "$p"; return 0; }
    done
    sleep 0.1
  done
  say "no partition $1 on the test disk"
  return 1
}

# lived_in: makes memory look used for a while: several processes fill most
# of the available memory with data and exit, so free pages hold old data.
# Leaves the churned MiB in $churned_mib.
lived_in() {
  memtest churn --percent "${KSAVE_CHURN_PERCENT:-70}" --procs 4 > /tmp/churn || { say "churn failed"; exit 1; }
  cat /tmp/churn
  churned_mib=$(sed 's/.*churned \([0-9]*\) MiB.*/\1/' /tmp/churn)
}

# prove_free_left_out: a snapshot of lived-in memory leaves out the free
# pages, and none of the pages in use: memtest's (a running process: all its
# present pages) and the kernel's code, data and bss. The frames in use are
# listed before the jump, when they are known to be in use.
prove_free_left_out() {
  lived_in
  memtest used --pid "$memtest_pid" > /tmp/used || { say "could not list the pages in use"; exit 1; }
  ksave hibernate --snapshot > /tmp/snapshot.log; rc=$?
  cat /tmp/snapshot.log
  [ $rc = 0 ] || { say "snapshot failed"; exit 1; }
  ksave inspect --free-runs /tmp/free "$(test_partition 1)" > /dev/null || { say "inspect failed"; exit 1; }
  memtest prove --used /tmp/used --free-runs /tmp/free || { say "a page in use was left out as free"; exit 1; }
  free=$(sed -n 's/.*pages_free=\([0-9]*\).*/\1/p' /tmp/snapshot.log)
  # Most of what was churned is free again, and must have been left out.
  [ "${free:-0}" -ge $((churned_mib * 256 / 2)) ] || { say "only ${free:-0} pages left out as free after churning $churned_mib MiB"; exit 1; }
  say "free pages proven: $free left out, none in use among them"
}

# fragment_free_space DIR BYTES: fills the file system at DIR (DIR/filler),
# then frees every other BYTES of it: its free space is holes of BYTES, and
# a file made next is in as many pieces. util-linux's fallocate is called by
# path: busybox's shell runs its own applet (which cannot punch) first.
fragment_free_space() {
  dd if=/dev/zero of="$1/filler" bs=1M 2>/dev/null
  pieces=$(($(stat -c %s "$1/filler") / $2))
  [ "$pieces" -gt 2 ] || { say "could not fill $1"; exit 1; }
  i=0
  while [ "$i" -lt "$pieces" ]; do
    /bin/fallocate -p -o $((i * $2)) -l "$2" "$1/filler" || { say "fallocate failed"; exit 1; }
    i=$((i + 2))
  done
  sync
}

# The test volumes' passphrase (qemu/src/scenarios/encrypted.rs types it
# too).
LUKS_PASSPHRASE=ksave-test-passphrase
export LUKS_PASSPHRASE

# luks_open DEV PASSPHRASE: unlocks DEV as /dev/mapper/root, in three
# tries as an initramfs gives them (a wrong passphrase fails all three).
luks_open() {
  export DM_DISABLE_UDEV=1
  mkdir -p /run/cryptsetup
  for try in 1 2 3; do
    printf %s "$2" | cryptsetup open --key-file - "$1" root && return 0
    say "unlock $try of 3 failed"
  done
  return 1
}
