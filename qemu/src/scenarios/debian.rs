//! A real distribution: Debian bookworm with systemd, ksave installed from
//! its package (dpkg -i), set up with `ksave setup`, hibernated with
//! `systemctl hibernate` and resumed by the initramfs. The harness types on
//! the serial console, where root is logged in; `e2e` (qemu/debian/e2e)
//! does the checks inside.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ksave_format::verdict::code;

use super::{Firmware, Kernel, Machine, Report, SECOND, damage_first_chunk};
use crate::disk::PART_GUID;
use crate::{Vm, VmConfig, build_dir, build_input, repo_root};

/// The root partition's unique GUID: `root=PARTUUID=...`.
pub const ROOT_GUID: &str = "3C0FFEE0-2B6A-4D5E-9A7B-1D2E3F405162";
/// The root file system's size (qemu/mkdebiandisk.sh) and where ksave's
/// partition starts, right after it.
const ROOT_MIB: u64 = 1024;
const KSAVE_FIRST_LBA: u64 = 2048 + ROOT_MIB * 2048;
/// The swap partition's unique GUID, on the disk of Linux's own hibernation.
const SWAP_GUID: &str = "5A5A0C0D-7E1F-4A2B-9C3D-4E5F60718293";
/// The encrypted root's LUKS2 UUID, which its crypttab names.
const LUKS_UUID: &str = "5eed0000-1111-4222-8333-444455556666";
/// The encrypted root's mapping, as its crypttab and fstab name it.
const CRYPT_ROOT: &str = "/dev/mapper/cryptroot";

/// What writes the image when the Debian system hibernates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hibernator {
    /// ksave's package, as installed: `systemctl hibernate` runs `ksave hibernate`.
    Ksave,
    /// The same with `--drop-caches` (KSAVE_HIBERNATE_OPTIONS in a drop-in).
    KsaveDroppingCaches,
    /// No ksave: Linux's own hibernation to a swap partition on the same
    /// disk, with Debian's defaults (LZO compression, image_size 2/5 of RAM).
    LinuxSwap,
}

/// Which Debian, and so which initramfs generator and package format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Suite {
    /// Debian 12: systemd 252, initramfs-tools, ksave's .deb.
    Bookworm,
    /// Debian 13: systemd 257, dracut (as Fedora's family), ksave's RPM.
    Trixie,
}

impl Suite {
    fn name(self) -> &'static str {
        match self {
            Self::Bookworm => "bookworm",
            Self::Trixie => "trixie",
        }
    }

    /// ksave's package for it, in build/.
    fn package(self) -> &'static str {
        match self {
            Self::Bookworm => "ksave.deb",
            Self::Trixie => "ksave.rpm",
        }
    }
}

/// A Debian test disk (build/disks/NAME.img) on the machine's disk bus.
struct DebianDisk {
    path: PathBuf,
    bus: crate::disk::Bus,
    /// The root file system's type: "ext4" or "btrfs".
    root_fs: &'static str,
}

impl DebianDisk {
    /// Builds the disk: root file system with the kernel and the tools
    /// `by` needs: ksave's package, or a swap partition (as large as RAM and
    /// a bit) set up for Linux's hibernation; ksave's partition either way.
    fn create(name: &str, machine: &Machine, by: Hibernator) -> Result<Self> {
        Self::create_on(name, machine, by, "ext4")
    }

    /// [`DebianDisk::create`] with the root on `root_fs` ("ext4", "btrfs").
    fn create_on(name: &str, machine: &Machine, by: Hibernator, root_fs: &'static str) -> Result<Self> {
        Self::make(name, machine, by, root_fs, None, Suite::Bookworm)
    }

    /// A disk with ksave's package whose root (ext4) lies on LUKS2, unlocked
    /// by the initramfs (cryptroot, crypttab) with
    /// [`super::encrypted::LUKS_PASSPHRASE`], and a plaintext /boot. The
    /// host has no device-mapper: a VM of kernel A encrypts the root file
    /// system mkdebiandisk.sh made (qemu/initramfs/scenarios/luks-root.sh).
    fn create_encrypted(name: &str, machine: &Machine, echo: bool) -> Result<Self> {
        let disk = Self::make(name, machine, Hibernator::Ksave, "ext4", Some(LUKS_UUID), Suite::Bookworm)?;
        let plaintext = PathBuf::from(format!("{}.root-ext4", disk.path.display()));
        let format = super::kernel_a(&format!("{name}-format"), &format!("luks-root ksave.phase=format ksave.luks_uuid={LUKS_UUID}"))?
            .arg(disk.bus.qemu_args(&disk.path, None))
            .arg(["-drive".to_string(), format!("file={},format=raw,if=virtio,readonly=on", plaintext.display())]);
        let mut vm = Vm::start(VmConfig { echo, ..machine.apply(format)? })?;
        vm.expect("ksave-test: root file system encrypted", 600 * SECOND)?;
        vm.expect("KSAVE-TEST-RESULT: PASS", 60 * SECOND)?;
        vm.expect_exit(0, 60 * SECOND)?;
        std::fs::remove_file(&plaintext)?;
        Ok(Self { root_fs: "ext4 on LUKS2", ..disk })
    }

    fn make(name: &str, machine: &Machine, by: Hibernator, root_fs: &'static str, luks: Option<&str>, suite: Suite) -> Result<Self> {
        let path = build_dir().join("disks").join(format!("{name}.img"));
        std::fs::create_dir_all(path.parent().unwrap())?;
        let (package, swap) = match by {
            Hibernator::LinuxSwap => ("none".into(), vec![(machine.memory_mib + 64).to_string(), SWAP_GUID.into()]),
            Hibernator::Ksave | Hibernator::KsaveDroppingCaches => (build_input(suite.package())?.display().to_string(), vec![]),
        };
        let memtest = repo_root().join("target/release/memtest");
        // A new machine: its firmware's variables start from OVMF's.
        if machine.nvram.is_some() {
            let _ = std::fs::remove_file(machine.nvram_path(name));
        }
        let status = Command::new(repo_root().join("qemu/mkdebiandisk.sh"))
            .arg(&path)
            .arg(build_input(machine.kernel.file())?)
            .arg(package)
            .arg(memtest)
            .args([ROOT_GUID, PART_GUID, &machine.partition_mib().to_string()])
            .args(swap)
            .env("KSAVE_STORE_TYPE", diskdrv::part::KSAVE_STORE_TYPE.to_string())
            .env("KSAVE_ROOT_FS", root_fs)
            .env("KSAVE_ROOT_LUKS", luks.unwrap_or(""))
            .env("KSAVE_SUITE", suite.name())
            // A UEFI machine has an EFI system partition (ksave.efi goes there).
            .env("KSAVE_ESP", if machine.firmware == Firmware::Uefi { "1" } else { "" })
            .stdout(std::process::Stdio::null())
            .status()
            .context("running qemu/mkdebiandisk.sh")?;
        ensure!(status.success(), "qemu/mkdebiandisk.sh failed ({status})");
        Ok(Self { path, bus: machine.bus, root_fs })
    }

