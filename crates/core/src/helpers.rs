//! The other CPUs' part in a resume and a save: a ring of job slots that
//! the loading (or saving) CPU fills, and that any CPU empties. In a
//! resume: a coded chunk's check and decode, the check of raw pages the
//! disk put in place, zeroing; a job's failure stays with its chunk until
//! [`Queue::settle`] reports the first chunk's. In a save: the LZ4 coding
//! of groups of pages and the sealing of raw chunks, whose slots the writer
//! keeps and takes back in order ([`QueueCoder`], [`QueueSealer`]). The loading CPU runs a job itself whenever it
//! waits, so the queue works with no helper at all.
//!
//! The protocol, per slot: the loading CPU takes a FREE slot (it alone
//! does), fills it and publishes it READY with a release store; any CPU
//! claims a READY slot with an acquire compare-exchange to BUSY, runs it
//! and publishes DONE with a release store; the loading CPU, alone again,
//! reads a DONE slot's outcome after an acquire load and frees it.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};

use core::marker::PhantomData;
use core::ptr::NonNull;

use ksave_format::chunk::{Encoding, LZ4_GROUP, LZ4_OUT, MAX_RAW_PAGES, SEALED_RAW_PAGES, SealedChunk};
use ksave_format::codec::Lz4;
use ksave_format::writer::{ChunkSealer, Coded, GROUPS_IN_FLIGHT, Group, GroupCoder, code_group, seal_raw_chunk};
use ksave_format::reader::{ChunkAt, FORGED, check_and_decode, decode};
use ksave_format::seal::{Seal, Sealed, TAG_LEN};
use ksave_format::{PAGE, PayloadHasher, Range};

/// Physical memory that several CPUs reach at once: [`PhysMemory`]'s
/// operations through a shared reference.
///
/// [`PhysMemory`]: crate::resume::PhysMemory
pub trait SharedMemory: Sync {
    /// Zeroes the `len` bytes at `addr`.
    ///
    /// # Safety
    /// As for [`PhysMemory::zero`](crate::resume::PhysMemory::zero); and no
    /// other CPU or device uses those bytes meanwhile.
    unsafe fn zero(&self, addr: u64, len: u64);

    /// Copies `data` to `addr`.
    ///
    /// # Safety
    /// As for [`Self::zero`], for `[addr, addr + data.len())`.
    unsafe fn write(&self, addr: u64, data: &[u8]);

    /// Copies the memory at `addr` into `buf`.
    ///
    /// # Safety
    /// As for [`PhysMemory::read`](crate::resume::PhysMemory::read); and
    /// nothing writes those bytes meanwhile.
    unsafe fn read(&self, addr: u64, buf: &mut [u8]);
}

/// Slots in the ring: enough to keep a few helpers busy while the loading
/// CPU reads ahead (each holds one coded chunk's bytes and pages: 69 KiB of
/// the resumer's footprint); in a save, the writer's groups in flight and
/// the one it gathers.
pub const SLOTS: usize = 4;
const _: () = assert!(SLOTS == GROUPS_IN_FLIGHT + 1);

/// The largest piece of zeroing one job does: big enough that a job's cost
/// dwarfs handing it over, small enough to spread a large range.
pub const ZERO_JOB: u64 = 2 << 20;

/// The page an application processor starts in, which its start-up IPI
/// names by number, so below 1 MiB (Intel SDM vol. 3A 11.6.1): the lowest
/// whole page of `ram` from 4 KiB on (page 0 holds the real-mode interrupt
/// vectors and the BIOS data) outside `own` (ksave's image).
pub fn startup_page(ram: &[Range], own: Range) -> Option<u64> {
    const PAGE_U64: u64 = PAGE as u64;
    ram.iter()
        .filter_map(|r| {
            let mut start = r.start.max(PAGE_U64).next_multiple_of(PAGE_U64);
            if start < own.end && own.start < start + PAGE_U64 {
                start = own.end.next_multiple_of(PAGE_U64);
            }
            (start + PAGE_U64 <= r.end.min(1 << 20)).then_some(start)
        })
        .min()
}

/// What a slot asks of the CPU that runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)] // Nothing is 0: an empty queue is all zeros
pub enum Job {
    /// Nothing (a slot's first state; all zeros).
    Nothing = 0,
    /// A plain coded chunk whose bytes are in the slot: check its payload
    /// (`payload` within the bytes) against `hash`, decode it to its
    /// `pages` pages (the slot's pfns), write them there.
    Coded {
        /// The chunk's codec.
        encoding: Encoding,
        /// The payload's start within the slot's bytes.
        payload_at: u32,
        /// The payload's length.
        payload_len: u32,
        /// The payload's hash.
        hash: u64,
        /// How many pages.
        pages: u16,
    },
    /// A sealed coded chunk whose bytes are in the slot: open its payload
    /// (the tag over the first `aad_len` bytes and the payload, under the
    /// nonce of the chunk's index), decode it, write its pages.
    SealedCoded {
        /// The image's cipher; it outlives the job ([`Queue::submit`]).
        seal: *const Seal,
        /// The chunk's tag.
        tag: [u8; TAG_LEN],
        /// Bytes of the chunk's start the tag binds.
        aad_len: u16,
        /// The chunk's codec.
        encoding: Encoding,
        /// The payload's start within the slot's bytes.
        payload_at: u32,
        /// The payload's length.
        payload_len: u32,
        /// How many pages.
        pages: u16,
    },
    /// A sealed raw chunk's `pages` pages of ciphertext (the slot's pfns),
    /// which the disk has put in place: check the tag over them (the slot's
    /// bytes hold the `aad_len` bytes it binds first), then decrypt them in
    /// place.
    SealedRaw {
        /// The image's cipher; it outlives the job ([`Queue::submit`]).
        seal: *const Seal,
        /// The chunk's tag.
        tag: [u8; TAG_LEN],
        /// Bytes of associated data, at the start of the slot's bytes.
        aad_len: u16,
        /// How many pages.
        pages: u16,
    },
    /// A raw chunk's `pages` pages (the slot's pfns), which the disk has put
    /// in place: check them against `hash`.
    CheckRaw {
        /// The payload's hash.
        hash: u64,
        /// How many pages.
        pages: u16,
    },
    /// Zero `len` bytes at `addr`.
    Zero {
        /// The first byte.
        addr: u64,
        /// How many.
        len: u64,
    },
    /// Code the slot's first `pages` pages into its bytes after the chunk
    /// header (a save's group, [`code_group`]).
    Encode {
        /// The codec's encoding.
        encoding: Encoding,
        /// How many pages.
        pages: u16,
    },
    /// Seal raw chunk `index` in place: its encoded header and `pages`
    /// pages in the buffer at `chunk` (a save's, [`seal_raw_chunk`]).
    SealRaw {
        /// The image's cipher; it outlives the job ([`QueueSealer::new`]).
        seal: *const Seal,
        /// The chunk, this job's alone until done ([`QueueSealer::new`]).
        chunk: *mut SealedChunk,
        /// The chunk's index (its nonce).
        index: u64,
        /// How many pages.
        pages: u16,
    },
}

