//! End-to-end scenarios, by story. Each returns a [`Report`] of what it
//! measured, or an error with the console lines that led to it. ksave and
//! the CLI print their figures as `ksave-metric key=value` lines, which the
//! scenarios read ([`crate::Metrics`]); they never parse prose.

use std::fmt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ksave_format::PAGE;
use ksave_format::chunk;
use ksave_format::header::{DATA_OFFSET, Header, State};

use crate::disk::Bus;
use crate::{VmConfig, build_input};

mod bench;
mod boot;
mod debian;
mod disks;
mod encrypted;
mod filestore;
mod refusals;
mod resume;
mod roundtrip;
mod save;

pub use bench::{disk_bench, hibernate_bench, linux_dd, linux_hibernate_resume, linux_hibernate_resume_in, linux_hibernate_resume_on};
pub use boot::{exception_report, multiboot1_boot, multiboot2_grub_boot};
pub use debian::{Hibernator, debian_dracut_sleep_modes, debian_encrypted_root, debian_hibernate_resume, debian_hibernation_bench, debian_shell, debian_stale_and_damaged_images};
pub use disks::{disk_error, disk_self_test, disk_test_refuses_what_is_not_a_spare_store};
pub use encrypted::{encrypted_bench, encrypted_store_story, memtest_pages_on, seal_host_bench};
pub use filestore::{FileFs, file_bench, file_store_story, written_since_is_refused};
pub use refusals::{grub_no_image_boots_normally, restore_refusals};
pub use resume::{ResumeBy, efi_read_bench, hibernate_resume, hibernate_resume_bench, hibernate_resume_bench_on, hibernate_resume_on, hibernate_resume_once_on};
pub use roundtrip::kexec_round_trip;
pub use save::{Expect, hibernate_snapshot, hibernate_snapshot_on, hibernate_with_the_iommu_left_on};

/// What a scenario measured, for the demo, the test log and `make bench`.
#[derive(Debug, Default)]
pub struct Report {
    /// Scenario name.
    pub name: String,
    /// Measurements, in order.
    pub figures: Vec<Figure>,
}

/// One measurement.
#[derive(Clone, Debug)]
pub struct Figure {
    /// What was measured.
    pub what: String,
    /// Its value, in `unit`.
    pub value: f64,
    /// "ms", "KiB", "MiB".
    pub unit: &'static str,
}

impl Report {
    fn new(name: &str) -> Self {
        Self { name: name.into(), figures: Vec::new() }
    }

    fn add(&mut self, what: impl Into<String>, value: f64, unit: &'static str) {
        self.figures.push(Figure { what: what.into(), value, unit });
    }

    fn add_ms(&mut self, what: impl Into<String>, d: Duration) {
        self.add(what, d.as_secs_f64() * 1000.0, "ms");
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "== {}", self.name)?;
        for fig in &self.figures {
            writeln!(f, "   {:<44} {:>8.0} {}", fig.what, fig.value, fig.unit)?;
        }
        Ok(())
    }
}

pub(super) const SECOND: Duration = Duration::from_secs(1);

/// A test kernel; qemu/build-kernel.sh builds each from Debian's sources.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// 6.1 LTS: no GDT reload after a jump back.
    Linux6_1,
    /// 6.12: the kernel every other scenario runs.
    Linux6_12,
    /// 7.3: the control page's words in a data section (6.14 on).
    Linux7_3,
}

impl Kernel {
    fn file(self) -> &'static str {
        match self {
            Self::Linux6_1 => "bzImage-6.1",
            Self::Linux6_12 => "bzImage",
            Self::Linux7_3 => "bzImage-7.3",
        }
    }
}

/// The firmware a machine boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// QEMU's SeaBIOS.
    Bios,
    /// OVMF (Debian's `ovmf`), whose memory map has ACPI NVS ranges.
    Uefi,
}

