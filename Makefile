# ksave. `make` builds the image and the CLI; `make qemu` runs the demo;
# `make test` runs every test (host units, then real kernels in QEMU).
SHELL := bash
CARGO ?= cargo
BUILD := build
ELF := $(BUILD)/ksave.elf
EFI := $(BUILD)/ksave.efi
CLI := $(BUILD)/ksave
# Test kernels: 6.12 (build/bzImage, every scenario), and 6.1 and 7.3 for the
# full story on each kernel generation (qemu/build-kernel.sh).
KERNELS := $(BUILD)/bzImage $(BUILD)/bzImage-6.1 $(BUILD)/bzImage-7.3
# The Debian test system: its root file system (debootstrap, cached like the
# kernels) and ksave's package, installed into a copy of it for each disk.
VM_INPUTS := $(ELF) $(KERNELS) $(BUILD)/initramfs.cpio.gz $(BUILD)/grub.iso $(BUILD)/grub-resume.iso $(BUILD)/ksave.deb $(BUILD)/ksave.rpm debian-root
# The test partition's GUID (qemu/src/disk.rs) for the resume menu.
TEST_PARTUUID := 9B3C2C1A-5E1F-4B4A-8C6F-2A1D3E4F5A6B

.PHONY: all size deps deb rpm debian-root vm-inputs qemu qemu-debian qemu-multiboot lint clippy test bench clean FORCE
.NOTPARALLEL:
all: $(ELF) $(EFI) $(CLI)

# cargo knows what is stale; make only copies the results where they belong.
$(ELF): FORCE
	$(CARGO) build --release -p ksave --bin ksave-image
	@mkdir -p $(BUILD)
	cp target/release/ksave-image $@

# The same image as a UEFI application (tools/src/efiimage.rs).
$(EFI): $(ELF) $(CLI)
	target/release/elf2efi $(ELF) $@

$(CLI): FORCE
	$(CARGO) build --release -p ksave-tools -p ksave-qemu
	@mkdir -p $(BUILD)
	cp target/release/ksave $@

size: $(ELF) $(CLI)
	$(CLI) image $(ELF)

deps:
	qemu/deps.sh

# Kernels are cached outside the repo by a hash of their inputs; the script
# prints the cached path (and builds it the first time, ~5 minutes each).
# One at a time (.NOTPARALLEL below): two builds would share 2 cores.
$(BUILD)/bzImage: FORCE | deps
	@mkdir -p $(BUILD)
	k=$$(qemu/build-kernel.sh 6.12) && cmp -s "$$k" $@ || cp "$$k" $@

$(BUILD)/bzImage-%: FORCE | deps
	@mkdir -p $(BUILD)
	k=$$(qemu/build-kernel.sh $*) && cmp -s "$$k" $@ || cp "$$k" $@

$(BUILD)/initramfs.cpio.gz: $(ELF) $(CLI) qemu/mkinitramfs.sh qemu/initramfs/init $(wildcard qemu/initramfs/scenarios/* qemu/initramfs/lib/*) | deps
	qemu/mkinitramfs.sh $@ $(ELF) $(CLI) target/release/memtest

$(BUILD)/grub.iso: $(ELF) qemu/mkgrubiso.sh | deps
	qemu/mkgrubiso.sh $@ $(ELF) ksave.demo

GRUB_RESUME := LINUX=$(BUILD)/bzImage INITRD=$(BUILD)/initramfs.cpio.gz EFI=$(EFI) \
	  LINUX_ARGS="console=ttyS0,115200 panic=-1 quiet ksave.test=normal-boot" \
	  qemu/mkgrubiso.sh
$(BUILD)/grub-resume.iso: $(ELF) $(EFI) $(BUILD)/bzImage $(BUILD)/initramfs.cpio.gz qemu/mkgrubiso.sh | deps
	$(GRUB_RESUME) $@ $(ELF) ksave.resume=$(TEST_PARTUUID)

# make bench: the same, ksave.efi reading 64 MiB through the firmware's
# Block I/O first, to say how fast.
$(BUILD)/grub-resume-measure.iso: $(ELF) $(EFI) $(BUILD)/bzImage $(BUILD)/initramfs.cpio.gz qemu/mkgrubiso.sh | deps
	$(GRUB_RESUME) $@ $(ELF) ksave.resume=$(TEST_PARTUUID) ksave.measure_read=64

# ksave's Debian package (dist/): the CLI, ksave.elf, the initramfs-tools
# hook and boot script, the systemd drop-ins.
deb: $(BUILD)/ksave.deb
$(BUILD)/ksave.deb: $(ELF) $(EFI) $(CLI) $(wildcard dist/* dist/*/* dist/*/*/*)
	dist/mkdeb.sh $@ $(CLI) $(ELF) $(EFI)

