# Sourced by every scenario: the console voice the harness reads, and
# memtest's file protocol (qemu/src/bin/memtest.rs), in one place.
say() { echo "ksave-test: $*"; }

# memtest_start MIB: fill MIB MiB with seeded data and wait until it holds it.
memtest_start() {
  memtest fill --mib "$1" --seed 42 --manifest /tmp/manifest &
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