/// OVMF's code, shared read-only, and the variable store each VM copies.
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// What a story's VMs are: kernel, CPU model, RAM, firmware, the disk's
/// bus. Every VM of a story (the one that saves and those that resume) is
/// the same machine.
#[derive(Clone, Copy, Debug)]
pub struct Machine {
    /// Kernel A (and C).
    pub kernel: Kernel,
    /// QEMU's `-cpu`.
    pub cpu: &'static str,
    /// RAM in MiB; above 3 GiB the machine is a q35, whose RAM above 2 GiB
    /// lands above 4 GiB.
    pub memory_mib: u32,
    /// What boots first.
    pub firmware: Firmware,
    /// Where the test disk is.
    pub bus: Bus,
    /// A VT-d IOMMU (QEMU's intel-iommu on a q35), which kernel A turns on
    /// (`intel_iommu=on`).
    pub iommu: bool,
    /// On UEFI: the firmware's variables are this machine's own, kept from
    /// one VM to the next under this name (boot entries made in one boot
    /// are there in the next); else each VM starts from OVMF's defaults.
    pub nvram: Option<&'static str>,
    /// CPUs (`-smp`): ksave's resume starts the others to share its load.
    pub cpus: u32,
}

impl Machine {
    /// QEMU's default CPU (4-level paging, no 1 GiB pages), 512 MiB.
    pub const fn qemu64(kernel: Kernel) -> Self {
        Self { kernel, cpu: "qemu64", memory_mib: 512, firmware: Firmware::Bios, bus: Bus::Ahci, iommu: false, nvram: None, cpus: 2 }
    }

    /// QEMU's default CPU with 5 GiB on a q35: RAM above 4 GiB and no
    /// 1 GiB pages to map it with.
    pub const fn qemu64_high_ram(kernel: Kernel) -> Self {
        Self { memory_mib: 5120, ..Self::qemu64(kernel) }
    }

    /// `-cpu max` (LA57: 5-level paging, 1 GiB pages) with 5 GiB on a q35.
    pub const fn la57(kernel: Kernel) -> Self {
        Self { cpu: "max", ..Self::qemu64_high_ram(kernel) }
    }

    /// This machine with its disk on `bus`.
    pub const fn on(self, bus: Bus) -> Self {
        Self { bus, ..self }
    }

    /// This machine with a VT-d IOMMU in use (on a q35).
    pub const fn with_iommu(self) -> Self {
        Self { iommu: true, ..self }
    }

    /// Kernel command line words this machine needs.
    pub fn kernel_args(&self) -> &'static str {
        if self.iommu { " intel_iommu=on ksave.iommu=1" } else { "" }
    }

    /// This machine booting OVMF instead of SeaBIOS.
    pub const fn uefi(self) -> Self {
        Self { firmware: Firmware::Uefi, ..self }
    }

    /// `config` on this machine.
    pub fn apply(&self, config: VmConfig) -> Result<VmConfig> {
        let config = VmConfig { cpus: self.cpus, ..config };
        let mut config = if self.memory_mib > 3072 || self.iommu || self.bus.needs_pcie() { config.arg(["-machine", "q35"]) } else { config };
        if self.iommu {
            // QEMU wants the IOMMU created before the PCI devices it covers.
            config.args.splice(0..0, ["-device".to_string(), "intel-iommu".into()]);
        }
        if self.firmware == Firmware::Uefi {
            // Each VM its own variable store, as each boot of a real machine
            // would find it: nothing of one VM's boot leaks into the next;
            // or the machine's own, kept.
            let vars = self.nvram_path(&config.name);
            std::fs::create_dir_all(vars.parent().unwrap())?;
            if self.nvram.is_none() || !vars.exists() {
                std::fs::copy(OVMF_VARS, &vars).with_context(|| format!("copying {OVMF_VARS} (run qemu/deps.sh)"))?;
            }
            config = config.arg([
                "-drive".to_string(),
                format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"),
                "-drive".into(),
                format!("if=pflash,format=raw,file={}", vars.display()),
            ]);
        }
        Ok(VmConfig { memory_mib: self.memory_mib, ..config.arg(["-cpu", self.cpu]) })
    }

    /// The OVMF variable store of a VM named `vm` on this machine.
    pub fn nvram_path(&self, vm: &str) -> std::path::PathBuf {
        crate::build_dir().join("disks").join(format!("{}-ovmf-vars.fd", self.nvram.unwrap_or(vm)))
    }

    /// The same CPU without LA57, if this one has it.
    pub fn cpu_without_la57(&self) -> Option<&'static str> {
        (self.cpu == "max").then_some("max,la57=off")
    }

    /// A partition that holds this machine's worst-case image, in MiB.
    pub fn partition_mib(&self) -> u64 {
        // Every page raw plus a header block per 500 pages (writer.rs).
        let mib = self.memory_mib as u64;
        mib + mib / 400 + 8
    }
}