    /// The encrypted root's own check, in a VM that unlocks it: `e2fsck -fn`.
    fn fsck_encrypted_root(&self, machine: &Machine, echo: bool) -> Result<()> {
        let name = self.path.file_stem().unwrap().to_string_lossy().to_string();
        let check = super::kernel_a(&format!("{name}-fsck"), "luks-root ksave.phase=check")?.arg(self.bus.qemu_args(&self.path, None));
        let mut vm = Vm::start(VmConfig { echo, ..machine.apply(check)? })?;
        vm.expect("ksave-test: root file system clean", 300 * SECOND)?;
        vm.expect("KSAVE-TEST-RESULT: PASS", 60 * SECOND)?;
        vm.expect_exit(0, 60 * SECOND)
    }

    /// The root file system's own check (a copy of partition 1): `e2fsck
    /// -fn`, or `btrfs check --readonly`.
    fn fsck_root(&self) -> Result<()> {
        let copy = self.path.with_extension("root.ext4");
        let status = Command::new("dd")
            .arg(format!("if={}", self.path.display()))
            .arg(format!("of={}", copy.display()))
            .args(["bs=1M", "skip=1", &format!("count={ROOT_MIB}"), "conv=sparse", "status=none"])
            .status()?;
        ensure!(status.success(), "copying the root partition failed");
        let out = match self.root_fs {
            "btrfs" => Command::new("btrfs").args(["check", "--readonly"]).arg(&copy).output().context("running btrfs check")?,
            _ => Command::new("e2fsck").arg("-fn").arg(&copy).output().context("running e2fsck")?,
        };
        let _ = std::fs::remove_file(&copy);
        ensure!(
            out.status.success(),
            "the root file system's check ({}): {}\n{}{}",
            self.root_fs,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// After a hibernate's power-off: an ext4 root was left as a freeze
    /// leaves it (the journal flushed, `needs_recovery` cleared:
    /// ext4_freeze, fs/ext4/super.c), so nothing the system did after the
    /// image reached it (tools/src/freeze.rs). A mounted ext4 that was not
    /// frozen has the flag set. Other roots: nothing to read (btrfs has no
    /// such flag; LUKS is sealed to the host).
    fn expect_root_frozen(&self) -> Result<()> {
        use std::os::unix::fs::FileExt;
        if self.root_fs != "ext4" {
            return Ok(());
        }
        // The superblock at byte 1024 of the root (at 1 MiB); its magic at
        // 0x38, s_feature_incompat at 0x60, INCOMPAT_RECOVER 0x4.
        let mut sb = [0u8; 0x64];
        std::fs::File::open(&self.path)?.read_exact_at(&mut sb, (1 << 20) + 1024)?;
        ensure!(sb[0x38..0x3a] == [0x53, 0xef], "no ext4 superblock at the root partition");
        let incompat = u32::from_le_bytes(sb[0x60..0x64].try_into()?);
        ensure!(incompat & 0x4 == 0, "the root file system was powered off mounted and not frozen (needs_recovery set): the system could write to it after the image");
        Ok(())
    }

    /// Flips a bit in the image's first chunk, past its header: the host's
    /// checks pass, ksave's checksum does not.
    fn damage_image(&self) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&self.path)?;
        let at = KSAVE_FIRST_LBA * 512 + ksave_format::header::DATA_OFFSET + 4096 + 100;
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, at)?;
        file.write_all_at(&[byte[0] ^ 0x08], at)?;
        Ok(file.sync_all()?)
    }
}

/// build/NAME.iso: GRUB booting the disk's kernel with `args`.
fn boot_iso(name: &str, args: &str) -> Result<PathBuf> {
    boot_iso_of(name, "6.12-ksave", args)
}

/// [`boot_iso`] of the installed kernel `version`.
fn boot_iso_of(name: &str, version: &str, args: &str) -> Result<PathBuf> {
    boot_iso_rooted(name, ROOT_GUID, version, args)
}

/// [`boot_iso_of`] with the root `root`: a PARTUUID, or a device (the
/// encrypted root's mapping, whose kernel lies on the plaintext /boot).
fn boot_iso_rooted(name: &str, root: &str, version: &str, args: &str) -> Result<PathBuf> {
    let iso = build_dir().join(format!("{name}.iso"));
    let status = Command::new(repo_root().join("qemu/mkdebianiso.sh"))
        .arg(&iso)
        .arg(root)
        .args(args.split_whitespace())
        .env("KSAVE_KERNEL_VERSION", version)
        .status()?;
    ensure!(status.success(), "qemu/mkdebianiso.sh failed ({status})");
    Ok(iso)
}

/// A VM booting `iso` (first: SeaBIOS would try the disk's protective
/// MBR) with `disk`.
fn booting(name: &str, disk: &DebianDisk, iso: &Path) -> VmConfig {
    VmConfig::new(name).arg(["-boot".to_string(), "d".into(), "-cdrom".into(), iso.display().to_string()]).arg(disk.bus.qemu_args(&disk.path, None))
}

/// Powers on `machine` from `iso` with `disk`. `reboot`: a reset restarts
/// the machine (a refused resume resets into a normal boot).
fn power_on(name: &str, machine: &Machine, disk: &DebianDisk, iso: &Path, reboot: bool, echo: bool) -> Result<Vm> {
    let config = booting(name, disk, iso);
    Vm::start(VmConfig { echo, reboot, ..machine.apply(config)? })
}