/// A slot's contents: the job and what it works on. The buffers first and
/// page aligned: a disk reads into them by DMA.
#[repr(C, align(4096))]
pub struct SlotData {
    /// A coded chunk's bytes on disk.
    pub bytes: [u8; LZ4_OUT],
    /// The decoded pages, or a raw page being checked.
    pages: [u8; LZ4_GROUP * PAGE],
    /// The chunk's pages.
    pub pfns: [u64; MAX_RAW_PAGES],
    /// The job.
    pub job: Job,
    /// The chunk it belongs to (for a failure).
    pub at: ChunkAt,
    /// Why the job failed.
    failure: Option<&'static str>,
    /// An [`Job::Encode`]'s outcome (no pages: none yet). Not an `Option`:
    /// its `None` would not be all zeros, which an empty queue is.
    coded: Coded,
    /// The submitter takes the slot back itself ([`Queue::wait`]), rather
    /// than the queue freeing it when done.
    kept: bool,
}

const NOT_CODED: Coded = Coded { pages: 0, payload: None };

const FREE: u8 = 0;
const FILLING: u8 = 1;
const READY: u8 = 2;
const BUSY: u8 = 3;
const DONE: u8 = 4;

struct Slot {
    state: AtomicU8,
    data: UnsafeCell<SlotData>,
}

/// The ring, shared by the loading CPU and its helpers. All zeros is a
/// valid empty queue, so it can live in memory cleared at entry.
pub struct Queue {
    slots: [Slot; SLOTS],
    stop: AtomicBool,
    /// A helper died ([`Queue::helper_lost`]).
    lost: AtomicBool,
    /// Jobs run by helpers, and by the loading CPU.
    by_helpers: AtomicU32,
    by_loader: AtomicU32,
}

// SAFETY: a slot's data is reached only by the one CPU its state gives it
// to (the module's protocol above: FREE, FILLING and DONE are the loading
// CPU's, BUSY the claimer's), with acquire/release on every hand-over.
unsafe impl Sync for Queue {}

/// A job that failed: its chunk and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The chunk.
    pub at: ChunkAt,
    /// What is wrong.
    pub what: &'static str,
}

impl Queue {
    /// An empty queue.
    pub const fn new() -> Self {
        const EMPTY: SlotData =
            SlotData { bytes: [0; LZ4_OUT], pages: [0; LZ4_GROUP * PAGE], pfns: [0; MAX_RAW_PAGES], job: Job::Nothing, at: ChunkAt { index: 0, offset: 0 }, failure: None, coded: NOT_CODED, kept: false };
        Self { slots: [const { Slot { state: AtomicU8::new(FREE), data: UnsafeCell::new(EMPTY) } }; SLOTS], stop: AtomicBool::new(false), lost: AtomicBool::new(false), by_helpers: AtomicU32::new(0), by_loader: AtomicU32::new(0) }
    }

