//! A save, in stages: the partition must be where the host saw it, every
//! RAM and NVS page must be reachable, and the backup map must be exactly
//! ksave's own pages; the first that fails says why ([`Failure`], with
//! `ksave_format::header::fail`'s code). Nothing is written until all have
//! passed: [`Stages::check`] runs them and returns [`Ready`], the only way
//! to [`Ready::write`], which checks that the store holds what this save
//! needs (counted first when it is smaller than the worst case) and writes
//! the image by the format's commit protocol ([`commit::save`]).
//!
//! Between the two the caller picks which free pages to leave out and
//! readies its store (progress against [`Ready::worst_case_bytes`]).

use core::fmt;

use bootinfo::kexec::{Coverage, WalkError};
use ksave_format::commit::{self, Device, FreePages, Plan};
use ksave_format::header::fail;
use ksave_format::store::{Claim, Claimed};
use ksave_format::writer::{Memory, Totals, WriteError};
use ksave_format::{PAGE, SECTOR};

use crate::Message;

/// Why a save did not happen, with the code for the status record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// `ksave_format::header::fail`'s code.
    pub code: u32,
    /// Why, for people.
    pub message: Message,
}

impl Failure {
    /// A failure with code `code` (one of `ksave_format::header::fail`).
    pub fn new(code: u32, why: fmt::Arguments) -> Self {
        Self { code, message: Message::format(why) }
    }
}

macro_rules! fail {
    ($code:expr, $($arg:tt)*) => { Failure::new($code, format_args!($($arg)*)) };
}

/// The partition as found by its GUID on the disk, in the disk's logical
/// blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FoundPartition {
    /// Its first block.
    pub first_lba: u64,
    /// Its length in blocks.
    pub blocks: u64,
    /// The disk's logical block size in bytes (512 or 4096).
    pub block_size: u32,
}

/// The partition as the host tool saw it when it set the save up, in
/// 512-byte sectors (sysfs counts those whatever the block size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostPartition {
    /// Its first sector.
    pub first_sector: u64,
    /// Its length in sectors.
    pub sectors: u64,
}

/// The partition found by GUID must be where the host saw it.
pub fn check_partition(found: &FoundPartition, host: &HostPartition) -> Result<(), Failure> {
    let per_block = found.block_size as u64 / SECTOR;
    let (first_lba, sectors) = (found.first_lba * per_block, found.blocks * per_block);
    if first_lba != host.first_sector || sectors != host.sectors {
        return Err(fail!(fail::PARTITION, "partition is LBA {first_lba}+{sectors} here but {}+{} to the host: refusing", host.first_sector, host.sectors));
    }
    Ok(())
}

/// The store must carry the claim `expected` (the config's) in its header
/// block `block`, and lie on the disk the claim names (`disk`, that disk's
/// GPT disk GUID): else nothing at all is written there, not even a
/// failure record.
pub fn check_claim(block: &[u8; ksave_format::PAGE], disk: [u8; 16], expected: &Claim) -> Result<Claimed, Failure> {
    Claimed::check(block, disk, expected).map_err(|e| fail!(fail::NOT_CLAIMED, "{e}: nothing written"))
}

/// Why the backup map the jump left cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// The list itself is broken.
    Walk(WalkError),
    /// It lists more pages than ksave keeps.
    TooLong {
        /// The most pages ksave keeps.
        limit: usize,
    },
}

/// What a save checks before it writes anything, and the plan it writes.
pub struct Stages<'a> {
    /// What the save writes. Its `free_rule` is set by [`Ready::write`].
    pub plan: Plan<'a>,
    /// The store is ksave's ([`check_claim`]).
    pub claimed: Claimed,
    /// The partition as found.
    pub found: FoundPartition,
    /// The partition as the host saw it.
    pub host: HostPartition,
    /// The end of the physical memory the save reaches (ksave's identity
    /// map): every RAM and NVS page must be below it.
    pub reach: u64,
    /// How the backup map covers ksave's own pages, or why it is unusable.
    pub backup: Result<Coverage, MapError>,
    /// When the save began (microseconds of the clock [`Ready::write`] is
    /// given): the header records the time since.
    pub started_us: u64,
}

impl<'a> Stages<'a> {
    /// Runs the stages in order; the first that fails says why. Nothing
    /// is written.
    #[inline(never)] // one copy, apart from the writing (ksave's footprint)
    pub fn check(self) -> Result<Ready<'a>, Failure> {
        check_partition(&self.found, &self.host)?;
        check_reachable(&self.plan, self.reach)?;
        require_exact(self.backup)?;
        let worst = self.plan.worst_case_bytes();
        Ok(Ready { plan: self.plan, claimed: self.claimed, worst, started_us: self.started_us })
    }
}