/// How a Debian story powers its machine on.
struct Boot<'a> {
    name: &'a str,
    machine: &'a Machine,
    disk: &'a DebianDisk,
    iso: &'a Path,
    echo: bool,
    /// The firmware starts ksave.efi from its boot entry, which resumes;
    /// else the initramfs does.
    by_firmware: bool,
}

/// The root shell on the serial console, and a count of commands typed.
struct Shell {
    vm: Vm,
    typed: u32,
}

impl Shell {
    /// Waits until root's shell answers on the console (autologin).
    /// `login`: a fresh boot, whose root login says so (root's .profile,
    /// qemu/mkdebiandisk.sh); nothing is typed before, or GRUB or the
    /// kernel's console would read it. Else a resumed system, whose shell
    /// is already there.
    fn attach(mut vm: Vm, login: bool, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        if login {
            vm.expect("e2e-console-ready", timeout)?;
        }
        // Typed before the shell reads, a line may be eaten by login: ask
        // again until it answers.
        loop {
            vm.send("echo shell-$((40+2))\n")?;
            match vm.expect("shell-42", SECOND) {
                Ok(_) => return Ok(Self { vm, typed: 0 }),
                Err(e) if Instant::now() >= deadline => return Err(e.context("the root shell never answered")),
                Err(_) => {}
            }
        }
    }

    /// Runs `command` in the shell; fails unless it exits 0.
    fn run(&mut self, command: &str, timeout: Duration) -> Result<()> {
        self.typed += 1;
        let n = self.typed;
        self.vm.send(&format!("{command}; echo e2e-rc-$?-{n}\n"))?;
        let deadline = Instant::now() + timeout;
        // What the e2e script said was wrong, for the error.
        let mut failure = String::new();
        loop {
            let line = self.vm.expect("e2e", deadline.saturating_duration_since(Instant::now())).with_context(|| format!("running {command:?}"))?;
            if let Some((_, why)) = line.text.split_once("e2e: FAIL: ") {
                failure = format!(": {}", why.trim_end());
            }
            let Some((_, rest)) = line.text.split_once("e2e-rc-") else { continue };
            // The console echoes the typed line ("$?"), then the answer.
            let Some((rc, tag)) = rest.trim_end().split_once('-') else { continue };
            if tag != n.to_string() || rc.is_empty() || !rc.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            if rc != "0" {
                return Err(self.vm.failure(&format!("{command:?} exited {rc}{failure}")));
            }
            return Ok(());
        }
    }

    /// `systemctl hibernate` until the machine is off, and how long that
    /// took; what `by` says it saved goes to `report` ("pages in the
    /// image", "image size"). ksave: it saves and returns (its own lines on
    /// the serial console), the tool powers off. (The tool powers off only
    /// for a complete image of this attempt, and the next boot resumes it
    /// or says why not.)
    fn hibernate(mut self, by: Hibernator, report: &mut Report) -> Result<Duration> {
        let start = Instant::now();
        // The console shows KERN_INFO from here: Linux reports its image at
        // that level. Both hibernators get the same console.
        self.vm.send("dmesg -n 7; systemctl hibernate\n")?;
        if by == Hibernator::LinuxSwap {
            super::bench::expect_linux_image(&mut self.vm, true, report)?;
        } else {
            // ksave's own lines, straight to the console.
            let saved = self.vm.expect_metrics("pages_stored", 300 * SECOND)?;
            report.add("pages in the image", saved.get("pages_stored")?, "pages");
            report.add("image size", saved.get("image_bytes")? / (1 << 20) as f64, "MiB");
            self.vm.expect("ksave: returning to caller", 60 * SECOND)?;
        }
        self.vm.expect_exit(0, 120 * SECOND)?;
        Ok(start.elapsed())
    }

    /// The e2e checks after a resume (`e2e check`): the data is intact,
    /// the ticks since the last check have no gap longer than the time
    /// since `away` (2 s more: the resumed kernel sets its clock from the
    /// RTC's whole seconds), the journal and systemd carried on.
    fn check(&mut self, away: Instant) -> Result<()> {
        let max_gap = away.elapsed().as_secs() + 2;
        self.run(&format!("e2e check {max_gap}"), 300 * SECOND)
    }

    /// One round of a Debian story: `systemctl hibernate`, power on (the
    /// passphrase typed at cryptroot's prompt, when there is one), the
    /// initramfs resumes; the e2e checks (memory, ticks, journal, systemd)
    /// and the image file's extents unchanged. Returns the resumed shell.
    fn round_trip(mut self, round: u32, boot: &Boot, passphrase: Option<&str>, report: &mut Report) -> Result<Self> {
        self.run(&format!("e2e mark before-{round}"), 30 * SECOND)?;
        let away = Instant::now();
        let took = self.hibernate(Hibernator::Ksave, report)?;
        report.add_ms(format!("hibernate {round}: systemctl hibernate to power-off"), took);
        boot.disk.expect_root_frozen()?;
        resume(&round.to_string(), boot, passphrase, away, report)
    }

    /// `systemctl VERB` (hybrid-sleep, suspend-then-hibernate) until the
    /// kernel suspends its console for S3, its last line before (the rest
    /// come after the wake-up, if there is one). hybrid-sleep saves first:
    /// ksave returns (its own line), then the suspend; the jump to ksave
    /// suspends the console too.
    fn sleep(&mut self, verb: &str) -> Result<()> {
        self.vm.send(&format!("dmesg -n 7; systemctl {verb}\n"))?;
        if verb == "hybrid-sleep" {
            self.vm.expect("ksave: returning to caller", 300 * SECOND).with_context(|| format!("systemctl {verb}: no save"))?;
        }
        self.vm.expect("printk: Suspending console", 300 * SECOND).with_context(|| format!("systemctl {verb}: no suspend"))?;
        Ok(())
    }

    /// `systemctl poweroff`, and QEMU exits.
    fn power_off(mut self) -> Result<()> {
        self.vm.send("systemctl poweroff\n")?;
        self.vm.expect_exit(0, 180 * SECOND)
    }
}

