//! Resuming an image: the checks, the load and the invalidation, in the
//! order docs/RESUME.md gives them.
//!
//! Nothing outside the resumer's own range is written until the image's
//! header and metadata have passed the one verdict ([`verdict::resumable`]:
//! the state, the resumer's own range, the CPU, the hardware signature, the
//! RAM and ACPI NVS maps, the reach). Then, in one pass, each chunk's pages
//! are loaded as the chunk is checked (raw pages by DMA straight into
//! place, coded pages decoded and copied) and every page of this machine's
//! RAM and NVS the image does not store is zeroed, but for the saved
//! kernel's free pages where it relies on nothing in them ([`Loader`]).
//! This boot's memory is
//! given up from there: a refusal after loading began invalidates the
//! image (it is damaged) and leaves only a reset ([`Refused::memory_lost`]).
//! When every chunk has passed, the image is invalidated on the store, so
//! that it is never resumed twice, and only then is the way back into the
//! saved kernel handed out ([`Resumed::way_back`]).
//!
//! The machine is reached through traits: the store ([`Source`] to read,
//! [`Device`] to invalidate, [`DmaSource`] to read raw pages into place),
//! physical memory ([`PhysMemory`]) and a clock.

use core::fmt;

use ksave_format::chunk::{LZ4_GROUP, LZ4_OUT, MAX_RAW_PAGES, SealedChunk};
use ksave_format::seal::{Seal, TAG_LEN};
use ksave_format::commit::Device;
use ksave_format::header::{DATA_OFFSET, FLAG_FREE_AS_FOUND, Header, META_BLOCKS, Meta, State};
use ksave_format::reader::{self, ChunkAt, CodedChunkAt, ReadError, Source};
use ksave_format::verdict::{self, Here, Refusal, Resumer};
use ksave_format::{PAGE, PayloadHasher, Range};

use crate::Message;
use crate::helpers::{self, Failure, Job, Queue, SharedMemory};

/// The CR4 bit of 5-level paging, as the image records the saved kernel's.
const CR4_LA57: u64 = bootinfo::kexec::CR4_LA57;

/// Physical memory, written and read by physical address. Writing it can
/// overwrite anything, the resumer's own code included, so the methods
/// that write (and the read, which could touch a device's registers) are
/// `unsafe` to call.
pub trait PhysMemory {
    /// Zeroes the `len` bytes of physical memory at `addr`.
    ///
    /// # Safety
    /// `[addr, addr + len)` must be memory of this machine (RAM or ACPI
    /// NVS) that the implementation reaches, that nothing live uses (no
    /// code, data, stack or DMA buffer of the caller, no memory a device
    /// may still write), and that the caller may overwrite.
    unsafe fn zero(&mut self, addr: u64, len: u64);

    /// Copies `data` to the physical memory at `addr`.
    ///
    /// # Safety
    /// As for [`Self::zero`], for `[addr, addr + data.len())`.
    unsafe fn write(&mut self, addr: u64, data: &[u8]);

    /// Copies the physical memory at `addr` into `buf`.
    ///
    /// # Safety
    /// `[addr, addr + buf.len())` must be RAM or ACPI NVS of this machine
    /// that the implementation reaches (a read of it has no effects).
    unsafe fn read(&self, addr: u64, buf: &mut [u8]);
}

/// An image store whose device can read pages of the image straight into
/// physical memory (DMA): the zero-copy path for raw chunks.
pub trait DmaSource: Source {
    /// Reads `pfns.len()` pages from byte `offset` of the image into the
    /// physical pages `pfns`, in that order.
    ///
    /// # Safety
    /// Every page in `pfns` must be memory the device may overwrite for the
    /// whole call: RAM or ACPI NVS of this machine that nothing live uses
    /// (as for [`PhysMemory::zero`]).
    unsafe fn read_into_pages(&mut self, offset: u64, pfns: &[u64]) -> Result<(), Self::Error>;
}

/// This machine, as an image must find it to be resumed here.
#[derive(Clone, Copy, Debug)]
pub struct Machine<'a> {
    /// This boot's RAM, page aligned and sorted (as the saving host took it).
    pub ram: &'a [Range],
    /// This boot's ACPI NVS, likewise.
    pub nvs: &'a [Range],
    /// CPUID leaf 0's vendor ([`ksave_format::cpu_vendor`]).
    pub cpu_vendor: [u8; 12],
    /// The CPU can run 5-level paging (CPUID.7.0:ECX.LA57).
    pub la57: bool,
    /// The ACPI FACS hardware signature now, or why it cannot be read.
    pub facs_signature: Result<u32, &'a str>,
    /// The resumer's own load range: never written, never zeroed, and the
    /// range an image must have been saved by.
    pub own: Range,
    /// The end of the physical memory [`PhysMemory`] reaches: memory
    /// beyond it refuses the image.
    pub reach: u64,
}