# The same files as an RPM (dist/mkrpm.sh, rpmbuild from Debian's rpm), for
# dracut systems: Fedora, RHEL, openSUSE.
rpm: $(BUILD)/ksave.rpm
$(BUILD)/ksave.rpm: $(ELF) $(EFI) $(CLI) $(wildcard dist/* dist/*/* dist/*/*/*) | deps
	dist/mkrpm.sh $@ $(CLI) $(ELF) $(EFI)

# Prints nothing; builds the root file systems the first time (about a
# minute each): Debian 12 with initramfs-tools, Debian 13 with dracut.
debian-root: | deps
	qemu/build-debian.sh bookworm >/dev/null
	qemu/build-debian.sh trixie >/dev/null

vm-inputs: $(VM_INPUTS)

qemu: vm-inputs
	target/release/ksave-qemu demo

# The Debian system with ksave installed, root's shell on this terminal:
# type `e2e setup` (ksave setup for its partition), then `systemctl
# hibernate`, and power it on again to watch it resume.
qemu-debian: vm-inputs
	target/release/ksave-qemu debian

qemu-multiboot: $(ELF) $(CLI)
	target/release/ksave-qemu multiboot

# Every shell script the project ships or runs: a shell shebang on its first
# line or, for a sourced file, a `# shellcheck shell=` directive there.
SHELL_SCRIPTS = $(shell find . \( -name target -o -name build -o -name .git \) -prune -o -type f \
  -exec awk 'FNR == 1 && /^(#!(\/usr)?\/bin\/(env |busybox )?(ba|da)?sh([ \t]|$$)|# shellcheck shell=)/ { print FILENAME } { nextfile }' {} + \
  | LC_ALL=C sort)

# Static checks: clippy (below), then shellcheck. -x: follow sourced
# files (the scenarios' test.sh).
lint: clippy | deps
	shellcheck -x $(SHELL_SCRIPTS)

# Host unit tests of every crate that runs on the host, and the QEMU
# end-to-end scenarios, in one cargo run (one VM at a time: 2 cores), then
# one total line.
test: lint vm-inputs
	set -o pipefail; $(CARGO) test --release --lib --bins --tests -- --test-threads=1 --nocapture 2>&1 | tee $(BUILD)/test.log
	@awk '/^test result:/ { p += $$4; f += $$6 } END { printf "%d passed, %d failed\n", p, f }' $(BUILD)/test.log

# Figures with numbers (KSAVE_BENCH_RUNS runs, default 3): footprint, the
# kexec round trip's timings, 256 MiB disk throughput next to Linux dd, the
# save rate, hibernate + resume next to Linux's own hibernation, and the
# Debian system's systemctl hibernate and resume next to Linux's to swap.
bench: vm-inputs $(BUILD)/grub-resume-measure.iso
	$(CLI) image $(ELF)
	target/release/ksave-qemu bench

# Clippy, every warning an error; the lints the workspace adds (every unsafe
# block says why it holds) are in Cargo.toml. Two runs: the bare-metal image
# alone, so that no std crate's features are unified into its dependencies,
# then every other crate with its tests and diskdrv's host fakes.
clippy:
	$(CARGO) clippy --release -p ksave --bin ksave-image -- -D warnings
	$(CARGO) clippy --release --workspace --exclude ksave --all-targets --all-features -- -D warnings

clean:
	$(CARGO) clean
	rm -rf $(BUILD)