/// Powers the machine on after it hibernated at `away`: the initramfs
/// resumes (the passphrase typed first, when there is one); the e2e checks
/// (memory, ticks, journal, systemd) and the image file's extents
/// unchanged. Returns the resumed shell; `label` names the VM and figures.
fn resume(label: &str, boot: &Boot, passphrase: Option<&str>, away: Instant, report: &mut Report) -> Result<Shell> {
    let mut vm = power_on(&format!("{}-{label}", boot.name), boot.machine, boot.disk, boot.iso, false, boot.echo)?;
    if let Some(passphrase) = passphrase {
        unlock(&mut vm, passphrase)?;
    }
    if boot.by_firmware {
        vm.expect("started by the UEFI firmware, load options", 300 * SECOND)?;
        vm.refute_seen("ksave: resuming the image")?;
    } else {
        vm.expect("ksave: resuming the image", 300 * SECOND)?;
    }
    let jump = vm.expect("ksave: resume: jumping to the saved kernel", 120 * SECOND)?;
    if boot.by_firmware {
        // No kernel ran between the firmware and ksave.
        vm.refute_seen("Linux version")?;
    }
    let mut shell = Shell::attach(vm, false, 120 * SECOND)?;
    report.add_ms(format!("resume {label}: power-on to the jump into the saved kernel"), jump.at);
    report.add_ms(format!("resume {label}: power-on to the resumed shell answering"), shell.vm.elapsed());
    shell.check(away)?;
    shell.run("e2e extents", 60 * SECOND)?;
    Ok(shell)
}

/// The Debian story on `firmware`: install, `ksave setup`, a ticking
/// service and a process holding known data; `systemctl hibernate`, power
/// off, power on: resumed; everything carried on; twice; power off; the
/// root file system is clean. On BIOS the initramfs resumes. On UEFI,
/// `ksave setup --uefi` puts ksave.efi into the ESP with a boot entry
/// first (efibootmgr), and the firmware starts it and it resumes, with no
/// kernel before it. Then a damaged image: refused once loading found it
/// (invalidated, reset), and at the next start, with no image to resume,
/// ksave.efi starts the distribution's GRUB in the ESP, which boots
/// Debian, whose initramfs logs the reason; `dpkg --purge` takes the entry
/// and the ESP's file back.
pub fn debian_hibernate_resume(firmware: Firmware, echo: bool) -> Result<Report> {
    let uefi = firmware == Firmware::Uefi;
    let name = if uefi { "debian-uefi" } else { "debian-bios" };
    let machine = Machine { firmware, nvram: uefi.then_some(name), ..Machine::qemu64(Kernel::Linux6_12) };
    // No spare partition (issue 21): the image goes into a file on the
    // root, ext4 on UEFI (Debian's and Ubuntu's layout), btrfs on BIOS
    // (Fedora's; `make test` runs it in the dracut story, on Debian 13).
    // The partition store is the stale-image story's.
    let root_fs = if uefi { "ext4" } else { "btrfs" };
    let by = if uefi { "ksave.efi from its boot entry" } else { "the initramfs" };
    let mut report = Report::new(&format!("Debian with systemd: systemctl hibernate into an image file on its {root_fs} root, resume by {by}, twice ({firmware:?})"));
    let disk = DebianDisk::create_on(name, &machine, Hibernator::Ksave, root_fs)?;
    let iso = boot_iso(name, "")?;
    let mut shell = Shell::attach(power_on(name, &machine, &disk, &iso, false, echo)?, true, 600 * SECOND)?;
    report.add_ms("power-on to a root shell (first boot)", shell.vm.elapsed());
    let setup = Instant::now();
    shell.run(if uefi { "e2e setup-file --uefi" } else { "e2e setup-file" }, 600 * SECOND)?;
    report.add_ms("ksave setup (with update-initramfs)", setup.elapsed());
    shell.run("e2e start", 120 * SECOND)?;
    let boot = Boot { name, machine: &machine, disk: &disk, iso: &iso, echo, by_firmware: uefi };
    for round in 1..=2 {
        shell = shell.round_trip(round, &boot, None, &mut report)?;
        shell.run(&format!("e2e mark after-{round}"), 30 * SECOND)?;
    }
    if uefi {
        // A damaged image: ksave.efi's checks pass (its header and metadata
        // are sound), it leaves the firmware, and the load finds the first
        // chunk damaged: the image is invalidated with the reason and the
        // machine resets. The next start finds no image to resume, says why
        // while the firmware runs and starts the next loader, the
        // distribution's GRUB in the ESP (not the CD's); the initramfs logs
        // the reason.
        let took = shell.hibernate(Hibernator::Ksave, &mut report)?;
        report.add_ms("hibernate 3: systemctl hibernate to power-off", took);
        damage_first_chunk(&disk.path)?;
        let mut vm = power_on(&format!("{name}-damaged"), &machine, &disk, &iso, true, echo)?;
        vm.expect("started by the UEFI firmware, load options", 300 * SECOND)?;
        vm.expect_refusal(code::DAMAGED, 120 * SECOND)?;
        vm.expect("ksave: not resumed after leaving the firmware: resetting", 30 * SECOND)?;
        vm.expect("started by the UEFI firmware, load options", 300 * SECOND)?;
        vm.expect_refusal(code::ALREADY_RESUMED, 120 * SECOND)?;
        vm.expect("ksave: starting the next loader, \\EFI\\debian\\grubx64.efi", 30 * SECOND)?;
        vm.expect("Debian (ksave test system, GRUB in the ESP)", 60 * SECOND)?;
        vm.refute_seen("ksave: resume: jumping")?;
        shell = Shell::attach(vm, true, 600 * SECOND)?;
        report.add_ms("damaged image: power-on to a shell of the normal boot, through a reset, ksave.efi and the ESP's GRUB", shell.vm.elapsed());
        shell.run("journalctl -b -o cat | grep 'ksave.efi did not resume at this boot' | grep 'already resumed' | grep -q 'image damaged: chunk 0'", 60 * SECOND)?;
        shell.run("journalctl -b -o cat | grep 'nothing to resume' | grep -q 'image damaged: chunk 0'", 60 * SECOND)?;
    }
    // The purge takes the (immutable) image file back too, and ksave.efi.
    shell.run("e2e remove", 600 * SECOND)?;
    shell.power_off()?;
    disk.fsck_root()?;
    Ok(report)
}