impl Machine<'_> {
    /// Every range an image fills: the RAM, then the ACPI NVS.
    pub fn ranges(&self) -> impl Iterator<Item = &Range> {
        self.ram.iter().chain(self.nvs)
    }
}

/// Working memory for [`check_and_load`].
pub struct Buffers<'b> {
    /// One header block (read, then rewritten to invalidate).
    pub block: &'b mut [u8; PAGE],
    /// A chunk header.
    pub chunk_header: &'b mut [u8; PAGE],
    /// A coded chunk, as read.
    pub coded: &'b mut [u8; LZ4_OUT],
    /// The metadata blocks first; then a group of decoded pages, or raw
    /// pages being checked.
    pub pages: &'b mut [u8; LZ4_GROUP * PAGE],
    /// The store is encrypted: the image's cipher (its data key, from the
    /// unlocked volume), and a sealed raw chunk being opened.
    pub seal: Option<(&'b Seal, &'b mut SealedChunk)>,
    /// Coded chunks read ahead, many at a time ([`ReadAhead`]); memory the
    /// store's device can write (DMA).
    pub read_ahead: &'b mut [u8; READ_AHEAD],
}

/// Bytes of image a coded chunk's read fetches ahead.
pub const READ_AHEAD: usize = 128 << 10;

const _: () = assert!(META_BLOCKS as usize * PAGE <= LZ4_GROUP * PAGE);

/// The machine's other CPUs, to check, decode and zero on while this one
/// reads the image ([`helpers`](crate::helpers)). Started only once the
/// verdict has passed: starting them writes memory outside the resumer's
/// own range (a start-up page).
pub trait Helpers {
    /// Starts them, or returns `None` to load on this CPU alone (with the
    /// reason the implementation reports itself).
    ///
    /// # Safety
    /// Called once the verdict has given this machine's memory up
    /// ([`check_and_load`]'s contract): the implementation may overwrite
    /// any page of `machine`'s RAM outside its own range.
    unsafe fn start(&mut self, machine: &Machine) -> Option<Started<'_>>;
}

/// Helpers at work.
pub struct Started<'h> {
    /// The queue they serve.
    pub queue: &'h Queue,
    /// The memory they reach it through.
    pub mem: &'h dyn SharedMemory,
    /// `(page, stand-in)`: a page of the machine's RAM their start ran
    /// from, which a CPU slow to start could still run, and a page of the
    /// implementation's own that the load fills instead (both pfns). The
    /// implementation copies the stand-in into place once every other CPU
    /// is parked.
    pub held: Option<(u64, u64)>,
}

/// What to do with an image refused before loading began. One refused
/// after it began is always invalidated: this boot's memory is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenRefused {
    /// Leave it as it is: nothing is written (a later boot may try again).
    KeepImage,
    /// Mark it invalidated, with the reason, so that no later boot tries it
    /// again (the kexec way in: the kernel that handed over is gone).
    Invalidate,
}

/// Why the image is not resumed: the verdict's reason, what the resumer
/// knows more (a store's error, why the hardware signature is unknown), and
/// whether this boot's memory was given up (loading had begun: the image
/// is invalidated, and only a reset is left). Nothing outside the
/// resumer's own range was written unless `memory_lost`.
#[derive(Clone, Debug)]
pub struct Refused {
    /// The reason, with its stable code.
    pub refusal: Refusal,
    /// More about it, if there is more to say.
    pub detail: Option<Message>,
    /// This boot's memory was given up: only a reset is left.
    pub memory_lost: bool,
    /// Whether the image was marked invalidated for this refusal: `None`
    /// if that was not tried, else done or why it could not be.
    pub invalidated: Option<Result<(), Message>>,
}

impl Refused {
    /// A refusal with nothing more to say.
    pub fn new(refusal: Refusal) -> Self {
        Self { refusal, detail: None, memory_lost: false, invalidated: None }
    }

    /// A refusal with more to say.
    pub fn with(refusal: Refusal, detail: fmt::Arguments) -> Self {
        Self { detail: Some(Message::format(detail)), ..Self::new(refusal) }
    }

    /// The text recorded in an invalidated header: the reason and the detail.
    pub fn why(&self) -> Message {
        match &self.detail {
            Some(d) => Message::format(format_args!("{} ({})", self.refusal, d.as_str())),
            None => Message::format(format_args!("{}", self.refusal)),
        }
    }
}

/// What going back into the saved kernel needs, from its image header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WayBack {
    /// The re-entry address to `call`.
    pub reentry: u64,
    /// The GDT to leave in GDTR (base, limit; base 0: none).
    pub gdt: (u64, u16),
    /// The kernel's return path runs in 5-level paging.
    pub la57: bool,
}

