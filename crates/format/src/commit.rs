//! The commit protocol of a save, as ksave runs it and the host tests
//! exercise it: header *writing* -> flush -> metadata -> chunks -> flush ->
//! header *complete* -> flush. A crash or error at any point leaves a
//! header that reads as not restorable; only the last write makes an image.
//! Pages go in ascending order; those the kernel holds free ([`FreePages`])
//! are listed rather than stored.

use crate::header::{self, Header, META_BYTES, META_OFFSET, State};
use crate::store::Claimed;
use crate::writer::{self, Memory, Sink, Totals, WriteError, Writer};
use crate::{BackupPair, PAGE, Range};

/// A [`Sink`] that can also make what it wrote durable.
pub trait Device: Sink {
    /// Returns once everything written so far is on stable storage.
    fn flush(&mut self) -> Result<(), Self::Error>;

    /// Told when the save reaches a [`Step`] (for progress reports).
    fn reached(&mut self, _step: Step) {}
}

/// Points of the protocol a [`Device`] is told about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The *writing* header is on disk: from here a failure leaves a record.
    HeaderWritten,
}

/// What one save attempt writes, and about whom.
pub struct Plan<'a> {
    /// The attempt's nonce (from the config).
    pub nonce: u64,
    /// When the host tool made the config.
    pub created_unix: u64,
    /// Compress with LZ4 where it pays.
    pub lz4: bool,
    /// Bytes of the partition.
    pub capacity: u64,
    /// The disk's logical block size (512 or 4096): every write is whole
    /// blocks ([`Header::align`]).
    pub align: u32,
    /// The RAM saved (page aligned, sorted).
    pub ram: &'a [Range],
    /// The ACPI NVS saved (page aligned, sorted, apart from `ram`).
    pub nvs: &'a [Range],
    /// ksave's own pages: inside `ram`, but not the caller's, so not saved.
    pub image: Range,
    /// Where the caller's displaced pages are.
    pub backup: &'a [BackupPair],
    /// The caller's re-entry address.
    pub reentry: u64,
    /// Host info for the header's message.
    pub info: &'a str,
    /// The saving CPU's vendor.
    pub cpu_vendor: [u8; 12],
    /// The GDT to load before going back into the saved kernel (base 0:
    /// none); see [`Header::return_gdt`].
    pub return_gdt: (u64, u16),
    /// The caller's CR4 bits its return path needs ([`header::CR4_NEEDED`]).
    pub cr4_needed: u64,
    /// The ACPI FACS hardware signature at save time, if known.
    pub facs_signature: Option<u32>,
    /// The caller's IOMMU was translating at the jump
    /// ([`header::FLAG_IOMMU_LEFT_ON`]).
    pub iommu_left_on: bool,
    /// How the [`FreePages`] given to [`save`] recognizes free pages
    /// ([`Header::free_rule`]; 0: it does not).
    pub free_rule: u32,
    /// The caller's mounted file systems as the host saw them
    /// ([`Header::filesystems`]).
    pub filesystems: &'a [header::FsSeen],
    /// The image is sealed ([`header::FLAG_SEALED`]): the writer's buffers
    /// carry the cipher.
    pub sealed: bool,
    /// The saved kernel relies on nothing in its free pages
    /// ([`header::FLAG_FREE_AS_FOUND`]).
    pub free_as_found: bool,
}

/// Which pages the saved kernel's allocator holds free: those are left out
/// of the image and read back as zeros. Only ever on proof.
pub trait FreePages {
    /// If RAM page `pfn` heads a block of pages the kernel holds free, how
    /// many pages the block spans. Asked in ascending page order.
    fn free_block(&mut self, pfn: u64) -> Option<u64>;
}

/// No page is known to be free: every non-zero page is saved.
pub struct NoneFree;

impl FreePages for NoneFree {
    fn free_block(&mut self, _pfn: u64) -> Option<u64> {
        None
    }
}