/// Kernel A (6.12) with its initramfs, running `ksave.test=SCENARIO` (the
/// rest of `scenario` goes on the command line too).
pub(super) fn kernel_a(name: &str, scenario: &str) -> Result<VmConfig> {
    kernel_on(Kernel::Linux6_12, name, scenario)
}

/// [`kernel_a`] with another kernel.
pub(super) fn kernel_on(kernel: Kernel, name: &str, scenario: &str) -> Result<VmConfig> {
    Ok(VmConfig::new(name).arg([
        "-kernel".to_string(),
        build_input(kernel.file())?.display().to_string(),
        "-initrd".into(),
        build_input("initramfs.cpio.gz")?.display().to_string(),
        "-append".into(),
        // quiet: kernel info messages (link resets, ...) would otherwise land in
        // the middle of the lines the tests read.
        format!("console=ttyS0,115200 panic=-1 quiet ksave.test={scenario}"),
    ]))
}

/// A VM booting build/grub-resume.iso. CD first: SeaBIOS would otherwise try
/// the test disk, whose protective MBR has a boot signature but no code.
pub(super) fn grub_resume_menu(name: &str) -> Result<VmConfig> {
    Ok(VmConfig::new(name).arg(["-boot".to_string(), "d".into(), "-cdrom".into(), build_input("grub-resume.iso")?.display().to_string()]))
}

/// The byte offset of the complete image header on `disk` (a raw disk
/// image): the one a save left, found by its magic on a block boundary.
pub(super) fn complete_header(disk: &Path) -> Result<(u64, Header)> {
    let bytes = std::fs::read(disk)?;
    bytes
        .chunks_exact(PAGE)
        .enumerate()
        .find_map(|(i, b)| Header::decode(b.try_into().unwrap()).ok().filter(|h| h.state == State::Complete).map(|h| ((i * PAGE) as u64, h)))
        .context("no complete image header on the disk")
}

/// Flips a byte in the middle of the first chunk's payload: its header's
/// CRC still holds, only the chunk's payload hash (or a sealed image's tag)
/// can tell. The image's first extent must hold its first chunk (a file
/// store's does: its extents are whole MiB at least).
pub(super) fn damage_first_chunk(disk: &Path) -> Result<()> {
    let (at, _) = complete_header(disk)?;
    let file = std::fs::OpenOptions::new().read(true).write(true).open(disk)?;
    let chunk_at = at + DATA_OFFSET;
    let mut head = [0u8; PAGE];
    file.read_exact_at(&mut head, chunk_at)?;
    let len = chunk::announced_len(&head[..512]).map_err(anyhow::Error::msg)?;
    let decoded = chunk::decode(&head[..len]).map_err(anyhow::Error::msg)?;
    let payload = decoded.fields.payload_len as u64;
    if payload == 0 {
        bail!("the first chunk has no payload");
    }
    let byte_at = chunk_at + len as u64 + payload / 2;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, byte_at)?;
    file.write_all_at(&[byte[0] ^ 0x20], byte_at)?;
    Ok(())
}