/// What a resume loaded, and how long each part took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// Pages loaded from the image.
    pub pages_stored: u64,
    /// Pages of this machine's RAM and NVS zeroed (the image's zero pages,
    /// its free pages unless left, and pages no image holds).
    pub pages_zeroed: u64,
    /// Free pages left as found (the saved kernel relies on nothing in
    /// them); the image's other free pages were zeroed.
    pub pages_left: u64,
    /// Pages the image lists as free when saved.
    pub pages_free: u64,
    /// Pages that were zero when saved.
    pub pages_zero: u64,
    /// Microseconds reading the header and metadata and asking the verdict.
    pub check_us: u64,
    /// Microseconds of the one pass: every chunk loaded, every other page zeroed.
    pub load_us: u64,
    /// Microseconds from the start through the invalidation.
    pub total_us: u64,
}

/// A loaded image: what was loaded, and the way into the saved kernel,
/// which exists only once the image is invalidated on its store (else why
/// it could not be: then the image must not be resumed, as a later boot
/// could resume it again).
#[derive(Clone, Debug)]
pub struct Resumed {
    /// What was loaded, and how long it took.
    pub loaded: Loaded,
    /// The way back, or why the image could not be invalidated.
    pub way_back: Result<WayBack, Message>,
}

/// Checks the image on `store` against `machine` and loads it into `mem`:
/// the verdict first, then one pass that loads each chunk as it is checked
/// and zeroes every other page of the machine's RAM and NVS outside its
/// own range, then the image is invalidated. A refusal says why; one found
/// after loading began has [`Refused::memory_lost`] and has invalidated the
/// image with the reason, as has any refusal under
/// [`WhenRefused::Invalidate`]. `clock` returns microseconds. `helpers`,
/// if any, are started once the verdict has passed, and share the load.
///
/// # Safety
/// `machine` must describe this machine: `ram` and `nvs` its RAM and ACPI
/// NVS, `reach` the end of what `mem` and the store's DMA reach, and `own`
/// must hold everything the caller still uses (its code, data, stack, the
/// buffers and the store's DMA memory), so that every other page of `ram`
/// and `nvs` is the caller's to give up: once the verdict has passed, any
/// of them may be overwritten, by `mem` or by the store's device.
pub unsafe fn check_and_load<S, E, M>(
    store: &mut S,
    machine: &Machine,
    mem: &mut M,
    bufs: Buffers,
    clock: fn() -> u64,
    when_refused: WhenRefused,
    helpers: Option<&mut dyn Helpers>,
) -> Result<Resumed, Refused>
where
    S: DmaSource<Error = E> + Device<Error = E>,
    E: fmt::Display,
    M: PhysMemory,
{
    let Buffers { block, chunk_header, coded, pages, seal, read_ahead } = bufs;
    let start = clock();
    // SAFETY: check_and_load's contract, passed on.
    let loaded = unsafe { load(store, machine, mem, Buffers { block: &mut *block, chunk_header, coded, pages, seal, read_ahead }, clock, start, helpers) };
    match loaded {
        Ok((mut loaded, way_back)) => {
            // Never twice: the image is invalidated before the saved kernel runs.
            let way_back = match invalidate(store, None, block) {
                Ok(_) => Ok(way_back),
                Err(e) => Err(Message::format(format_args!("{e}"))),
            };
            loaded.total_us = clock() - start;
            Ok(Resumed { loaded, way_back })
        }
        Err(mut refused) => {
            if when_refused == WhenRefused::Invalidate || refused.memory_lost {
                let why = refused.why();
                refused.invalidated = Some(invalidate(store, Some(why.as_str()), block).map(|_| ()).map_err(|e| Message::format(format_args!("{e}"))));
            }
            Err(refused)
        }
    }
}

