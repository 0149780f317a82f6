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