    /// Hands a job to whichever CPU comes first: `fill` writes it into a
    /// free slot (waiting for one, and running jobs meanwhile). `first`
    /// keeps the first chunk's failure among the jobs finished so far. An
    /// error of `fill` leaves the slot free and is returned.
    ///
    /// # Safety
    /// Only the loading CPU submits. The job may write the memory its
    /// pages or range name (through `mem`, on any CPU, until [`Self::settle`]
    /// returns): it must be memory the caller may overwrite, that nothing
    /// else uses meanwhile ([`SharedMemory::zero`]'s contract); a raw
    /// check's pages must hold what the disk read; a sealed job's cipher
    /// must live until [`Self::settle`] returns.
    pub unsafe fn submit<E>(&self, mem: &dyn SharedMemory, first: &mut Option<Failure>, fill: impl FnOnce(&mut SlotData) -> Result<(), E>) -> Result<(), E> {
        let slot = loop {
            self.harvest(first);
            if let Some(slot) = self.slots.iter().find(|s| s.state.load(Ordering::Relaxed) == FREE) {
                break slot;
            }
            // SAFETY: the jobs were submitted under this function's contract.
            if !unsafe { self.run_one(mem, &self.by_loader) } {
                core::hint::spin_loop();
            }
        };
        slot.state.store(FILLING, Ordering::Relaxed);
        // SAFETY: FILLING: only this (the loading) CPU reaches the slot.
        let data = unsafe { &mut *slot.data.get() };
        data.failure = None;
        data.kept = false;
        match fill(data) {
            Ok(()) => {
                slot.state.store(READY, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                slot.state.store(FREE, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Runs jobs until every one submitted is done; returns the first
    /// chunk's failure among them all (with `first`'s).
    ///
    /// # Safety
    /// Only the loading CPU settles; the jobs' memory as for [`Self::submit`].
    pub unsafe fn settle(&self, mem: &dyn SharedMemory, first: &mut Option<Failure>) -> Option<Failure> {
        loop {
            self.harvest(first);
            if self.slots.iter().all(|s| s.state.load(Ordering::Relaxed) == FREE) {
                return *first;
            }
            if self.lost.load(Ordering::Acquire) && !self.slots.iter().any(|s| s.state.load(Ordering::Relaxed) == READY) {
                // What the dead helper held is never done: the load failed.
                // (Named by a chunk still being worked on: the dead helper's,
                // or one a live helper holds as the load gives up.)
                let busy = self.slots.iter().find(|s| s.state.load(Ordering::Relaxed) == BUSY);
                // SAFETY: `at` was written before the slot was published
                // (release, acquired by the claimer) and no runner writes it.
                let at = busy.map(|s| unsafe { core::ptr::addr_of!((*s.data.get()).at).read() }).unwrap_or_default();
                return Some(first.unwrap_or(Failure { at, what: "a helper CPU took an exception on it" }));
            }
            // SAFETY: passed on from this function's contract.
            if !unsafe { self.run_one(mem, &self.by_loader) } {
                core::hint::spin_loop();
            }
        }
    }

    /// A helper's life: runs jobs as they come until [`Self::stop`].
    ///
    /// # Safety
    /// The jobs' memory as for [`Self::submit`] (the loading CPU's
    /// promise); `mem` reaches it on this CPU.
    pub unsafe fn serve(&self, mem: &dyn SharedMemory) {
        while !self.stop.load(Ordering::Acquire) {
            // SAFETY: passed on from this function's contract.
            if !unsafe { self.run_one(mem, &self.by_helpers) } {
                core::hint::spin_loop();
            }
        }
    }

    /// Jobs run so far: by helpers, and by the loading CPU itself.
    pub fn jobs_run(&self) -> (u32, u32) {
        (self.by_helpers.load(Ordering::Relaxed), self.by_loader.load(Ordering::Relaxed))
    }

    /// Sends the helpers out of [`Self::serve`].
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Says a helper died (a CPU exception) and will finish no job it
    /// held: [`Self::settle`] reports the load failed rather than wait.
    pub fn helper_lost(&self) {
        self.lost.store(true, Ordering::Release);
    }

    /// Takes a free slot (running jobs while none is) that the submitter
    /// fills at leisure ([`Self::slot`]), publishes ([`Self::publish`]),
    /// waits for and frees itself ([`Self::wait`], [`Self::free`]).
    ///
    /// # Safety
    /// As for [`Self::submit`].
    pub unsafe fn reserve(&self, mem: &dyn SharedMemory) -> usize {
        loop {
            // SAFETY: this function's contract: only the submitting CPU.
            if let Some(i) = unsafe { self.try_reserve() } {
                return i;
            }
            // SAFETY: the jobs were submitted under submit's contract.
            if !unsafe { self.run_one(mem, &self.by_loader) } {
                core::hint::spin_loop();
            }
        }
    }

    /// [`Self::reserve`], but `None` at once if no slot is free.
    ///
    /// # Safety
    /// Only the submitting CPU reserves (a slot's FREE to FILLING is its
    /// own, no atomic exchange).
    pub unsafe fn try_reserve(&self) -> Option<usize> {
        self.harvest(&mut None);
        let i = self.slots.iter().position(|s| s.state.load(Ordering::Relaxed) == FREE)?;
        self.slots[i].state.store(FILLING, Ordering::Relaxed);
        // SAFETY: FILLING: only this (the submitting) CPU reaches the slot.
        let data = unsafe { &mut *self.slots[i].data.get() };
        (data.failure, data.coded, data.kept) = (None, NOT_CODED, true);
        Some(i)
    }

    /// A slot this CPU reserved, while it fills it or once it is done.
    ///
    /// # Safety
    /// `slot` came from [`Self::reserve`], and is not published or is done
    /// ([`Self::wait`]) and not freed; one reference to it at a time.
    #[allow(clippy::mut_from_ref)] // the slot's state makes the reference unique
    pub unsafe fn slot(&self, slot: usize) -> &mut SlotData {
        // SAFETY: the caller holds the slot (FILLING or a kept DONE).
        unsafe { &mut *self.slots[slot].data.get() }
    }

    /// Hands a reserved slot, filled, to whichever CPU comes first.
    pub fn publish(&self, slot: usize) {
        debug_assert_eq!(self.slots[slot].state.load(Ordering::Relaxed), FILLING);
        self.slots[slot].state.store(READY, Ordering::Release);
    }

    /// Runs jobs until the published `slot` is done; or says why it never
    /// will be (a helper died).
    ///
    /// # Safety
    /// As for [`Self::settle`].
    pub unsafe fn wait(&self, slot: usize, mem: &dyn SharedMemory) -> Result<(), &'static str> {
        loop {
            match self.slots[slot].state.load(Ordering::Acquire) {
                DONE => return Ok(()),
                BUSY if self.lost.load(Ordering::Acquire) => return Err("a helper CPU took an exception"),
                _ => {}
            }
            // SAFETY: passed on from this function's contract.
            if !unsafe { self.run_one(mem, &self.by_loader) } {
                core::hint::spin_loop();
            }
        }
    }

    /// Frees a reserved slot, done or never published (one still held by
    /// a helper, lost, stays as it is).
    pub fn free(&self, slot: usize) {
        let state = &self.slots[slot].state;
        if matches!(state.load(Ordering::Acquire), DONE | FILLING) {
            state.store(FREE, Ordering::Relaxed);
        }
    }

    /// Frees every DONE slot, keeping the first chunk's failure in `first`.
    fn harvest(&self, first: &mut Option<Failure>) {
        for slot in &self.slots {
            if slot.state.load(Ordering::Acquire) == DONE {
                // SAFETY: DONE: the runner released the slot to the loading CPU.
                let data = unsafe { &*slot.data.get() };
                if data.kept {
                    continue;
                }
                if let Some(what) = data.failure
                    && first.is_none_or(|f| data.at.index < f.at.index)
                {
                    *first = Some(Failure { at: data.at, what });
                }
                slot.state.store(FREE, Ordering::Relaxed);
            }
        }
    }

    /// Claims a READY slot and runs it, counting it in `count`; false if
    /// none was READY.
    ///
    /// # Safety
    /// As for [`Self::serve`].
    unsafe fn run_one(&self, mem: &dyn SharedMemory, count: &AtomicU32) -> bool {
        for slot in &self.slots {
            if slot.state.compare_exchange(READY, BUSY, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                // SAFETY: BUSY: this CPU claimed the slot.
                let data = unsafe { &mut *slot.data.get() };
                // SAFETY: the job was submitted under submit's contract.
                data.failure = unsafe { run(data, mem) }.err();
                // Counted before it is handed back: a settled queue's counts are whole.
                count.fetch_add(1, Ordering::Relaxed);
                slot.state.store(DONE, Ordering::Release);
                return true;
            }
        }
        false
    }
}

impl Default for Queue {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs one job.
///
/// # Safety
/// The job's memory as [`Queue::submit`] requires.
unsafe fn run(data: &mut SlotData, mem: &dyn SharedMemory) -> Result<(), &'static str> {
    match data.job {
        Job::Nothing => Ok(()),
        Job::Coded { encoding, payload_at, payload_len, hash, pages } => {
            let payload = data.bytes.get(payload_at as usize..(payload_at + payload_len) as usize).ok_or("payload length")?;
            let out = data.pages.get_mut(..pages as usize * PAGE).ok_or("page count")?;
            check_and_decode(encoding, payload, hash, out)?;
            for (&pfn, page) in data.pfns.iter().zip(out.chunks_exact(PAGE)) {
                // SAFETY: submit's contract: the chunk's pages are the caller's to overwrite.
                unsafe { mem.write(pfn * PAGE as u64, page) };
            }
            Ok(())
        }
        Job::SealedCoded { seal, tag, aad_len, encoding, payload_at, payload_len, pages } => {
            // SAFETY: submit's contract: the cipher outlives the job.
            let seal = unsafe { &*seal };
            let (head, rest) = data.bytes.split_at_mut(payload_at as usize);
            let aad = head.get(..aad_len as usize).ok_or("header length")?;
            let payload = rest.get_mut(..payload_len as usize).ok_or("payload length")?;
            seal.open(Sealed::Chunk(data.at.index), aad, payload, &tag).map_err(|_| FORGED)?;
            let out = data.pages.get_mut(..pages as usize * PAGE).ok_or("page count")?;
            decode(encoding, payload, out)?;
            for (&pfn, page) in data.pfns.iter().zip(out.chunks_exact(PAGE)) {
                // SAFETY: submit's contract: the chunk's pages are the caller's to overwrite.
                unsafe { mem.write(pfn * PAGE as u64, page) };
            }
            Ok(())
        }
        Job::SealedRaw { seal, tag, aad_len, pages } => {
            // SAFETY: submit's contract: the cipher outlives the job.
            let seal = unsafe { &*seal };
            let pfns = &data.pfns[..pages as usize];
            let page = &mut data.pages[..PAGE];
            let mut opening = seal.open_in_pieces(Sealed::Chunk(data.at.index), data.bytes.get(..aad_len as usize).ok_or("header length")?);
            for &pfn in pfns {
                // SAFETY: submit's contract: pages the disk filled, this job's alone.
                unsafe { mem.read(pfn * PAGE as u64, page) };
                opening.hash(page);
            }
            let mut decrypter = opening.check(&tag).map_err(|_| FORGED)?;
            for &pfn in pfns {
                // SAFETY: as above; the caller's to overwrite.
                unsafe {
                    mem.read(pfn * PAGE as u64, page);
                    decrypter.decrypt(page);
                    mem.write(pfn * PAGE as u64, page);
                }
            }
            Ok(())
        }
        Job::CheckRaw { hash, pages } => {
            let mut hasher = PayloadHasher::new();
            let page = &mut data.pages[..PAGE];
            for &pfn in &data.pfns[..pages as usize] {
                // SAFETY: submit's contract: pages the disk filled, read only here.
                unsafe { mem.read(pfn * PAGE as u64, page) };
                hasher.update(page);
            }
            if hasher.digest() == hash { Ok(()) } else { Err("payload checksum") }
        }
        Job::Zero { addr, len } => {
            // SAFETY: submit's contract.
            unsafe { mem.zero(addr, len) };
            Ok(())
        }
        Job::Encode { encoding, pages } => {
            let mut lz4 = Lz4;
            let codec = match encoding {
                Encoding::Lz4 => &mut lz4,
                Encoding::Raw | Encoding::Free => return Err("not a codec"),
            };
            let input = data.pages.get(..pages as usize * PAGE).ok_or("page count")?;
            data.coded = code_group(codec, input, &mut data.bytes, pages as usize);
            Ok(())
        }
        Job::SealRaw { seal, chunk, index, pages } => {
            if pages as usize > SEALED_RAW_PAGES {
                return Err("page count");
            }
            // SAFETY: QueueSealer::new's contract: the cipher and the chunk
            // outlive the job, and the chunk is the job's alone meanwhile.
            let (seal, chunk) = unsafe { (&*seal, &mut *chunk) };
            seal_raw_chunk(seal, index, chunk, pages as usize);
            Ok(())
        }
    }
}

/// A save's [`GroupCoder`] on every CPU: each group is gathered in a slot
/// of the queue and coded by whichever CPU comes first (the saving one
/// while it waits); the writer takes them back in order.
pub struct QueueCoder<'q> {
    queue: &'q Queue,
    encoding: Encoding,
    /// The slot being gathered in.
    gathering: Option<usize>,
    /// The slots in flight, oldest first, from `oldest`.
    order: [usize; SLOTS],
    oldest: usize,
    in_flight: usize,
}

impl<'q> QueueCoder<'q> {
    /// Codes LZ4 on `queue`.
    ///
    /// # Safety
    /// This CPU alone submits to `queue` while the coder lives (its jobs
    /// touch only their slots).
    pub unsafe fn new(queue: &'q Queue) -> Self {
        Self { queue, encoding: Encoding::Lz4, gathering: None, order: [0; SLOTS], oldest: 0, in_flight: 0 }
    }

    fn group(data: &mut SlotData) -> Group<'_> {
        let pfns = (&mut data.pfns[..LZ4_GROUP]).try_into().expect("a slot holds a group's frames");
        Group { pages: &mut data.pages, pfns, out: &mut data.bytes }
    }
}

impl GroupCoder for QueueCoder<'_> {
    fn encoding(&self) -> Encoding {
        self.encoding
    }

    fn gathering(&mut self) -> Group<'_> {
        // SAFETY: new's contract: this CPU alone submits, and Encode jobs
        // touch no memory but their slots.
        let slot = *self.gathering.get_or_insert_with(|| unsafe { self.queue.reserve(&NO_MEMORY) });
        // SAFETY: reserved and not published; the one reference (`&mut self`).
        Self::group(unsafe { self.queue.slot(slot) })
    }