/// The verdict and the one pass, timed from `start`; [`Loaded::total_us`]
/// is left 0.
///
/// # Safety
/// As for [`check_and_load`].
#[inline(never)] // one copy, apart from the invalidations (ksave's footprint)
unsafe fn load<S: DmaSource, M: PhysMemory>(
    store: &mut S,
    machine: &Machine,
    mem: &mut M,
    bufs: Buffers,
    clock: fn() -> u64,
    start: u64,
    helpers: Option<&mut dyn Helpers>,
) -> Result<(Loaded, WayBack), Refused>
where
    S::Error: fmt::Display,
{
    let Buffers { block, chunk_header, coded, pages, seal, read_ahead } = bufs;
    // The metadata is read into the pages buffer: only its copy (`saved`)
    // is needed once the chunks are read.
    let meta_buf = (&mut pages[..META_BLOCKS as usize * PAGE]).try_into().expect("the pages buffer holds the metadata");
    let (header, meta) = verdict_on(store, machine, block, meta_buf)?;
    // An encrypted store: the image must be sealed under the key read from
    // the unlocked volume, its header and metadata as it wrote them; a
    // sealed image without its key is never loaded. Before anything is
    // written.
    reader::check_sealed::<S::Error>(seal.as_ref().map(|(s, _)| *s), &header, &meta, &mut coded[..]).map_err(unreadable)?;

    // One pass: each chunk is loaded as it is read and checked, and every
    // page the image does not store is zeroed on the way. From here on the
    // machine's memory is the saved kernel's: this boot's is given up (the
    // resumer itself, its buffers and the store's DMA memory are in its
    // own range), so a chunk that fails its check now invalidates the image
    // (it is damaged) and leaves only a reset; nothing is lost, as the image
    // was the only copy.
    let saved = reader::Saved::of(&meta, &header);
    let verified = clock();
    let as_found = header.flags & FLAG_FREE_AS_FOUND != 0;
    // SAFETY: the verdict has passed: check_and_load's contract gives this
    // machine's memory up.
    let started = helpers.and_then(|h| unsafe { h.start(machine) });
    let held = started.as_ref().and_then(|s| s.held);
    let helping = started.map(|s| Helping { queue: s.queue, mem: s.mem, first: None });
    let cipher = seal.as_ref().map(|(s, _)| *s);
    let mut loader = Loader { machine, mem, next: 0, zeroed: 0, ahead: as_found.then(RunsAhead::new), left: 0, helping, seal: cipher, held };
    let bufs = reader::Buffers { header: chunk_header, lz4_in: coded, lz4_out: pages, seal };
    let end = DATA_OFFSET.saturating_add(header.data_bytes);
    let mut store = ReadAhead { src: store, window: read_ahead, start: 0, len: 0, last_miss: None, end, align: header.align as u64 };
    let walked = reader::visit_chunks(&mut store, &header, &saved, bufs, &mut loader);
    if walked.is_ok() {
        loader.zero_to(u64::MAX);
    }
    // Every job done, whatever happened: a failure found on another CPU
    // is the walk's, unless the walk failed on an earlier chunk.
    let failed_later = loader.settle();
    let walked = match (walked, failed_later) {
        (Err(ReadError::Chunk { index, offset, what }), Some(f)) if index < f.at.index => Err(ReadError::Chunk { index, offset, what }),
        (_, Some(f)) => Err(f.at.failed(f.what)),
        (walked, None) => walked,
    };
    if let Err(e) = walked {
        return Err(Refused { memory_lost: true, ..unreadable(e) });
    }
    let load_done = clock();
    let loaded = Loaded {
        pages_stored: header.pages_stored,
        pages_zeroed: loader.zeroed,
        pages_left: loader.left,
        pages_free: header.pages_free,
        pages_zero: header.pages_zero,
        check_us: verified - start,
        load_us: load_done - verified,
        total_us: 0,
    };
    let way_back = WayBack { reentry: header.reentry, gdt: header.return_gdt, la57: header.cr4_needed & CR4_LA57 != 0 };
    Ok((loaded, way_back))
}

/// The verdict alone: the image on `store` would be loaded on `machine`
/// (its header and metadata pass [`verdict::resumable`]), or why not.
/// Nothing is written. For a resumer that must decide before it can load
/// (ksave.efi decides while the firmware still runs, then leaves it:
/// docs/UEFI.md); the load checks again.
pub fn check<S: Source>(store: &mut S, machine: &Machine, block: &mut [u8; PAGE], meta_buf: &mut [u8; META_BLOCKS as usize * PAGE]) -> Result<Header, Refused>
where
    S::Error: fmt::Display,
{
    verdict_on(store, machine, block, meta_buf).map(|(header, _)| header)
}