/// Debian 13 (issue 23): systemd 257, its initramfs made by dracut (the
/// dracut of Fedora's family) with ksave's module, its root on btrfs, and
/// ksave installed from its RPM; the image in a file on the root. logind offers every sleep that hibernates with no swap at all.
/// `systemctl hibernate`, power off, resumed by ksave-resume.service in
/// dracut's systemd initrd, twice. suspend-then-hibernate: suspended, woken
/// by the RTC after HibernateDelaySec, hibernated by ksave, powered off,
/// resumed. hybrid-sleep: the power lost during the suspend, the image
/// resumed; then woken from the suspend normally, the image invalidated.
/// The stale-image guard: a boot with `ksave.noresume` invalidates the
/// image, changes a file, and the next boot does not resume. That boot is
/// in lockdown: ksave refuses to hibernate before loading anything, and
/// logind does not offer it (nor before the setup). `rpm -e` takes
/// everything back; the root is clean.
pub fn debian_dracut_sleep_modes(echo: bool) -> Result<Report> {
    /// suspend-then-hibernate's HibernateDelaySec, in seconds.
    const DELAY: u32 = 20;
    let machine = Machine::qemu64(Kernel::Linux6_12);
    let name = "debian-dracut";
    let mut report = Report::new("Debian 13, dracut, ksave's RPM: hibernate twice, suspend-then-hibernate, hybrid-sleep (power lost, then woken), ksave.noresume in lockdown");
    // Its root on btrfs, as Fedora lays it out (dracut's family).
    let disk = DebianDisk::make(name, &machine, Hibernator::Ksave, "btrfs", None, Suite::Trixie)?;
    let iso = boot_iso(name, "")?;
    // The boot that must not resume is in lockdown too, as under Secure
    // Boot: ksave must refuse to hibernate there, before loading anything.
    let noresume = boot_iso(&format!("{name}-noresume"), "ksave.noresume lockdown=integrity")?;
    let boot = Boot { name, machine: &machine, disk: &disk, iso: &iso, echo, by_firmware: false };
    let mut shell = Shell::attach(power_on(name, &machine, &disk, &iso, false, echo)?, true, 600 * SECOND)?;
    report.add_ms("power-on to a root shell (first boot)", shell.vm.elapsed());
    // Not set up yet: logind answers as without ksave (no swap: na).
    shell.run("e2e can-sleep na", 60 * SECOND)?;
    let setup = Instant::now();
    shell.run("e2e setup-file", 600 * SECOND)?;
    report.add_ms("ksave setup (with dracut --regenerate-all)", setup.elapsed());
    shell.run("e2e can-sleep yes", 60 * SECOND)?;
    shell.run("lsinitrd /boot/initrd.img-6.12-ksave | grep -q ksave-resume.service", 120 * SECOND)?;
    shell.run("e2e start", 120 * SECOND)?;
    for round in 1..=2 {
        shell = shell.round_trip(round, &boot, None, &mut report)?;
        shell.run(&format!("e2e mark after-{round}"), 30 * SECOND)?;
    }

    // suspend-then-hibernate: the RTC wakes the machine, ksave hibernates.
    shell.run(&format!("e2e hibernate-delay {DELAY}s"), 30 * SECOND)?;
    let away = Instant::now();
    shell.sleep("suspend-then-hibernate")?;
    shell.vm.expect("PM: suspend exit", (DELAY + 120) * SECOND).context("suspend-then-hibernate: never woken")?;
    let woken = away.elapsed();
    report.add_ms("suspend-then-hibernate: systemctl to the RTC's wake-up", woken);
    // The RTC counts whole seconds: its alarm may go off up to one early.
    ensure!(woken >= (DELAY - 1) * SECOND, "woken after {woken:?}, before HibernateDelaySec ({DELAY} s)");
    // ksave's own line (the tool's go to the kernel log while the system
    // is frozen; the journal has them, below).
    shell.vm.expect("ksave: returning to caller", 300 * SECOND)?;
    shell.vm.expect_exit(0, 120 * SECOND)?;
    report.add_ms("suspend-then-hibernate: systemctl to power-off", away.elapsed());
    let mut shell = resume("s2h", &boot, None, away, &mut report)?;
    shell.run("journalctl -b -u systemd-suspend-then-hibernate -o cat | grep 'ksave: woken by the alarm after'", 60 * SECOND)?;

    // hybrid-sleep, the power lost during the suspend: the image resumes.
    let away = Instant::now();
    // ksave saved and returned before the suspend; the tool suspends only
    // on a complete image of this attempt.
    shell.sleep("hybrid-sleep")?;
    shell.vm.refute_seen("ksave: hibernation FAILED")?;
    drop(shell); // the power goes
    let mut shell = resume("hybrid-power-lost", &boot, None, away, &mut report)?;

    // hybrid-sleep, woken normally (the RTC, as a key press would): the
    // system runs on, the image is invalidated.
    shell.run("echo 0 > /sys/class/rtc/rtc0/wakealarm && echo +15 > /sys/class/rtc/rtc0/wakealarm", 30 * SECOND)?;
    let away = Instant::now();
    shell.sleep("hybrid-sleep")?;
    shell.vm.expect("PM: suspend exit", 120 * SECOND).context("hybrid-sleep: never woken")?;
    shell.run(
        "for i in $(seq 60); do journalctl -b -u systemd-hybrid-sleep -o cat | grep -q 'ksave: woken from suspend; the image is invalidated' && break; sleep 1; done; \
         journalctl -b -u systemd-hybrid-sleep -o cat | grep -q 'ksave: woken from suspend; the image is invalidated'",
        120 * SECOND,
    )?;
    shell.check(away)?;

    // The stale-image guard: ksave.noresume invalidates, the next boot
    // does not resume what a changed root no longer matches.
    shell.hibernate(Hibernator::Ksave, &mut report)?;
    // (A live system writing a btrfs under the image is refused: the
    // e2e test an_image_on_btrfs_written_since_is_refused.)
    let mut shell = never_after_noresume(&boot, &noresume, &["e2e cannot-hibernate lockdown"])?;
    shell.run("e2e remove", 600 * SECOND)?;
    shell.power_off()?;
    disk.fsck_root()?;
    Ok(report)
}