/// Every RAM and NVS page must be inside the reach.
fn check_reachable(plan: &Plan, reach: u64) -> Result<(), Failure> {
    match plan.ram.iter().chain(plan.nvs).find(|r| r.end > reach) {
        Some(r) => Err(fail!(fail::MEMORY, "memory {:#x}-{:#x} is beyond ksave's identity map ({} GiB)", r.start, r.end, reach >> 30)),
        None => Ok(()),
    }
}

/// The backup map must list exactly ksave's own pages, with their sources
/// in RAM: only then is every caller page either in place or in a source.
fn require_exact(backup: Result<Coverage, MapError>) -> Result<(), Failure> {
    match backup {
        Ok(cov) if cov.is_exact() => Ok(()),
        Ok(cov) => Err(fail!(
            fail::BACKUP_MAP,
            "backup map is not exactly ksave's pages ({} outside, {} twice, {} uncovered, {} sources inside): refusing",
            cov.outside,
            cov.duplicates,
            cov.uncovered,
            cov.sources_inside
        )),
        Err(MapError::Walk(e)) => Err(fail!(fail::BACKUP_MAP, "backup map rejected: {e:?}")),
        Err(MapError::TooLong { limit }) => Err(fail!(fail::BACKUP_MAP, "backup map lists more than {limit} pages: refusing")),
    }
}

/// A store smaller than the worst case must hold what this save needs,
/// counted before anything is written ([`Plan::needed`]: the pages neither
/// free nor zero); else the save is refused with the figures.
fn check_capacity(plan: &Plan, worst: u64, mem: &impl Memory, counting: &mut dyn FreePages) -> Result<(), Failure> {
    if worst <= plan.capacity {
        return Ok(());
    }
    let needed = plan.needed(mem, counting).map_err(|pfn| fail!(fail::MEMORY, "page {pfn:#x} unreachable"))?;
    if needed.bytes > plan.capacity {
        return Err(fail!(
            fail::TOO_SMALL,
            "this save needs {} MiB ({} pages in use and not zero, of {} MiB of RAM), the store holds {} MiB: nothing written",
            needed.bytes.div_ceil(1 << 20),
            needed.stored,
            (plan.page_count() * PAGE as u64) >> 20,
            plan.capacity >> 20
        ));
    }
    Ok(())
}

/// A save whose stages all passed: it may write.
pub struct Ready<'a> {
    plan: Plan<'a>,
    claimed: Claimed,
    worst: u64,
    started_us: u64,
}

/// What a successful save wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    /// The writer's totals.
    pub totals: Totals,
    /// Microseconds the save took, as its header records.
    pub us: u64,
}

impl Ready<'_> {
    /// The largest image the plan can make, in bytes (the store may be
    /// smaller: [`Ready::write`] then counts what this save needs first).
    pub fn worst_case_bytes(&self) -> u64 {
        self.worst
    }

    /// The plan the stages passed.
    pub fn plan(&self) -> &Plan<'_> {
        &self.plan
    }

    /// Writes the image to `store` by the format's commit protocol, reading
    /// pages from `mem` and leaving out those `free` holds free (which it
    /// recognizes by `free_rule`, [`Plan::free_rule`]; 0 for none). A store
    /// smaller than the worst case is first checked to hold what this save
    /// needs, counted with `counting` (a second walk of the same free
    /// pages): nothing is written if not. `clock` returns microseconds; the
    /// header records the time since [`Stages::started_us`].
    #[allow(clippy::too_many_arguments)] // each is one thing a save needs
    pub fn write<D>(
        self,
        store: &mut D,
        mem: &impl Memory,
        free: &mut dyn FreePages,
        counting: &mut dyn FreePages,
        free_rule: u32,
        bufs: commit::Buffers,
        clock: fn() -> u64,
    ) -> Result<Summary, Failure>
    where
        D: Device,
        D::Error: fmt::Display,
    {
        check_capacity(&self.plan, self.worst, mem, counting)?;
        let plan = Plan { free_rule, ..self.plan };
        let (header, totals) = commit::save(&plan, &self.claimed, mem, free, store, bufs, clock, self.started_us).map_err(|e| match e {
            WriteError::Sink(d) => fail!(fail::IO, "disk error: {d}"),
            WriteError::Unreachable(pfn) => fail!(fail::MEMORY, "page {pfn:#x} unreachable"),
            WriteError::Full => fail!(fail::TOO_SMALL, "partition full"),
            WriteError::Coder(why) => fail!(fail::EXCEPTION, "coding pages: {why}"),
        })?;
        Ok(Summary { totals, us: header.save_us })
    }
}