/// Reads the header and the metadata and asks the verdict.
fn verdict_on<'m, S: Source>(store: &mut S, machine: &Machine, block: &mut [u8; PAGE], meta_buf: &'m mut [u8; META_BLOCKS as usize * PAGE]) -> Result<(Header, Meta<'m>), Refused>
where
    S::Error: fmt::Display,
{
    let header = reader::read_header(store, block).map_err(unreadable)?;
    let meta = match reader::read_meta(store, &header, meta_buf) {
        Ok(meta) => Ok(meta),
        Err(ReadError::Header(e)) => Err(e),
        Err(e) => return Err(unreadable(e)),
    };
    let here = Here {
        resumer: Resumer::Ksave,
        ram: machine.ram,
        nvs: machine.nvs,
        cpu_vendor: machine.cpu_vendor,
        la57: machine.la57,
        facs_signature: machine.facs_signature.ok(),
        own: Some(machine.own),
        reach: machine.reach,
    };
    match verdict::resumable(&header, meta.as_ref().map_err(|e| *e), &here) {
        Ok(()) => {}
        // The header's message says why (a failed save's reason, the one an
        // image was invalidated for), as `ksave resume` says it.
        Err(r @ (Refusal::SaveFailed | Refusal::AlreadyResumed | Refusal::Incomplete)) if !header.message().is_empty() => {
            return Err(Refused::with(r, format_args!("{}", header.message())));
        }
        Err(r @ Refusal::HardwareUnknown) => {
            let why = machine.facs_signature.err().unwrap_or("");
            return Err(Refused::with(r, format_args!("{why}")));
        }
        Err(r) => return Err(Refused::new(r)),
    }
    Ok((header, meta.expect("the verdict passed the metadata")))
}

/// The refusal a failed read of the image stands for.
fn unreadable<E: fmt::Display>(e: ReadError<E>) -> Refused {
    match e {
        ReadError::Io(e) => Refused::with(Refusal::Unreadable, format_args!("{e}")),
        ReadError::Header(h) => Refused::new(Refusal::NoImage(h)),
        ReadError::Chunk { index, what, .. } => Refused::new(Refusal::Damaged { chunk: index, what }),
        ReadError::Totals(what) => Refused::new(Refusal::Damaged { chunk: u64::MAX, what }),
        ReadError::Seal(what) => Refused::new(Refusal::Sealed(what)),
    }
}

/// Why an image could not be invalidated.
#[derive(Debug, PartialEq, Eq)]
pub enum InvalidateError<E> {
    /// Its header block could not be read or written.
    Io(E),
    /// There is no image header to invalidate.
    NoImage,
}

impl<E: fmt::Display> fmt::Display for InvalidateError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::NoImage => write!(f, "no image header"),
        }
    }
}

/// Rewrites the image's header block on `store` as
/// [`verdict::invalidate`] says (with `why`, if given) and flushes; returns
/// the state the image had. One already invalidated is not written.
pub fn invalidate<S, E>(store: &mut S, why: Option<&str>, block: &mut [u8; PAGE]) -> Result<State, InvalidateError<E>>
where
    S: Source<Error = E> + Device<Error = E>,
{
    store.read_at(0, block).map_err(InvalidateError::Io)?;
    let was = verdict::invalidate(block, why).map_err(|_| InvalidateError::NoImage)?;
    if was != State::Invalidated {
        store.write_bytes(0, block).and_then(|()| store.flush()).map_err(InvalidateError::Io)?;
    }
    Ok(was)
}

/// Loads a checked image's pages in one pass (a [`reader::Visitor`]): raw
/// chunks by DMA straight into their pages, coded pages decoded and copied,
/// and every page of this machine's RAM and NVS the image does not store
/// zeroed (pages that were zero or free when saved, and pages no image
/// holds, like the firmware's), except, where the image says the saved
/// kernel relies on nothing in its free pages
/// ([`FLAG_FREE_AS_FOUND`](ksave_format::header::FLAG_FREE_AS_FOUND)), the
/// free runs it has listed by the time it reaches them: those are left as
/// found. Relies on stored pages coming in ascending order, which the
/// reader checks; free runs come in ascending order too, but may lag the
/// stored pages (a free run listed after the loader passed it was zeroed:
/// harmless, only slower). Made only by [`load`], once the verdict has
/// passed, under [`check_and_load`]'s contract.
struct Loader<'a, M> {
    machine: &'a Machine<'a>,
    mem: &'a mut M,
    /// The first page not yet loaded, zeroed or left.
    next: u64,
    /// Pages zeroed.
    zeroed: u64,
    /// Free runs to leave as found: None if the image's free pages are
    /// zeroed like the rest.
    ahead: Option<RunsAhead>,
    /// Free pages left as found.
    left: u64,
    /// Other CPUs share the work, if any were started.
    helping: Option<Helping<'a>>,
    /// A sealed image's cipher (for the other CPUs' jobs).
    seal: Option<&'a Seal>,
    /// A page loaded into a stand-in ([`Started::held`]).
    held: Option<(u64, u64)>,
}

/// The queue the other CPUs serve, the memory they write, and the first
/// chunk's failure among the jobs finished so far.
struct Helping<'a> {
    queue: &'a Queue,
    mem: &'a dyn SharedMemory,
    first: Option<Failure>,
}

/// The store, its chunks read through a window: a coded chunk is a few
/// KiB and a disk command costs more than that under most controllers, so
/// the read of one fetches the chunks after it too. A chunk read twice from
/// its start (its header, then the whole chunk) is coded; a raw chunk's
/// header is read once, and its pages go by DMA straight into place (a
/// window may hold the start of a raw payload after coded chunks, which
/// the DMA reads again: only a cost in speed).
struct ReadAhead<'w, S> {
    src: &'w mut S,
    window: &'w mut [u8; READ_AHEAD],
    /// The window holds the image's bytes `[start, start + len)`.
    start: u64,
    len: usize,
    /// Where the last read outside the window began.
    last_miss: Option<u64>,
    /// The end of the image's data, and its disk's block: the window
    /// reads whole blocks, none beyond the data.
    end: u64,
    align: u64,
}