/// The stale-image guard, the machine hibernated: a boot from
/// `noresume_iso` (`ksave.noresume` on its command line) invalidates the
/// image before the root is mounted, runs `during` and changes a file; the
/// next boot does not resume (the image was invalidated) and has the file.
/// Returns that boot's shell.
fn never_after_noresume(boot: &Boot, noresume_iso: &Path, during: &[&str]) -> Result<Shell> {
    let mut vm = power_on(&format!("{}-noresume", boot.name), boot.machine, boot.disk, noresume_iso, false, boot.echo)?;
    vm.expect("invalidated: not resumed by the boot that found it: ksave.noresume on the kernel command line", 300 * SECOND)?;
    let mut shell = Shell::attach(vm, true, 300 * SECOND)?;
    for command in during {
        shell.run(command, 120 * SECOND)?;
    }
    shell.run("echo changed > /root/after-noresume && sync", 30 * SECOND)?;
    shell.power_off()?;
    let mut vm = power_on(&format!("{}-after", boot.name), boot.machine, boot.disk, boot.iso, false, boot.echo)?;
    vm.expect_refusal(code::ALREADY_RESUMED, 300 * SECOND)?;
    let mut shell = Shell::attach(vm, true, 300 * SECOND)?;
    shell.vm.refute_seen("ksave: resuming the image")?;
    shell.run("test -f /root/after-noresume", 30 * SECOND)?;
    Ok(shell)
}

/// A live system (kernel A's initramfs) mounts the hibernated system's
/// root read-write, writes /root/written-by-a-live-system, and powers off.
fn a_live_system_writes_the_root(boot: &Boot) -> Result<()> {
    let live = super::kernel_a(&format!("{}-live", boot.name), &format!("live-mount ksave.root_partuuid={}", ROOT_GUID.to_lowercase()))?
        .arg(boot.disk.bus.qemu_args(&boot.disk.path, None));
    let mut vm = Vm::start(VmConfig { echo: boot.echo, ..boot.machine.apply(live)? })?;
    vm.expect("ksave-test: mounted the hibernated system's root", 180 * SECOND)?;
    vm.expect("KSAVE-TEST-RESULT: PASS", 60 * SECOND)?;
    vm.expect_exit(0, 60 * SECOND)
}

/// The boot after [`a_live_system_writes_the_root`]: the root's superblock
/// says it was mounted (ext4: the mount count; btrfs: the generation), so
/// the initramfs refuses the image and boots normally, with what the live
/// system wrote. Returns that boot's shell.
fn not_resumed_after_a_live_mount(boot: &Boot) -> Result<Shell> {
    let mut vm = power_on(&format!("{}-after-live", boot.name), boot.machine, boot.disk, boot.iso, false, boot.echo)?;
    vm.expect_refusal(code::FILESYSTEM_MOUNTED, 300 * SECOND).context("the boot after a live system mounted the root")?;
    let mut shell = Shell::attach(vm, true, 300 * SECOND)?;
    shell.vm.refute_seen("ksave: resuming the image")?;
    shell.run("test -f /root/written-by-a-live-system", 30 * SECOND)?;
    Ok(shell)
}

/// Types the passphrase at cryptroot's prompt, where the initramfs asks
/// for the encrypted root's.
fn unlock(vm: &mut Vm, passphrase: &str) -> Result<()> {
    vm.expect_prompt("Please unlock disk cryptroot", 300 * SECOND).context("cryptroot's prompt")?;
    vm.send(&format!("{passphrase}\n"))
}

/// The Debian story on an encrypted machine (issue 22): the root file
/// system on LUKS2, unlocked by the initramfs at cryptroot's prompt, where
/// the harness types. ksave refuses a plaintext store there and takes a
/// file on the root; `systemctl hibernate` writes a sealed image, and the
/// disk holds none of the test's memory in plaintext. Three wrong
/// passphrases: cryptroot gives up, ksave (local-premount, next in the
/// initramfs's order) refuses the sealed image and invalidates it; the
/// initramfs asks again, the right passphrase boots normally, and the key
/// block is destroyed then (local-bottom): nothing resumed, then or later.
/// Then `systemctl hibernate`, the right passphrase, resumed, twice, the
/// key block gone each time; the package goes; the root is clean.
pub fn debian_encrypted_root(echo: bool) -> Result<Report> {
    use super::encrypted::LUKS_PASSPHRASE;
    let machine = Machine::qemu64(Kernel::Linux6_12);
    let name = "debian-luks";
    let mut report = Report::new("Debian with its root on LUKS2: systemctl hibernate into a sealed image file, resumed by the initramfs after cryptroot's unlock, twice");
    let made = Instant::now();
    let disk = DebianDisk::create_encrypted(name, &machine, echo)?;
    report.add_ms("making the disk (root encrypted in a VM)", made.elapsed());
    let iso = boot_iso_rooted(name, CRYPT_ROOT, "6.12-ksave", "")?;
    let mut vm = power_on(name, &machine, &disk, &iso, false, echo)?;
    unlock(&mut vm, LUKS_PASSPHRASE)?;
    let mut shell = Shell::attach(vm, true, 600 * SECOND)?;
    report.add_ms("power-on to a root shell (first boot, unlocked)", shell.vm.elapsed());
    shell.run("e2e plaintext-refused", 120 * SECOND)?;
    shell.run("e2e setup-file", 600 * SECOND)?;
    shell.run("e2e sealed", 60 * SECOND)?;
    shell.run("e2e start", 120 * SECOND)?;

    // Wrong passphrases: nothing resumed, then or later.
    shell.hibernate(Hibernator::Ksave, &mut report)?;
    // memtest holds 64 MiB of seeded pages (qemu/debian/e2e start).
    let plaintext = super::encrypted::memtest_pages_on(&disk.path, 64 << 8)?;
    ensure!(plaintext == 0, "{plaintext} of memtest's pages lie on the disk in plaintext");
    let mut vm = power_on(&format!("{name}-wrong"), &machine, &disk, &iso, false, echo)?;
    for _ in 0..3 {
        unlock(&mut vm, "not-the-passphrase")?;
        vm.expect("cryptsetup failed, bad password", 120 * SECOND)?;
    }
    vm.expect("maximum number of tries exceeded", 60 * SECOND)?;
    vm.expect_refusal(code::SEALED, 120 * SECOND).context("the boot whose unlock failed")?;
    let invalidated = vm.expect("-> invalidated", 60 * SECOND)?;
    ensure!(invalidated.text.contains("image complete"), "not the complete image invalidated: {:?}", invalidated.text);
    unlock(&mut vm, LUKS_PASSPHRASE)?;
    vm.expect("ksave: the key block is destroyed", 300 * SECOND).context("the unlocked boot's local-bottom")?;
    let mut shell = Shell::attach(vm, true, 300 * SECOND)?;
    shell.vm.refute_seen("ksave: resuming the image")?;
    report.add_ms("three wrong passphrases, then the right one: power-on to a shell of the normal boot", shell.vm.elapsed());
    shell.run("e2e sealed", 60 * SECOND)?;
    shell.run("e2e start", 120 * SECOND)?;

    for round in 1..=2 {
        shell = shell.round_trip(round, &Boot { name, machine: &machine, disk: &disk, iso: &iso, echo, by_firmware: false }, Some(LUKS_PASSPHRASE), &mut report)?;
        shell.run("e2e sealed", 60 * SECOND)?;
        shell.run("e2e recorded-root", 60 * SECOND)?;
        shell.run(&format!("e2e mark after-{round}"), 30 * SECOND)?;
    }
    shell.run("e2e remove", 600 * SECOND)?;
    shell.power_off()?;
    disk.fsck_encrypted_root(&machine, echo)?;
    Ok(report)
}