impl Plan<'_> {
    /// The page frames saved, in ascending order, each with whether it is
    /// RAM (else ACPI NVS): every RAM page but ksave's own, and every NVS
    /// page. Restore relies on the order.
    pub fn pages(&self) -> impl Iterator<Item = (u64, bool)> + '_ {
        let (mut ram, mut nvs) = (self.ram.iter().peekable(), self.nvs.iter().peekable());
        // Both lists are sorted and disjoint: merge them.
        let ranges = core::iter::from_fn(move || match (ram.peek(), nvs.peek()) {
            (Some(r), Some(n)) if n.start < r.start => nvs.next().map(|n| (*n, false)),
            (Some(_), _) => ram.next().map(|r| (*r, true)),
            (None, _) => nvs.next().map(|n| (*n, false)),
        });
        ranges.flat_map(|(r, is_ram)| r.pages().map(move |pfn| (pfn, is_ram))).filter(|(pfn, _)| !self.image.contains(pfn * PAGE as u64))
    }

    /// How many pages [`Self::pages`] yields.
    pub fn page_count(&self) -> u64 {
        self.pages().count() as u64
    }

    /// The largest image this plan can make, whatever the memory holds.
    pub fn worst_case_bytes(&self) -> u64 {
        writer::worst_case_bytes(self.page_count(), self.sealed)
    }

    /// What a save of this plan will write at most, counted before anything
    /// is written, as the save will walk the pages: those `free` holds free
    /// (listed as runs) and those all zero (left out) need no room. Err: a
    /// page `mem` cannot reach.
    pub fn needed(&self, mem: &impl Memory, free: &mut dyn FreePages) -> Result<Needed, u64> {
        let (mut stored, mut runs, mut free_pages, mut free_until, mut next_free) = (0u64, 0u64, 0u64, 0u64, None);
        for (pfn, is_ram) in self.pages() {
            if is_ram && pfn >= free_until {
                free_until = free.free_block(pfn).map_or(0, |n| pfn + n);
            }
            if is_ram && pfn < free_until {
                // A run goes on only from the page before (as add_free).
                if next_free != Some(pfn) {
                    runs += 1;
                }
                next_free = Some(pfn + 1);
                free_pages += 1;
            } else if !crate::is_zero_page(mem.page(pfn).ok_or(pfn)?) {
                stored += 1;
            }
        }
        Ok(Needed { stored, free_runs: runs, bytes: writer::bytes_at_most(stored, runs, free_pages, self.sealed) })
    }
}

/// What a save needs, counted before it writes ([`Plan::needed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Needed {
    /// Pages to store: neither free nor zero.
    pub stored: u64,
    /// Runs of free pages to list.
    pub free_runs: u64,
    /// The largest image they make.
    pub bytes: u64,
}

/// Working memory for [`save`].
pub struct Buffers<'b> {
    /// One header block.
    pub block: &'b mut [u8; PAGE],
    /// The metadata blocks, encoded before any chunk.
    pub meta: &'b mut [u8; META_BYTES],
    /// Scratch for a sealed image's metadata tag.
    pub scratch: &'b mut [u8; META_BYTES],
    /// The chunk encoder's buffers (its coder codes groups only if the plan
    /// says LZ4).
    pub writer: writer::Buffers<'b>,
}