impl<S: Source> Source for ReadAhead<'_, S> {
    type Error = S::Error;

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), S::Error> {
        let len = buf.len() as u64;
        if offset >= self.start && offset + len <= self.start + self.len as u64 {
            let at = (offset - self.start) as usize;
            buf.copy_from_slice(&self.window[at..][..buf.len()]);
            return Ok(());
        }
        let again = self.last_miss.replace(offset) == Some(offset);
        let fill = (self.end.saturating_sub(offset).min(READ_AHEAD as u64) / self.align.max(1) * self.align.max(1)) as usize;
        if !again || fill < buf.len() {
            return self.src.read_at(offset, buf);
        }
        self.len = 0;
        self.src.read_at(offset, &mut self.window[..fill])?;
        (self.start, self.len) = (offset, fill);
        buf.copy_from_slice(&self.window[..buf.len()]);
        Ok(())
    }
}

impl<S: DmaSource> DmaSource for ReadAhead<'_, S> {
    unsafe fn read_into_pages(&mut self, offset: u64, pfns: &[u64]) -> Result<(), S::Error> {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.src.read_into_pages(offset, pfns) }
    }
}

/// Zeroing shorter than this is done at once, not handed over.
const ZERO_AT_ONCE: u64 = 64 << 10;

/// Free runs listed ahead of the loader, ascending, as (first pfn, end pfn).
/// A run that finds it full is zeroed when reached, like a page of a run
/// listed too late.
struct RunsAhead {
    runs: [(u64, u64); AHEAD_RUNS],
    /// The ring's first run, and how many there are.
    head: usize,
    len: usize,
}

/// One chunk's worth of runs (the writer lists at most 250 in one).
const AHEAD_RUNS: usize = 256;

impl RunsAhead {
    const fn new() -> Self {
        Self { runs: [(0, 0); AHEAD_RUNS], head: 0, len: 0 }
    }

    fn push(&mut self, run: (u64, u64)) {
        if self.len < AHEAD_RUNS {
            self.runs[(self.head + self.len) % AHEAD_RUNS] = run;
            self.len += 1;
        }
    }

    fn front(&self) -> Option<(u64, u64)> {
        (self.len > 0).then(|| self.runs[self.head])
    }

    fn pop(&mut self) {
        self.head = (self.head + 1) % AHEAD_RUNS;
        self.len -= 1;
    }
}