/// `make bench`: the Debian system hibernated by `by`, `rounds` times,
/// holding what the e2e story holds (a ticking service, 64 MiB of known
/// data). Each round: `systemctl hibernate` to power-off, then power-on to
/// `systemctl is-system-running` answering `running`; then the e2e checks
/// (data intact, no gap longer than the time away).
/// On `firmware`; `by_firmware`: ksave set up with `--uefi`, so that the
/// firmware starts ksave.efi, which resumes (else the initramfs does).
pub fn debian_hibernation_bench(by: Hibernator, firmware: Firmware, by_firmware: bool, rounds: usize, echo: bool) -> Result<Report> {
    let name = match (firmware, by, by_firmware) {
        (Firmware::Bios, Hibernator::Ksave, _) => "bench-debian-ksave",
        (Firmware::Bios, Hibernator::KsaveDroppingCaches, _) => "bench-debian-ksavedroppingcaches",
        (Firmware::Bios, Hibernator::LinuxSwap, _) => "bench-debian-linuxswap",
        (Firmware::Uefi, Hibernator::LinuxSwap, _) => "bench-debian-uefi-linuxswap",
        (Firmware::Uefi, _, true) => "bench-debian-uefi-ksave-efi",
        (Firmware::Uefi, _, false) => "bench-debian-uefi-ksave",
    };
    let machine = Machine { firmware, nvram: (firmware == Firmware::Uefi).then_some(name), ..Machine::qemu64(Kernel::Linux6_12) };
    let mut report = Report::new(&format!("Debian with systemd, hibernated by {by:?} ({firmware:?}), {rounds} rounds"));
    let disk = DebianDisk::create(name, &machine, by)?;
    let iso = boot_iso(name, "")?;
    let mut shell = Shell::attach(power_on(name, &machine, &disk, &iso, false, echo)?, true, 600 * SECOND)?;
    match by {
        Hibernator::Ksave if by_firmware => shell.run("e2e setup --uefi", 600 * SECOND)?,
        Hibernator::Ksave => shell.run("e2e setup", 600 * SECOND)?,
        Hibernator::KsaveDroppingCaches => {
            shell.run("e2e setup", 600 * SECOND)?;
            shell.run("e2e hibernate-options --drop-caches", 60 * SECOND)?;
        }
        // fstab's swap is on and initramfs-tools has RESUME= (mkdebiandisk.sh).
        // update-initramfs, as a user runs it after setting RESUME=: both
        // systems then did the same set-up step (ksave setup runs it), and
        // carry the page cache it leaves.
        Hibernator::LinuxSwap => {
            shell.run("swapon --show | grep -q partition", 60 * SECOND)?;
            shell.run("update-initramfs -u", 600 * SECOND)?;
        }
    }
    shell.run("e2e start", 120 * SECOND)?;
    for round in 1..=rounds {
        let away = Instant::now();
        let took = shell.hibernate(by, &mut report)?;
        report.add_ms("hibernate: systemctl hibernate to power-off", took);
        let vm = power_on(&format!("{name}-{round}"), &machine, &disk, &iso, false, echo)?;
        shell = Shell::attach(vm, false, 300 * SECOND)?;
        shell.run("systemctl is-system-running --wait | grep -qx running", 120 * SECOND)?;
        report.add_ms("resume: power-on to systemctl is-system-running: running", shell.vm.elapsed());
        if by == Hibernator::KsaveDroppingCaches {
            shell.run("journalctl -b -u systemd-hibernate | grep -q 'page cache dropped'", 60 * SECOND)?;
        }
        shell.check(away)?;
    }
    shell.power_off()?;
    disk.fsck_root()?;
    Ok(report)
}