/// Runs the whole protocol for `plan`, reading pages from `mem`, on the
/// store `claimed` proves ksave's; returns the committed header and the
/// writer's totals. `now_us` is a clock; the header records the time since
/// `started_us`.
#[allow(clippy::too_many_arguments)] // each is one thing the protocol needs
pub fn save<D: Device>(
    plan: &Plan,
    claimed: &Claimed,
    mem: &impl Memory,
    free: &mut dyn FreePages,
    dev: &mut D,
    bufs: Buffers,
    now_us: impl Fn() -> u64,
    started_us: u64,
) -> Result<(Header, Totals), WriteError<D::Error>> {
    let sink = WriteError::Sink;
    let mut h = Header::new(State::Writing, plan.nonce);
    h.created_unix = plan.created_unix;
    h.claim = claimed.claim();
    h.encode(bufs.block);
    dev.write_bytes(0, bufs.block).map_err(sink)?;
    dev.flush().map_err(sink)?;
    dev.reached(Step::HeaderWritten);

    assert_eq!(plan.sealed, bufs.writer.seal.is_some(), "a sealed plan is written with its cipher");
    let meta = &mut bufs.meta[..];
    meta.fill(0);
    let (meta_len, meta_crc) = header::encode_meta(header::MetaLists { ram: plan.ram, backup: plan.backup, nvs: plan.nvs }, meta);
    let align = plan.align as usize;
    let meta_bytes = meta_len.next_multiple_of(align).max(align);
    dev.write_bytes(META_OFFSET, &meta[..meta_bytes]).map_err(sink)?;
    // A sealed image's metadata stays plaintext, under a tag the header
    // carries.
    let meta_tag = match &bufs.writer.seal {
        Some((seal, _)) => seal.meta_tag(&bufs.meta[..meta_len], &mut bufs.scratch[..]),
        None => [0; crate::seal::TAG_LEN],
    };

    let seal = bufs.writer.seal.as_ref().map(|(seal, _)| *seal);
    let mut w = Writer::new(plan.nonce, plan.capacity, plan.align, plan.lz4, bufs.writer);
    let mut free_until = 0;
    for (pfn, is_ram) in plan.pages() {
        if is_ram && pfn >= free_until {
            free_until = free.free_block(pfn).map_or(0, |n| pfn + n);
        }
        if is_ram && pfn < free_until {
            w.add_free(pfn, dev)?;
        } else {
            w.add_page(pfn, mem, dev)?;
        }
    }
    let totals = w.finish(dev)?;
    dev.flush().map_err(sink)?;

    // The commit record, last.
    let mut h = Header::new(State::Complete, plan.nonce);
    h.created_unix = plan.created_unix;
    h.reentry = plan.reentry;
    h.image = plan.image;
    h.ram_ranges = plan.ram.len() as u32;
    h.backup_pairs = plan.backup.len() as u32;
    h.nvs_ranges = plan.nvs.len() as u32;
    h.align = plan.align;
    h.meta_crc = meta_crc;
    h.chunks = totals.chunks;
    h.data_bytes = totals.data_bytes;
    h.pages_stored = totals.pages_stored;
    h.pages_zero = totals.pages_zero;
    h.pages_free = totals.pages_free;
    h.free_rule = plan.free_rule;
    h.chunks_crc = totals.chunks_crc;
    h.flags = totals.flags | if plan.iommu_left_on { header::FLAG_IOMMU_LEFT_ON } else { 0 };
    // Only when free pages were left out (listed) does the flag mean anything.
    if plan.free_as_found && totals.pages_free > 0 {
        h.flags |= header::FLAG_FREE_AS_FOUND;
    }
    h.save_us = now_us() - started_us;
    h.cpu_vendor = plan.cpu_vendor;
    h.return_gdt = plan.return_gdt;
    h.cr4_needed = plan.cr4_needed & header::CR4_NEEDED;
    h.facs_signature = plan.facs_signature;
    h.set_message(plan.info);
    h.claim = claimed.claim();
    let n = plan.filesystems.len().min(header::MAX_FILESYSTEMS);
    h.filesystems[..n].copy_from_slice(&plan.filesystems[..n]);
    h.fs_count = n as u32;
    if let Some(seal) = seal {
        h.meta_tag = meta_tag;
        h.tagged_block(bufs.block);
        h.tag = seal.header_tag(bufs.block);
    }
    h.encode(bufs.block);
    dev.write_bytes(0, bufs.block).map_err(sink)?;
    dev.flush().map_err(sink)?;
    Ok((h, totals))
}

/// Writes a *failed* record (a header that can never be taken for an
/// image) saying why the attempt `nonce` did not save, on the store
/// `claimed` proves ksave's.
pub fn record_failure<D: Device>(dev: &mut D, claimed: &Claimed, nonce: u64, created_unix: u64, code: u32, why: &str, block: &mut [u8; PAGE]) -> Result<(), D::Error> {
    let mut h = Header::new(State::Failed, nonce);
    h.claim = claimed.claim();
    h.fail_code = code;
    h.created_unix = created_unix;
    h.set_message(why);
    h.encode(block);
    dev.write_bytes(0, block)?;
    dev.flush()
}