    fn start(&mut self, pages: usize) {
        let slot = self.gathering.take().expect("a group is gathered before it starts");
        // SAFETY: reserved and not published.
        let data = unsafe { self.queue.slot(slot) };
        data.job = Job::Encode { encoding: self.encoding, pages: pages as u16 };
        self.queue.publish(slot);
        self.order[(self.oldest + self.in_flight) % SLOTS] = slot;
        self.in_flight += 1;
    }

    fn finished(&mut self) -> Result<(Group<'_>, Coded), &'static str> {
        let slot = self.order[self.oldest];
        // SAFETY: new's contract, as in `gathering`.
        unsafe { self.queue.wait(slot, &NO_MEMORY)? };
        // SAFETY: done, kept, not freed; the one reference (`&mut self`).
        let data = unsafe { self.queue.slot(slot) };
        let coded = data.coded;
        if coded.pages == 0 {
            return Err("a group was not coded");
        }
        Ok((Self::group(data), coded))
    }

    fn release(&mut self) {
        self.queue.free(self.order[self.oldest]);
        self.oldest = (self.oldest + 1) % SLOTS;
        self.in_flight -= 1;
    }

}

/// Raw chunks a [`QueueSealer`] seals at once: each is a [`SealedChunk`]
/// of ksave's memory (260 KiB). Two keep two CPUs sealing: the saving CPU
/// seals the newer while it waits for the older, and writes and fills one
/// while another CPU seals the other.
pub const CHUNKS_SEALING: usize = 2;

/// A save's [`ChunkSealer`] on every CPU: each raw chunk is sealed in its
/// buffer by whichever CPU comes first (the saving one while it waits);
/// when the coder holds every slot of the queue, at once on this CPU.
pub struct QueueSealer<'q> {
    queue: &'q Queue,
    seal: &'q Seal,
    /// The chunks' buffers: jobs on other CPUs reach them by address.
    chunks: NonNull<SealedChunk>,
    /// Per chunk: the slot sealing it (`None`: sealed already) and its pages.
    jobs: [(Option<usize>, usize); CHUNKS_SEALING],
    oldest: usize,
    in_flight: usize,
    _chunks: PhantomData<&'q mut [SealedChunk; CHUNKS_SEALING]>,
}