impl<M: PhysMemory> Loader<'_, M> {
    /// Settles every page from `next` up to `pfn` (exclusive): a page of a
    /// free run listed ahead is left as found, every other page of this
    /// machine's memory outside the resumer's own range zeroed.
    fn zero_to(&mut self, pfn: u64) {
        while self.next < pfn {
            let Some((first, end)) = self.ahead.as_ref().and_then(RunsAhead::front) else {
                self.zero_range(pfn);
                return;
            };
            if end <= self.next {
                self.ahead.as_mut().expect("a run came from it").pop();
            } else if first <= self.next {
                // Inside the saved RAM outside the resumer's range (the
                // reader checked the run): pages of the saved kernel.
                let to = end.min(pfn);
                self.left += to - self.next;
                self.next = to;
            } else {
                self.zero_range(first.min(pfn));
            }
        }
    }

    /// Zeroes every page of this machine's memory from `next` up to `pfn`
    /// (exclusive), outside the resumer's own range.
    fn zero_range(&mut self, pfn: u64) {
        if pfn <= self.next {
            return;
        }
        let own = self.machine.own;
        let (from, to) = (self.next * PAGE as u64, pfn.saturating_mul(PAGE as u64));
        for r in self.machine.ranges() {
            let (start, end) = (r.start.max(from), r.end.min(to));
            for (s, e) in [(start, end.min(own.start)), (start.max(own.end), end)] {
                if s < e {
                    // SAFETY: RAM or NVS of this machine's map, inside the
                    // reach (the verdict checked it before loading), outside
                    // the resumer's own range: under check_and_load's
                    // contract nothing live is there, and this boot's
                    // memory was given up.
                    unsafe { self.zero(s, e) };
                    self.zeroed += (e - s) / PAGE as u64;
                }
            }
        }
        self.next = pfn;
    }

    /// Settles every page before `pfns` (the next stored pages, ascending)
    /// and steps past them: they are written by whoever loads them.
    fn pass(&mut self, pfns: &[u64]) {
        for &pfn in pfns {
            self.zero_to(pfn);
            self.next = pfn + 1;
        }
    }

    /// [`Self::pass`], then has the device read `pfns.len()` pages from
    /// byte `at` of the image into them (a held page into its stand-in);
    /// returns where they went.
    ///
    /// # Safety
    /// `pfns` as the reader checked them (in the saved memory, outside the
    /// resumer's range), under [`check_and_load`]'s contract.
    unsafe fn read_into_place<'p, S: DmaSource>(&mut self, store: &mut S, at: u64, pfns: &'p [u64], buf: &'p mut [u64; MAX_RAW_PAGES]) -> Result<&'p [u64], S::Error> {
        self.pass(pfns);
        let placed = self.placed_pfns(pfns, buf);
        // SAFETY: the device writes these pages (a disk read). Each is RAM
        // or NVS of this machine in the saved memory outside the resumer's
        // range, which check_and_load's contract gives up to the saved
        // kernel, or a held page's stand-in, the helpers' own.
        unsafe { store.read_into_pages(at, placed)? };
        Ok(placed)
    }

    /// Where page `pfn` is loaded: its stand-in if it is held.
    fn placed(&self, pfn: u64) -> u64 {
        match self.held {
            Some((page, stand_in)) if page == pfn => stand_in,
            _ => pfn,
        }
    }

    /// `pfns` as they are loaded ([`Self::placed`]), in `buf` if one is held.
    fn placed_pfns<'p>(&self, pfns: &'p [u64], buf: &'p mut [u64; MAX_RAW_PAGES]) -> &'p [u64] {
        match self.held {
            Some((page, _)) if pfns.contains(&page) => {
                for (slot, &pfn) in buf.iter_mut().zip(pfns) {
                    *slot = self.placed(pfn);
                }
                &buf[..pfns.len()]
            }
            _ => pfns,
        }
    }

    /// Zeroes `[start, end)`, a held page's stand-in for the page.
    ///
    /// # Safety
    /// As for [`PhysMemory::zero`], until [`Self::settle`].
    unsafe fn zero(&mut self, start: u64, end: u64) {
        let page = PAGE as u64;
        match self.held {
            Some((held, stand_in)) if (start..end).contains(&(held * page)) => {
                // SAFETY: the caller's promise; the stand-in is the helpers'
                // implementation's to fill.
                unsafe {
                    self.zero_now(start, held * page);
                    self.mem.zero(stand_in * page, page);
                    self.zero_now((held + 1) * page, end);
                }
            }
            // SAFETY: the caller's promise.
            _ => unsafe { self.zero_now(start, end) },
        }
    }

    /// Zeroes `[start, end)`, on other CPUs if it is worth it.
    ///
    /// # Safety
    /// As for [`PhysMemory::zero`], until [`Self::settle`].
    unsafe fn zero_now(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        match &mut self.helping {
            Some(h) if end - start >= ZERO_AT_ONCE => {
                for at in (start..end).step_by(helpers::ZERO_JOB as usize) {
                    let job = Job::Zero { addr: at, len: helpers::ZERO_JOB.min(end - at) };
                    // SAFETY: the caller's promise, which holds until settle.
                    let Ok(()) = unsafe {
                        h.queue.submit::<core::convert::Infallible>(h.mem, &mut h.first, |slot| {
                            slot.job = job;
                            Ok(())
                        })
                    };
                }
            }
            // SAFETY: the caller's promise.
            _ => unsafe { self.mem.zero(start, end - start) },
        }
    }

    /// Waits for every job handed to other CPUs; the first chunk's failure
    /// among them, if any.
    fn settle(&mut self) -> Option<Failure> {
        let h = self.helping.as_mut()?;
        // SAFETY: the jobs were submitted under check_and_load's contract.
        unsafe { h.queue.settle(h.mem, &mut h.first) }
    }
}