/// Images a boot must not resume. First, an older kernel installed before
/// setup: hibernate, boot it: its initramfs resumes the image too. Then:
/// hibernate, boot with `ksave.noresume`,
/// change a file, reboot: the image is not resumed (it was invalidated
/// before the root was mounted), the file is there, the root file system is
/// clean. Then a damaged image: ksave refuses it (console), the boot
/// carries on normally and says so in the journal; the image is invalid.
/// Then a live system (kernel A) mounts the root while the machine is
/// hibernated: the next boot refuses the image (the superblock's mount
/// count moved) and keeps what the live system wrote. Last, `dpkg --purge
/// ksave` takes back all it installed.
pub fn debian_stale_and_damaged_images(echo: bool) -> Result<Report> {
    /// The older kernel's version (the same image, installed again).
    const OLDER: &str = "6.12-older";
    let machine = Machine::qemu64(Kernel::Linux6_12);
    let name = "debian-stale";
    let mut report = Report::new("Debian: an older kernel resumes too, no resume after ksave.noresume, a damaged image refused");
    let disk = DebianDisk::create(name, &machine, Hibernator::Ksave)?;
    let iso = boot_iso(name, "")?;
    let noresume = boot_iso(&format!("{name}-noresume"), "ksave.noresume")?;
    let older = boot_iso_of(&format!("{name}-older"), OLDER, "")?;
    let mut shell = Shell::attach(power_on(name, &machine, &disk, &iso, false, echo)?, true, 600 * SECOND)?;
    // An older kernel, installed (with its initramfs) before ksave was set
    // up: setup rebuilds every kernel's initramfs, so a boot of the older
    // one resumes the image rather than mount the root under it.
    shell.run(&format!("e2e second-kernel {OLDER}"), 600 * SECOND)?;
    shell.run("e2e setup", 600 * SECOND)?;
    // This boot's id, in /run: a resume finds it there, a fresh boot neither.
    shell.run("cat /proc/sys/kernel/random/boot_id > /run/e2e-boot-id", 30 * SECOND)?;
    shell.hibernate(Hibernator::Ksave, &mut report)?;
    let mut vm = power_on(&format!("{name}-older"), &machine, &disk, &older, false, echo)?;
    vm.expect("ksave: resuming the image", 300 * SECOND).context("the older kernel's boot")?;
    vm.expect("ksave: resume: jumping to the saved kernel", 120 * SECOND)?;
    let mut shell = Shell::attach(vm, false, 120 * SECOND)?;
    shell.run("test \"$(cat /run/e2e-boot-id)\" = \"$(cat /proc/sys/kernel/random/boot_id)\"", 30 * SECOND)?;
    report.add_ms("hibernated, the older kernel booted: power-on to the resumed shell", shell.vm.elapsed());
    shell.hibernate(Hibernator::Ksave, &mut report)?;

    let boot = Boot { name, machine: &machine, disk: &disk, iso: &iso, echo, by_firmware: false };
    let shell = never_after_noresume(&boot, &noresume, &[])?;
    report.add_ms("the boot after ksave.noresume: power-on to a shell", shell.vm.elapsed());
    shell.hibernate(Hibernator::Ksave, &mut report)?;
    disk.damage_image()?;

    let mut vm = power_on(&format!("{name}-damaged"), &machine, &disk, &iso, true, echo)?;
    vm.expect("ksave: resuming the image", 300 * SECOND)?;
    vm.expect_refusal(code::DAMAGED, 120 * SECOND)?;
    vm.expect_refusal(code::ALREADY_RESUMED, 300 * SECOND).context("the boot after the refusal")?;
    let mut shell = Shell::attach(vm, true, 300 * SECOND)?;
    report.add_ms("damaged image: power-on to a shell of the normal boot", shell.vm.elapsed());
    shell.run("journalctl -b -k | grep 'nothing to resume' | grep -q 'image damaged'", 60 * SECOND)?;
    shell.run("systemctl is-system-running --wait", 120 * SECOND)?;

    // A live system mounts the root while the machine is hibernated: its
    // superblock says so (mount count, last mount time), and the next boot
    // refuses the image, keeps what the live system wrote, and is clean.
    shell.hibernate(Hibernator::Ksave, &mut report)?;
    a_live_system_writes_the_root(&boot)?;
    // A bootloader start has no host tool to compare the root: ksave reads
    // its superblock itself, refuses and keeps the image.
    let multiboot = VmConfig::new(&format!("{name}-multiboot-after-live"))
        .arg(["-kernel".to_string(), build_input("ksave.elf")?.display().to_string(), "-append".into(), format!("ksave.resume={PART_GUID}")])
        .arg(disk.bus.qemu_args(&disk.path, None));
    let mut vm = Vm::start(VmConfig { echo, ..machine.apply(multiboot)? })?;
    vm.expect_refusal(code::FILESYSTEM_MOUNTED, 300 * SECOND).context("a bootloader start after a live system mounted the root")?;
    vm.refute_seen("image invalidated")?;
    // ksave.elf alone names no way back to a normal boot: it stops.
    vm.expect_exit(39, 60 * SECOND)?;
    let shell = not_resumed_after_a_live_mount(&boot)?;
    report.add_ms("after a live system mounted the root: power-on to a shell of the normal boot", shell.vm.elapsed());
    // The package's removal is the UEFI, LUKS and dracut stories' (here it
    // would rebuild two kernels' initramfs for the suite's time alone).
    shell.power_off()?;
    disk.fsck_root()?;
    Ok(report)
}

/// `make qemu-debian`: the Debian system with ksave installed, root's shell
/// on this terminal. Powered off (by `systemctl hibernate` too), it can be
/// powered on again, from the same disk, to watch the resume.
pub fn debian_shell() -> Result<()> {
    use std::io::BufRead;
    let machine = Machine::qemu64(Kernel::Linux6_12);
    let name = "debian-demo";
    println!("qemu-debian: making the disk (Debian bookworm, the test kernel, ksave's package)...");
    let disk = DebianDisk::create(name, &machine, Hibernator::Ksave)?;
    let iso = boot_iso(name, "")?;
    println!(
        "qemu-debian: root logs in on the console. Type `e2e setup` (ksave setup --partuuid {PART_GUID}), then `systemctl hibernate`.\n\
         qemu-debian: Ctrl-A X quits QEMU."
    );
    loop {
        let config = machine.apply(booting(name, &disk, &iso))?;
        let status = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-display", "none", "-serial", "mon:stdio", "-no-reboot"])
            .args(["-m", &config.memory_mib.to_string(), "-smp", &config.cpus.to_string()])
            .args(&config.args)
            .status()
            .context("starting qemu-system-x86_64")?;
        println!("\nqemu-debian: QEMU exited ({status}). Power on again from the same disk? [Y/n]");
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if answer.trim().eq_ignore_ascii_case("n") {
            return Ok(());
        }
    }
}