impl<'q> QueueSealer<'q> {
    /// Seals with `seal` in `chunks`, on `queue`.
    ///
    /// # Safety
    /// This CPU alone submits to `queue` while the sealer lives; the CPUs
    /// serving it are stopped before `seal` and `chunks` are used again
    /// if the sealer goes while one of them holds a job (a helper lost:
    /// ksave parks every CPU on its way out).
    pub unsafe fn new(queue: &'q Queue, seal: &'q Seal, chunks: &'q mut [SealedChunk; CHUNKS_SEALING]) -> Self {
        Self { queue, seal, chunks: NonNull::from(chunks).cast(), jobs: [(None, 0); CHUNKS_SEALING], oldest: 0, in_flight: 0, _chunks: PhantomData }
    }

    /// Chunk `i` of the ring (modulo [`CHUNKS_SEALING`]).
    fn chunk(&self, i: usize) -> *mut SealedChunk {
        // SAFETY: `i % CHUNKS_SEALING` is within the array `new` took.
        unsafe { self.chunks.as_ptr().add(i % CHUNKS_SEALING) }
    }
}

impl ChunkSealer for QueueSealer<'_> {
    fn chunks(&self) -> usize {
        CHUNKS_SEALING
    }

    fn filling(&mut self) -> &mut SealedChunk {
        assert!(self.in_flight < CHUNKS_SEALING);
        // SAFETY: not in flight: no job holds it; the one reference
        // (`&mut self`).
        unsafe { &mut *self.chunk(self.oldest + self.in_flight) }
    }

    fn start(&mut self, index: u64, pages: usize) {
        let i = (self.oldest + self.in_flight) % CHUNKS_SEALING;
        let chunk = self.chunk(i);
        // SAFETY: new's contract: this CPU alone submits.
        let slot = unsafe { self.queue.try_reserve() };
        match slot {
            Some(slot) => {
                // SAFETY: reserved and not published.
                let data = unsafe { self.queue.slot(slot) };
                data.job = Job::SealRaw { seal: self.seal, chunk, index, pages: pages as u16 };
                data.at = ChunkAt { index, offset: 0 };
                self.queue.publish(slot);
            }
            // SAFETY: not in flight: no job holds it.
            None => seal_raw_chunk(self.seal, index, unsafe { &mut *chunk }, pages),
        }
        self.jobs[i] = (slot, pages);
        self.in_flight += 1;
    }

    fn finished(&mut self) -> Result<&[u8], &'static str> {
        assert!(self.in_flight > 0);
        let (slot, pages) = self.jobs[self.oldest];
        if let Some(slot) = slot {
            // SAFETY: new's contract; the queue's jobs touch no memory but
            // their slots and chunks.
            unsafe { self.queue.wait(slot, &NO_MEMORY)? };
            // SAFETY: done, kept, not freed; the one reference (`&mut self`).
            if let Some(why) = unsafe { self.queue.slot(slot) }.failure {
                return Err(why);
            }
        }
        // SAFETY: sealed: no job holds it any more.
        let chunk: &SealedChunk = unsafe { &*self.chunk(self.oldest) };
        Ok(&chunk[..PAGE * (1 + pages)])
    }

    fn release(&mut self) {
        if let (Some(slot), _) = self.jobs[self.oldest] {
            self.queue.free(slot);
        }
        self.jobs[self.oldest] = (None, 0);
        self.oldest = (self.oldest + 1) % CHUNKS_SEALING;
        self.in_flight -= 1;
    }
}

impl Drop for QueueSealer<'_> {
    /// A save that failed may leave chunks sealing: they are waited for
    /// before the buffers go back to the caller, unless a CPU was lost
    /// (then `wait` gives up on every chunk still held, a live helper's
    /// too, and `new`'s contract holds: ksave parks every CPU before the
    /// buffers are used again).
    fn drop(&mut self) {
        while self.in_flight > 0 {
            if let (Some(slot), _) = self.jobs[self.oldest] {
                // SAFETY: as in `finished`.
                let _ = unsafe { self.queue.wait(slot, &NO_MEMORY) };
            }
            self.release();
        }
    }
}

/// Memory a save's queue never reads (its jobs touch their slots and
/// chunks only).
struct NoMemory;

static NO_MEMORY: NoMemory = NoMemory;

