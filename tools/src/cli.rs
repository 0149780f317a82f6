//! The command line: clap's types, nothing else.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ksave", version, about = "kexec-jump hibernation: save the running kernel's RAM with a tiny image, restore it later")]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Choose where images go: a partition, or a file on the root file
    /// system (recorded in /etc/ksave.conf or $KSAVE_CONF).
    Setup {
        /// The partition's device, e.g. /dev/sda2.
        #[arg(long, conflicts_with_all = ["partuuid", "file"], required_unless_present_any = ["partuuid", "file"])]
        partition: Option<PathBuf>,
        /// Or its PARTUUID (GPT unique partition GUID).
        #[arg(long, conflicts_with = "file")]
        partuuid: Option<String>,
        /// Or a file on an ext4, XFS or btrfs (one device, `single` data)
        /// file system (on a partition or an LVM linear volume), e.g. /var/lib/ksave/image: created if it does not
        /// exist, all of it written, made immutable.
        #[arg(long, conflicts_with = "claim")]
        file: Option<PathBuf>,
        /// With --file: its size, e.g. 2G or 1536M (default: half of RAM; a
        /// save that needs more is refused before it writes anything).
        #[arg(long, requires = "file")]
        size: Option<String>,
        /// Compress with LZ4 where it pays.
        #[arg(long)]
        lz4: bool,
        /// The ksave image to load.
        #[arg(long, default_value = "/usr/lib/ksave/ksave.elf")]
        elf: PathBuf,
        /// Record the partition even if the host's checks (size) fail. For
        /// testing ksave's own checks. (What else uses the partition is
        /// checked all the same.)
        #[arg(long)]
        no_precheck: bool,
        /// Make the partition ksave's store: set its partition type to
        /// ksave's (asks first). It must hold nothing and be used by nothing.
        #[arg(long)]
        claim: bool,
        /// With --claim: do not ask.
        #[arg(long, requires = "claim")]
        yes: bool,
        /// Take a store that is not encrypted although the root file system
        /// or a swap is (the image, all of RAM, would be plaintext there).
        #[arg(long)]
        allow_plaintext: bool,
        /// Also resume straight from the firmware: put ksave.efi into the
        /// EFI system partition with a boot entry first in BootOrder
        /// (efibootmgr). The initramfs stays the fallback.
        #[arg(long)]
        uefi: bool,
    },
    /// Load a configured ksave for a jump (and say how much memory it holds).
    Load {
        /// Load with kexec-tools instead of kexec_load(2).
        #[arg(long)]
        kexec_tools: bool,
    },
    /// Save the system: freeze, load, jump to ksave, check what it wrote.
    Hibernate {
        /// Power off after a complete image (the default).
        #[arg(long, conflicts_with = "snapshot")]
        poweroff: bool,
        /// Keep running after the image is written.
        #[arg(long)]
        snapshot: bool,
        /// hybrid-sleep: after a complete image, suspend to RAM instead of
        /// powering off. A wake-up invalidates the image (the system ran
        /// on); a power loss during the suspend leaves it for the next boot.
        #[arg(long, conflicts_with_all = ["snapshot", "poweroff", "suspend_first"])]
        then_suspend: bool,
        /// suspend-then-hibernate: first suspend to RAM with an alarm timer
        /// set to wake the machine after SECONDS; hibernate only when that
        /// alarm is what woke it (woken earlier: back to work, no image).
        #[arg(long, value_name = "SECONDS", conflicts_with = "snapshot")]
        suspend_first: Option<u64>,
        /// Load with kexec-tools instead of kexec_load(2).
        #[arg(long)]
        kexec_tools: bool,
        /// Save the pages the kernel holds free too (by default they are
        /// left out, where the kernel describes itself in vmcoreinfo).
        #[arg(long)]
        all_pages: bool,
        /// Sync, then drop the clean page cache before the jump: a smaller
        /// image, paid for by rereading files after the resume.
        #[arg(long)]
        drop_caches: bool,
        /// Skip the host's own checks of the partition (size, identity), so
        /// that ksave's checks decide. For testing ksave.
        #[arg(long)]
        no_precheck: bool,
        /// Save on this CPU alone (ksave otherwise starts the others,
        /// offline during the save, to share its LZ4 coding and sealing).
        #[arg(long)]
        one_cpu: bool,
        /// Tests only: ksave faults on purpose in the middle of the save.
        #[arg(long, hide = true)]
        selftest_fault_in_save: bool,
    },
    /// From a freshly booted kernel: if the partition holds a resumable
    /// image, hand the machine to ksave to restore it (does not return);
    /// else say why and exit 1, and the boot carries on.
    Resume {
        /// The image partition's PARTUUID (default: the one set up).
        #[arg(long)]
        partuuid: Option<String>,
        /// The ksave image to load (default: the one set up).
        #[arg(long)]
        elf: Option<PathBuf>,
        /// With --partuuid, no setup: the image is in a file whose first
        /// byte lies BYTES into the partition (`ksave setup --file` prints
        /// it as ksave.file=).
        #[arg(long, requires = "partuuid")]
        file_at: Option<u64>,
        /// With --file-at, a file on an encrypted volume: where its key
        /// block is, as DM-UUID:BYTES (`ksave status` prints it).
        #[arg(long, requires = "file_at")]
        key_at: Option<String>,
        /// When this boot does not resume the image, for whatever reason,
        /// invalidate it: the boot carries on and will change the file
        /// systems it saw (for the initramfs script). `ksave.noresume` or
        /// `noresume` on the kernel command line is such a reason.
        #[arg(long)]
        or_invalidate: bool,
    },
    /// Whether this machine can hibernate with ksave now: prints "yes", or
    /// why not and exits 1 (not set up, a kernel in lockdown or without
    /// CONFIG_KEXEC_JUMP, an initramfs without ksave). ksave's systemd
    /// generator lets logind offer hibernation only then.
    CanHibernate,
    /// Show the image header on the configured partition (or DEV|FILE).
    Status {
        /// A partition, disk or image file; default: the configured partition.
        path: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show an image's header, RAM ranges and chunks.
    Inspect {
        /// A partition, disk or image file.
        path: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Write the runs of pages left out as free to this file, one
        /// "FIRST_PFN PAGES" a line.
        #[arg(long, value_name = "FILE")]
        free_runs: Option<PathBuf>,
    },
    /// Check every checksum of an image; the exit code tells.
    Verify {
        /// A partition, disk or image file.
        path: PathBuf,
    },
    /// Mark an image as never to be restored (nothing to do when there is
    /// no image, or it is already invalid).
    Invalidate {
        /// A partition, disk or image file; default: the configured partition.
        #[arg(conflicts_with = "partuuid")]
        path: Option<PathBuf>,
        /// Or the partition's PARTUUID.
        #[arg(long)]
        partuuid: Option<String>,
        /// Why, recorded in the image's header.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Write an image's RAM as an ELF64 core file (PT_LOAD per RAM range at its physical address).
    Export {
        /// The core file to write (created 0600: it holds all of RAM).
        #[arg(long)]
        elf: PathBuf,
        /// Overwrite the core file if it exists.
        #[arg(long)]
        force: bool,
        /// A partition, disk or image file.
        path: PathBuf,
    },
    /// Show a ksave.elf's load range, footprint and the kexec arguments that load it.
    Image {
        /// Path to ksave.elf.
        elf: PathBuf,
        /// Print only the kexec range arguments, for scripts.
        #[arg(long)]
        kexec_args: bool,
    },
}