impl<S: DmaSource, M: PhysMemory> reader::Visitor<S> for Loader<'_, M> {
    fn free_run(&mut self, first: u64, pages: u64) {
        let (start, end) = (first.max(self.next), first.saturating_add(pages));
        if let Some(ahead) = &mut self.ahead
            && start < end
        {
            ahead.push((start, end));
        }
    }

    fn page(&mut self, pfn: u64, data: &[u8; PAGE]) {
        self.zero_to(pfn);
        // SAFETY: the reader checked the page lies in the saved RAM or NVS,
        // which the verdict found equal to this machine's and inside the
        // reach, and outside the saving ksave's range, which the verdict
        // found equal to this one's: check_and_load's contract gives it up
        // (or its stand-in, the helpers' own).
        unsafe { self.mem.write(self.placed(pfn) * PAGE as u64, data) };
        self.next = pfn + 1;
    }

    fn raw_pages(&mut self, store: &mut S, at: u64, pfns: &[u64], buf: &mut [u8; LZ4_GROUP * PAGE], chunk: ChunkAt, hash: u64) -> Result<Option<u64>, S::Error> {
        let mut buf_pfns = [0; MAX_RAW_PAGES];
        // SAFETY: pages the reader checked (in the saved memory, outside the
        // resumer's range), under check_and_load's contract.
        let pfns = unsafe { self.read_into_place(store, at, pfns, &mut buf_pfns)? };
        if let Some(h) = &mut self.helping {
            // SAFETY: the pages the device just filled, which nothing
            // writes again (stored pages ascend, and this CPU goes on
            // past them).
            let Ok(()) = unsafe {
                h.queue.submit::<core::convert::Infallible>(h.mem, &mut h.first, |slot| {
                    slot.pfns[..pfns.len()].copy_from_slice(pfns);
                    slot.at = chunk;
                    slot.job = Job::CheckRaw { hash, pages: pfns.len() as u16 };
                    Ok(())
                })
            };
            return Ok(None);
        }
        // The check, over the pages where they now lie.
        let mut hasher = PayloadHasher::new();
        for &pfn in pfns {
            let page = &mut buf[..PAGE];
            // SAFETY: a page of this machine's RAM or NVS inside the reach,
            // which the device just filled (above).
            unsafe { self.mem.read(pfn * PAGE as u64, page) };
            hasher.update(page);
        }
        Ok(Some(hasher.digest()))
    }

    fn coded_chunk(&mut self, store: &mut S, chunk: &CodedChunkAt) -> Result<bool, S::Error> {
        let job = match (chunk.sealed, self.seal) {
            (None, _) => Job::Coded {
                encoding: chunk.encoding,
                payload_at: chunk.payload.start as u32,
                payload_len: chunk.payload.len() as u32,
                hash: chunk.hash,
                pages: chunk.pfns.len() as u16,
            },
            (Some(sealed), Some(seal)) => Job::SealedCoded {
                seal,
                tag: sealed.tag,
                aad_len: sealed.aad_len as u16,
                encoding: chunk.encoding,
                payload_at: chunk.payload.start as u32,
                payload_len: chunk.payload.len() as u32,
                pages: chunk.pfns.len() as u16,
            },
            (Some(_), None) => return Ok(false),
        };
        if self.helping.is_none() {
            return Ok(false);
        }
        // The gaps first: the pages are written by whichever CPU decodes them.
        self.pass(chunk.pfns);
        let mut buf_pfns = [0; MAX_RAW_PAGES];
        let pfns = self.placed_pfns(chunk.pfns, &mut buf_pfns);
        let h = self.helping.as_mut().expect("checked above");
        // SAFETY: the chunk's pages lie in the saved memory, outside the
        // resumer's range (the reader checked them, as for `page`), which
        // check_and_load's contract gives up; nothing else writes them. A
        // sealed job's cipher is the load's, which outlives its settle.
        unsafe {
            h.queue.submit(h.mem, &mut h.first, |slot| {
                store.read_at(chunk.at.offset, &mut slot.bytes[..chunk.bytes])?;
                // A sealed chunk's tag binds the header the reader checked
                // and took the pages from, not what a second read returned.
                if let Some(aad) = chunk.aad {
                    slot.bytes[..aad.len()].copy_from_slice(aad);
                }
                slot.pfns[..pfns.len()].copy_from_slice(pfns);
                slot.at = chunk.at;
                slot.job = job;
                Ok(())
            })?
        };
        Ok(true)
    }

    fn sealed_raw_pages(&mut self, store: &mut S, at: u64, pfns: &[u64], chunk: ChunkAt, aad: &[u8], tag: &[u8; TAG_LEN]) -> Result<bool, S::Error> {
        let Some(seal) = self.seal.filter(|_| self.helping.is_some()) else { return Ok(false) };
        let mut buf_pfns = [0; MAX_RAW_PAGES];
        // SAFETY: as for raw_pages: the device writes the ciphertext there.
        let pfns = unsafe { self.read_into_place(store, at, pfns, &mut buf_pfns)? };
        let h = self.helping.as_mut().expect("checked above");
        let job = Job::SealedRaw { seal, tag: *tag, aad_len: aad.len() as u16, pages: pfns.len() as u16 };
        // SAFETY: the pages the device just filled, this job's alone (as
        // for raw_pages); the cipher is the load's, which outlives its settle.
        let Ok(()) = unsafe {
            h.queue.submit::<core::convert::Infallible>(h.mem, &mut h.first, |slot| {
                slot.bytes[..aad.len()].copy_from_slice(aad);
                slot.pfns[..pfns.len()].copy_from_slice(pfns);
                slot.at = chunk;
                slot.job = job;
                Ok(())
            })
        };
        Ok(true)
    }
}