impl SharedMemory for NoMemory {
    unsafe fn zero(&self, _: u64, _: u64) {
        unreachable!("a save's job touches its slot and chunk only")
    }
    unsafe fn write(&self, _: u64, _: &[u8]) {
        unreachable!("a save's job touches its slot and chunk only")
    }
    unsafe fn read(&self, _: u64, _: &mut [u8]) {
        unreachable!("a save's job touches its slot and chunk only")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ksave_format::codec::PageCodec;
    use std::sync::Barrier;

    use ksave_format::header::FLAG_SEALED;
    use ksave_format::seal::DataKey;
    use ksave_format::writer::{Buffers as WriterBuffers, GroupBuffers, Inline, InlineSealer, Memory, Sink, Totals, WriteError, Writer};
    use std::boxed::Box;
    use std::vec;
    use std::vec::Vec;

    /// Memory several threads write at once, each its own pages.
    struct Ram(Box<[UnsafeCell<u8>]>);
    // SAFETY: the jobs of one test name disjoint pages.
    unsafe impl Sync for Ram {}

    impl Ram {
        fn new(pages: usize) -> Self {
            Self((0..pages * PAGE).map(|i| UnsafeCell::new((i / PAGE) as u8 | 1)).collect())
        }
        fn page(&self, pfn: u64) -> Vec<u8> {
            // SAFETY: read between jobs, never while a thread writes.
            self.0[pfn as usize * PAGE..][..PAGE].iter().map(|b| unsafe { *b.get() }).collect()
        }
        /// A pointer with the whole memory's provenance.
        fn at(&self, addr: u64) -> *mut u8 {
            assert!((addr as usize) < self.0.len());
            self.0.as_ptr().cast_mut().cast::<u8>().wrapping_add(addr as usize)
        }
    }

    impl SharedMemory for Ram {
        unsafe fn zero(&self, addr: u64, len: u64) {
            // SAFETY: inside the Box (the tests' addresses), pages no other job names.
            unsafe { core::ptr::write_bytes(self.at(addr), 0, len as usize) }
        }
        unsafe fn write(&self, addr: u64, data: &[u8]) {
            // SAFETY: as for `zero`.
            unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), self.at(addr), data.len()) }
        }
        unsafe fn read(&self, addr: u64, buf: &mut [u8]) {
            // SAFETY: as for `zero`; nothing writes a page while its check reads it.
            unsafe { core::ptr::copy_nonoverlapping(self.at(addr), buf.as_mut_ptr(), buf.len()) }
        }
    }

    fn page_of(pfn: u64) -> Vec<u8> {
        (0..PAGE).map(|i| (pfn as usize * 7 + i / 64) as u8).collect()
    }

    /// Submits, per chunk of 4 pages starting at page 8 * index: a
    /// coded chunk (even index) or a raw check (odd: the pages are put in
    /// place first, as the disk does), then zeroing of page 1000 + index.
    /// Chunk `bad` gets a wrong hash.
    fn submit_all(queue: &Queue, ram: &Ram, chunks: u64, bad: Option<u64>) -> Option<Failure> {
        let mut first = None;
        for index in 0..chunks {
            let pfns: Vec<u64> = (index * 8..index * 8 + 4).collect();
            let pages: Vec<u8> = pfns.iter().flat_map(|&p| page_of(p)).collect();
            let at = ChunkAt { index, offset: index * 4096 };
            let wrong = if bad == Some(index) { 1 } else { 0 };
            if index % 2 == 0 {
                let mut payload = vec![0u8; LZ4_OUT];
                let len = ksave_format::codec::Lz4.encode(&pages, &mut payload).expect("these pages compress");
                payload.truncate(len);
                let hash = ksave_format::payload_hash(&payload) ^ wrong;
                // SAFETY: the fake memory above; each job names pages no other job does.
                unsafe {
                    queue
                        .submit::<()>(ram, &mut first, |d| {
                            d.bytes[512..512 + payload.len()].copy_from_slice(&payload);
                            d.pfns[..4].copy_from_slice(&pfns);
                            d.at = at;
                            d.job = Job::Coded { encoding: Encoding::Lz4, payload_at: 512, payload_len: payload.len() as u32, hash, pages: 4 };
                            Ok(())
                        })
                        .unwrap()
                };
            } else {
                for (&p, page) in pfns.iter().zip(pages.chunks(PAGE)) {
                    // SAFETY: the fake memory above; each job names pages no other job does.
                    unsafe { ram.write(p * PAGE as u64, page) };
                }
                let hash = ksave_format::payload_hash(&pages) ^ wrong;
                // SAFETY: the fake memory above; each job names pages no other job does.
                unsafe {
                    queue
                        .submit::<()>(ram, &mut first, |d| {
                            d.pfns[..4].copy_from_slice(&pfns);
                            d.at = at;
                            d.job = Job::CheckRaw { hash, pages: 4 };
                            Ok(())
                        })
                        .unwrap()
                };
            }
            let zero = Job::Zero { addr: (1000 + index) * PAGE as u64, len: PAGE as u64 };
            // SAFETY: the fake memory above; each job names pages no other job does.
            unsafe {
                queue
                    .submit::<()>(ram, &mut first, |d| {
                        d.job = zero;
                        Ok(())
                    })
                    .unwrap()
            };
        }
        // SAFETY: the fake memory above; each job names pages no other job does.
        unsafe { queue.settle(ram, &mut first) }
    }

    fn check_pages(ram: &Ram, chunks: u64) {
        for index in 0..chunks {
            for p in index * 8..index * 8 + 4 {
                assert_eq!(ram.page(p), page_of(p), "page {p}");
            }
            assert!(ram.page(1000 + index).iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn the_startup_page_is_a_whole_page_of_ram_below_1_mib_but_page_0_and_ksaves_own() {
        let r = |start, end| Range { start, end };
        let own = r(0x100_0000, 0x110_0000);
        assert_eq!(startup_page(&[r(0, 0x9fc00), r(0x100000, 0x2000000)], own), Some(0x1000));
        assert_eq!(startup_page(&[r(0x100000, 0x2000000), r(0x8800, 0xa000)], own), Some(0x9000));
        assert_eq!(startup_page(&[r(0x8800, 0x9f00), r(0x100000, 0x2000000)], own), None);
        assert_eq!(startup_page(&[r(0xff000, 0x200000)], own), Some(0xff000));
        assert_eq!(startup_page(&[], own), None);
        // Not in ksave's own pages.
        assert_eq!(startup_page(&[r(0, 0x9fc00)], r(0x1000, 0x3000)), Some(0x3000));
        assert_eq!(startup_page(&[r(0, 0x9fc00)], r(0, 0x9f000)), None);
    }

    #[test]
    fn the_loading_cpu_alone_runs_every_job() {
        let (queue, ram) = (Box::new(Queue::new()), Ram::new(1100));
        assert_eq!(submit_all(&queue, &ram, 40, None), None);
        check_pages(&ram, 40);
    }

    #[test]
    fn helpers_run_jobs_as_they_come_and_the_first_failure_is_reported() {
        for bad in [None, Some(3), Some(30)] {
            let (queue, ram) = (Box::new(Queue::new()), Ram::new(1100));
            let failure = std::thread::scope(|s| {
                for _ in 0..3 {
                    // SAFETY: the fake memory above; each job names pages no other job does.
                    s.spawn(|| unsafe { queue.serve(&ram) });
                }
                let failure = submit_all(&queue, &ram, 60, bad);
                queue.stop();
                failure
            });
            match bad {
                None => check_pages(&ram, 60),
                Some(b) => assert_eq!(failure, Some(Failure { at: ChunkAt { index: b, offset: b * 4096 }, what: "payload checksum" })),
            }
        }
    }

    #[test]
    fn a_helper_lost_mid_job_fails_the_load_instead_of_hanging() {
        let (queue, ram) = (Box::new(Queue::new()), Ram::new(8));
        let mut first = None;
        let at = ChunkAt { index: 5, offset: 5 * 4096 };
        // SAFETY: the fake memory above; each job names pages no other job does.
        unsafe {
            queue
                .submit::<()>(&ram, &mut first, |d| {
                    d.at = at;
                    d.job = Job::Zero { addr: 0, len: PAGE as u64 };
                    Ok(())
                })
                .unwrap()
        };
        // A helper claims it, then takes an exception.
        assert!(queue.slots.iter().any(|s| s.state.compare_exchange(READY, BUSY, Ordering::Acquire, Ordering::Relaxed).is_ok()));
        queue.helper_lost();
        // SAFETY: the fake memory above; each job names pages no other job does.
        assert_eq!(unsafe { queue.settle(&ram, &mut first) }, Some(Failure { at, what: "a helper CPU took an exception on it" }));
    }

    #[test]
    fn a_fill_that_fails_frees_its_slot() {
        let (queue, ram) = (Box::new(Queue::new()), Ram::new(8));
        let mut first = None;
        for _ in 0..3 * SLOTS {
            // SAFETY: the fake memory above; each job names pages no other job does.
            assert_eq!(unsafe { queue.submit(&ram, &mut first, |_| Err("io")) }, Err("io"));
        }
        // SAFETY: the fake memory above; each job names pages no other job does.
        assert_eq!(unsafe { queue.settle(&ram, &mut first) }, None);
    }

    /// Pages as a save meets them: runs of text, noise and zeros, so that
    /// groups compress, fail and back off, with zero pages between.
    fn save_memory(pages: u64) -> Vec<[u8; PAGE]> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..pages)
            .map(|pfn| {
                let mut page = [0u8; PAGE];
                match (pfn / 151) % 3 {
                    0 => page.iter_mut().enumerate().for_each(|(i, b)| *b = b"ksave writes pages "[(i + pfn as usize) % 19]),
                    1 => page.chunks_mut(8).for_each(|c| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        c.copy_from_slice(&x.to_le_bytes())
                    }),
                    _ if pfn % 2 == 0 => {}
                    _ => page[pfn as usize % PAGE] = 1,
                }
                page
            })
            .collect()
    }

    struct Pages(Vec<[u8; PAGE]>);

    impl Memory for Pages {
        fn page(&self, pfn: u64) -> Option<&[u8; PAGE]> {
            self.0.get(pfn as usize)
        }
    }


    /// A store in a Vec: raw chunks' pages copied from where they lie; the
    /// writes it took.
    struct Image<'m>(Vec<u8>, &'m Pages, usize);

    impl Sink for Image<'_> {
        type Error = ();
        fn write_raw(&mut self, offset: u64, header: &[u8], pfns: &[u64]) -> Result<(), ()> {
            let bytes: Vec<u8> = header.iter().copied().chain(pfns.iter().flat_map(|&p| self.1.0[p as usize])).collect();
            self.write_bytes(offset, &bytes)
        }
        fn write_bytes(&mut self, offset: u64, bytes: &[u8]) -> Result<(), ()> {
            self.2 += 1;
            let end = offset as usize + bytes.len();
            if self.0.len() < end {
                self.0.resize(end, 0);
            }
            self.0[offset as usize..end].copy_from_slice(bytes);
            Ok(())
        }
    }

    /// Every page of `mem` through a writer coding with `coder`, chunks
    /// gathered in `write_behind` if given; the image and the writes it took.
    fn write_all(mem: &Pages, coder: &mut dyn GroupCoder, write_behind: Option<&mut [u8]>) -> Result<(Vec<u8>, Totals, usize), WriteError<()>> {
        write_sealed(mem, true, coder, write_behind, None)
    }

    /// [`write_all`], coding groups if `code_groups`, sealed if `seal`.
    fn write_sealed(mem: &Pages, code_groups: bool, coder: &mut dyn GroupCoder, write_behind: Option<&mut [u8]>, seal: Option<(&Seal, &mut dyn ChunkSealer)>) -> Result<(Vec<u8>, Totals, usize), WriteError<()>> {
        let mut raw_header = [0u8; PAGE];
        let mut image = Image(Vec::new(), mem, 0);
        // The sealer's borrow shortened to the header's.
        let seal = seal.map(|(seal, sealer)| (seal, sealer as &mut dyn ChunkSealer));
        let mut w = Writer::new(7, 1 << 30, 512, code_groups, WriterBuffers { raw_header: &mut raw_header, coder: Some(coder), write_behind, seal });
        for pfn in 0..mem.0.len() as u64 {
            w.add_page(pfn, mem, &mut image)?;
        }
        let totals = w.finish(&mut image)?;
        Ok((image.0, totals, image.2))
    }

    #[test]
    fn a_save_coded_on_every_cpu_is_the_image_coded_on_one() {
        let mem = Pages(save_memory(3000));
        let (mut lz4, mut groups) = (Lz4, Box::new([GroupBuffers::EMPTY; GROUPS_IN_FLIGHT + 1]));
        let (one, one_totals, one_writes) = write_all(&mem, &mut Inline::new(&mut lz4, &mut groups), None).unwrap();
        assert!(one_totals.pages_lz4 > 0 && one_totals.pages_lz4_skipped > 0 && one_totals.pages_zero > 0, "{one_totals:?}");
        for_every_helper_count(|helpers| {
            let queue = Box::new(Queue::new());
            let (image, totals, writes) = served(&queue, helpers, || {
                // SAFETY: this thread alone submits; coding jobs touch their slots only.
                write_all(&mem, &mut unsafe { QueueCoder::new(&queue) }, Some(&mut [0u8; 128 << 10])).unwrap()
            });
            assert_eq!(totals, one_totals, "{helpers} helpers");
            assert!(image == one, "{helpers} helpers, chunks gathered for the disk: the images differ");
            assert!(writes * 4 < one_writes, "{writes} writes gathered, {one_writes} not");
            let (by_helpers, by_saver) = queue.jobs_run();
            // Every page not skipped was in one group coded (a group cut short by a skip or the end holds fewer).
            let (jobs, tried) = (u64::from(by_helpers + by_saver), totals.pages_stored - totals.pages_lz4_skipped);
            assert!((tried.div_ceil(LZ4_GROUP as u64)..=tried).contains(&jobs), "{jobs} jobs for {tried} pages");
            by_helpers
        });
    }

    /// Runs `save` with 0, 1 and 3 helper threads; `save` returns how many
    /// jobs the helpers ran. A helper scheduled late may find every job
    /// done (the host's CPUs are shared with other tests): a save is tried
    /// again (each checked by `save`) until helpers ran a job.
    fn for_every_helper_count(mut save: impl FnMut(usize) -> u32) {
        for helpers in [0, 1, 3] {
            let mut attempt = 1;
            while save(helpers) == 0 && helpers > 0 {
                assert!(attempt < ATTEMPTS, "{helpers} helpers ran no job in {ATTEMPTS} saves");
                attempt += 1;
            }
        }
    }

    /// Runs `save` on this thread while `helpers` threads serve `queue`,
    /// started together (else, fast, the save may be over before one
    /// serves); stops them after.
    fn served<R: Send>(queue: &Queue, helpers: usize, save: impl FnOnce() -> R) -> R {
        let serving = Barrier::new(helpers + 1);
        std::thread::scope(|s| {
            for _ in 0..helpers {
                s.spawn(|| {
                    serving.wait();
                    // SAFETY: a save's jobs touch their slots and chunks only.
                    unsafe { queue.serve(&NO_MEMORY) }
                });
            }
            serving.wait();
            let saved = save();
            queue.stop();
            saved
        })
    }

    /// Saves tried per helper count until helpers ran a job.
    const ATTEMPTS: usize = 200;

    fn sealed_chunks() -> Box<[SealedChunk]> {
        vec![[0u8; size_of::<SealedChunk>()]; CHUNKS_SEALING].into_boxed_slice()
    }

    #[test]
    fn a_save_sealed_on_every_cpu_is_the_image_sealed_on_one() {
        let mem = Pages(save_memory(1000));
        let seal = Seal::new(&DataKey([0x5e; 32]));
        for code_groups in [false, true] {
            let (mut lz4, mut groups) = (Lz4, Box::new([GroupBuffers::EMPTY; GROUPS_IN_FLIGHT + 1]));
            let mut chunk = sealed_chunks();
            let mut inline = InlineSealer::new(&seal, &mut chunk[0]);
            let (one, one_totals, _) = write_sealed(&mem, code_groups, &mut Inline::new(&mut lz4, &mut groups), None, Some((&seal, &mut inline))).unwrap();
            assert!(one_totals.flags & FLAG_SEALED != 0 && one_totals.pages_stored > 5 * SEALED_RAW_PAGES as u64, "{one_totals:?}");
            for_every_helper_count(|helpers| {
                let queue = Box::new(Queue::new());
                let mut chunks = sealed_chunks();
                let (image, totals, _) = served(&queue, helpers, || {
                    // SAFETY: this thread alone submits; the chunks are the
                    // sealer's; the helpers stop after the sealer goes.
                    let (mut coder, mut sealer) = unsafe { (QueueCoder::new(&queue), QueueSealer::new(&queue, &seal, (&mut chunks[..]).try_into().unwrap())) };
                    write_sealed(&mem, code_groups, &mut coder, Some(&mut [0u8; 128 << 10]), Some((&seal, &mut sealer))).unwrap()
                });
                assert_eq!(totals, one_totals, "{helpers} helpers, groups coded: {code_groups}");
                assert!(image == one, "{helpers} helpers, groups coded: {code_groups}: the images differ");
                let (by_helpers, by_saver) = queue.jobs_run();
                if !code_groups {
                    // Every raw chunk was a job: no coder held the slots.
                    assert_eq!(u64::from(by_helpers + by_saver), totals.chunks - (totals.pages_free > 0) as u64, "{totals:?}");
                }
                by_helpers
            });
        }
    }

    #[test]
    fn a_helper_lost_while_sealing_fails_the_save_instead_of_hanging() {
        let queue = Box::new(Queue::new());
        let seal = Seal::new(&DataKey([0x5e; 32]));
        let mut chunks = sealed_chunks();
        // SAFETY: this thread alone submits; the chunks are the sealer's;
        // no helper runs.
        let mut sealer = unsafe { QueueSealer::new(&queue, &seal, (&mut chunks[..]).try_into().unwrap()) };
        sealer.filling().fill(7);
        sealer.start(0, 4);
        assert!(queue.slots.iter().any(|s| s.state.compare_exchange(READY, BUSY, Ordering::Acquire, Ordering::Relaxed).is_ok()));
        queue.helper_lost();
        assert_eq!(sealer.finished().err(), Some("a helper CPU took an exception"));
    }

    #[test]
    fn a_helper_lost_while_coding_fails_the_save_instead_of_hanging() {
        let queue = Box::new(Queue::new());
        // SAFETY: this thread alone submits; coding jobs touch their slots only.
        let mut coder = unsafe { QueueCoder::new(&queue) };
        coder.gathering().pages.fill(7);
        coder.start(LZ4_GROUP);
        // A helper claims the group, then takes an exception.
        assert!(queue.slots.iter().any(|s| s.state.compare_exchange(READY, BUSY, Ordering::Acquire, Ordering::Relaxed).is_ok()));
        queue.helper_lost();
        assert_eq!(coder.finished().err(), Some("a helper CPU took an exception"));
    }
}
