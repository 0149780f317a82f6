//! In-memory fakes of what ksave runs on: physical memory (a `Vec<u8>`
//! indexed by physical address, which panics on a write outside the pages
//! it was told may be written), an image store (a `Vec<u8>` whose device
//! DMAs into that memory, with injectable read and write errors), a clock,
//! and one machine's memory map; plus a save and a resume driven through
//! `ksave_core` as ksave drives them.
#![allow(dead_code)] // each test binary uses its own part
#![allow(clippy::result_large_err)] // ksave_core's reasons, returned as it returns them

use std::cell::{Ref, RefCell};
use std::collections::BTreeMap;
use std::fmt;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use bootinfo::kexec::Coverage;
use ksave_core::helpers::{CHUNKS_SEALING, Queue, QueueCoder, QueueSealer, SharedMemory};
use ksave_core::resume::{self, DmaSource, Helpers, Machine, PhysMemory, READ_AHEAD, Refused, Resumed, Started, WhenRefused};
use ksave_core::save::{Failure, FoundPartition, HostPartition, Stages, Summary, check_claim};
use ksave_format::chunk::{ChunkInfo, LZ4_GROUP, LZ4_OUT, SealedChunk};
use ksave_format::seal::{DataKey, Seal};
use ksave_format::commit::{self, Device, FreePages, Plan};
use ksave_format::header::{Header, META_BYTES, State};
use ksave_format::reader::{self, Source};
use ksave_format::store::Claim;
use ksave_format::writer::{self, ChunkSealer, Memory, Sink};
use ksave_format::{BackupPair, PAGE, Range};

/// The machine's address space: 8 MiB.
pub const SIZE: usize = 8 << 20;
/// Its RAM, page 0 included, with holes (firmware, MMIO) between.
pub const RAM: [Range; 2] = [Range { start: 0, end: 0x9_f000 }, Range { start: 0x10_0000, end: 0x70_0000 }];
/// Its ACPI NVS, apart from the RAM.
pub const NVS: [Range; 1] = [Range { start: 0x7f_0000, end: 0x7f_4000 }];
/// ksave's own load range, inside the RAM.
pub const OWN: Range = Range { start: 0x20_0000, end: 0x28_0000 };
/// The CPU vendor of the machine.
pub const VENDOR: [u8; 12] = *b"AuthenticAMD";
/// Its ACPI hardware signature.
pub const FACS: u32 = 0x1234_5678;
/// The attempt's nonce.
pub const NONCE: u64 = 0x5eed_1234_abcd_0042;
/// The saved kernel's re-entry address and GDT.
pub const REENTRY: u64 = 0x3f_e123;
pub const GDT: (u64, u16) = (0xffff_8880_1f40_9000, 127);
/// Where the host saw the partition: LBA 2048.
pub const FIRST_SECTOR: u64 = 2048;
/// The partition's size.
pub const CAPACITY: usize = 8 << 20;
/// The claim `ksave setup` wrote on the store, as the config names it.
pub const CLAIM: Claim = Claim { id: [0x5a; 16], disk: [0xd1; 16] };

/// The pages the jump displaced: exactly ksave's, from a spot in RAM.
pub fn backup() -> Vec<BackupPair> {
    OWN.pages().enumerate().map(|(i, pfn)| BackupPair { dest: pfn * PAGE as u64, src: 0x60_0000 + (i * PAGE) as u64 }).collect()
}

/// An exact backup map's coverage of ksave's pages.
pub fn exact() -> Coverage {
    let pages = OWN.pages().count();
    Coverage { pairs: pages, outside: 0, duplicates: 0, uncovered: 0, sources_inside: 0, in_place: 0 }
}

/// This machine as a resume sees it.
pub fn machine() -> Machine<'static> {
    Machine { ram: &RAM, nvs: &NVS, cpu_vendor: VENDOR, la57: false, facs_signature: Ok(FACS), own: OWN, reach: 1 << 32 }
}

/// Whether `addr` lies in the machine's RAM or NVS.
pub fn in_memory(addr: u64) -> bool {
    RAM.iter().chain(&NVS).any(|r| r.contains(addr))
}

/// A microsecond clock that moves a millisecond a call.
pub fn clock() -> u64 {
    static NOW: AtomicU64 = AtomicU64::new(0);
    NOW.fetch_add(1000, Ordering::Relaxed) + 1000
}

pub fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// Physical memory: [`SIZE`] bytes from address 0. Writes (by the CPU or
/// by the store's DMA) must fall in `writable`, else the test panics.
#[derive(Clone)]
pub struct Ram {
    bytes: Rc<RefCell<Vec<u8>>>,
    writable: Rc<RefCell<Vec<Range>>>,
}

impl Ram {
    /// Memory that holds nothing but noise, as a fresh boot leaves it:
    /// writable nowhere.
    pub fn garbage(seed: u64) -> Self {
        let mut rng = xorshift(seed);
        let mut bytes = vec![0u8; SIZE];
        bytes.chunks_exact_mut(8).for_each(|w| w.copy_from_slice(&rng().to_le_bytes()));
        Self { bytes: Rc::new(RefCell::new(bytes)), writable: Rc::new(RefCell::new(Vec::new())) }
    }

    /// Memory a resume may write: the machine's RAM and NVS outside
    /// ksave's own range.
    pub fn resume_target(seed: u64) -> Self {
        let ram = Self::garbage(seed);
        let mut writable = Vec::new();
        for r in RAM.iter().chain(&NVS) {
            for (s, e) in [(r.start, r.end.min(OWN.start)), (r.start.max(OWN.end), r.end)] {
                if s < e {
                    writable.push(Range { start: s, end: e });
                }
            }
        }
        *ram.writable.borrow_mut() = writable;
        ram
    }

    /// A running kernel's memory, to be saved: in runs of 16 pages, zero
    /// pages, text (LZ4 pays) and noise (it does not), as real memory
    /// comes; outside the RAM and NVS, and in ksave's range, noise.
    pub fn kernel(seed: u64) -> Self {
        let ram = Self::garbage(!seed);
        let mut rng = xorshift(seed);
        let mut kind = 0;
        {
            let mut bytes = ram.bytes.borrow_mut();
            for pfn in RAM.iter().chain(&NVS).flat_map(|r| r.pages()) {
                if OWN.contains(pfn * PAGE as u64) {
                    continue;
                }
                if pfn % 16 == 0 {
                    kind = rng() % 3;
                }
                let page = &mut bytes[pfn as usize * PAGE..][..PAGE];
                match kind {
                    0 => page.fill(0),
                    1 => {
                        let line = format!("pfn {pfn:#x}: the quick brown fox jumps over the lazy dog\n");
                        page.iter_mut().zip(line.bytes().cycle()).for_each(|(b, c)| *b = c);
                    }
                    _ => {} // noise already
                }
            }
        }
        ram
    }

    /// All of it, as it is now.
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.borrow().clone()
    }

    /// The page at `pfn`.
    pub fn page(&self, pfn: u64) -> Vec<u8> {
        self.bytes.borrow()[pfn as usize * PAGE..][..PAGE].to_vec()
    }

    /// Reading the pages being saved, as a save's [`Memory`]; page `hole`
    /// (if any) cannot be reached.
    pub fn reader(&self, hole: Option<u64>) -> Pages<'_> {
        Pages { bytes: self.bytes.borrow(), hole }
    }

    fn check_writable(&self, addr: u64, len: u64) {
        let ok = self.writable.borrow().iter().any(|r| r.start <= addr && addr + len <= r.end);
        assert!(ok, "write of {len:#x} bytes at {addr:#x}: not memory a resume may write");
    }

    /// Writes `data` at `addr` as a device does (DMA), checked like the CPU's writes.
    pub fn dma(&self, addr: u64, data: &[u8]) {
        self.check_writable(addr, data.len() as u64);
        self.bytes.borrow_mut()[addr as usize..][..data.len()].copy_from_slice(data);
    }
}

impl PhysMemory for Ram {
    unsafe fn zero(&mut self, addr: u64, len: u64) {
        self.check_writable(addr, len);
        self.bytes.borrow_mut()[addr as usize..][..len as usize].fill(0);
    }

    unsafe fn write(&mut self, addr: u64, data: &[u8]) {
        self.dma(addr, data);
    }

    unsafe fn read(&self, addr: u64, buf: &mut [u8]) {
        assert!(in_memory(addr), "read at {addr:#x}: not RAM or NVS");
        buf.copy_from_slice(&self.bytes.borrow()[addr as usize..][..buf.len()]);
    }
}

/// The pages of a [`Ram`], as a save reads them.
pub struct Pages<'a> {
    bytes: Ref<'a, Vec<u8>>,
    hole: Option<u64>,
}

impl Memory for Pages<'_> {
    fn page(&self, pfn: u64) -> Option<&[u8; PAGE]> {
        if Some(pfn) == self.hole || (pfn as usize + 1) * PAGE > SIZE {
            return None;
        }
        Some(self.bytes[pfn as usize * PAGE..][..PAGE].try_into().unwrap())
    }
}

/// A store's I/O error: at this byte of the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoError(pub u64);

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "I/O error at byte {}", self.0)
    }
}

/// The image store: a partition in a `Vec`, on a disk whose device reads
/// and writes `ram` by DMA. Every access must be whole `align`-byte blocks.
pub struct Store {
    pub bytes: Vec<u8>,
    pub align: u32,
    pub ram: Ram,
    /// A read (or DMA into memory) that covers this byte fails.
    pub fail_read_at: Option<u64>,
    /// A write that covers this byte fails.
    pub fail_write_at: Option<u64>,
    /// The header's state at each flush (`None`: no header).
    pub flushes: Vec<Option<State>>,
    /// Pages the device read straight into memory.
    pub dma_pages: usize,
    /// Reads into buffers (each a disk command).
    pub reads: usize,
}

impl Store {
    /// An empty store of `capacity` bytes on a disk of `align`-byte blocks,
    /// whose DMA reaches `ram`, as `ksave setup` leaves it: zeros under a
    /// header that carries [`CLAIM`].
    pub fn new(capacity: usize, align: u32, ram: &Ram) -> Self {
        let mut bytes = vec![0; capacity];
        Header::claiming(CLAIM, "claimed by ksave setup").encode((&mut bytes[..PAGE]).try_into().unwrap());
        Self { bytes, align, ram: ram.clone(), fail_read_at: None, fail_write_at: None, flushes: Vec::new(), dma_pages: 0, reads: 0 }
    }

    /// The image header, if there is one.
    pub fn header(&self) -> Option<Header> {
        Header::decode(self.bytes[..PAGE].try_into().unwrap()).ok()
    }

    /// Rewrites the header with `change` made.
    pub fn change_header(&mut self, change: impl FnOnce(&mut Header)) {
        let mut h = self.header().expect("an image header");
        change(&mut h);
        h.encode((&mut self.bytes[..PAGE]).try_into().unwrap());
    }

    /// The image's chunks, as a check of it finds them.
    pub fn chunks(&self) -> Vec<ChunkInfo> {
        struct Chunks(Vec<ChunkInfo>);
        impl<S: Source> reader::Visitor<S> for Chunks {
            fn chunk(&mut self, info: &ChunkInfo) {
                self.0.push(*info);
            }
        }
        let mut src = &self.bytes[..];
        let mut bufs = Bufs::new();
        let header = reader::read_header(&mut src, &mut bufs.block).unwrap();
        if header.sealed() {
            bufs = Bufs::sealed();
        }
        let meta_buf = (&mut bufs.pages[..ksave_format::header::META_BLOCKS as usize * PAGE]).try_into().unwrap();
        let saved = reader::Saved::of(&reader::read_meta(&mut src, &header, meta_buf).unwrap(), &header);
        let mut chunks = Chunks(Vec::new());
        let seal = bufs.seal.as_mut().map(|(s, c)| (*s, &mut **c));
        let rb = reader::Buffers { header: &mut bufs.chunk_header, lz4_in: &mut bufs.coded, lz4_out: &mut bufs.pages, seal };
        reader::visit_chunks(&mut src, &header, &saved, rb, &mut chunks).unwrap();
        chunks.0
    }

    fn blocks(&self, offset: u64, len: usize) {
        let align = self.align as u64;
        assert!(offset.is_multiple_of(align) && (len as u64).is_multiple_of(align), "{len} bytes at {offset}: not whole {align}-byte blocks");
        assert!(offset as usize + len <= self.bytes.len(), "{len} bytes at {offset}: beyond the store");
    }

    fn fails(at: Option<u64>, offset: u64, len: usize) -> Result<(), IoError> {
        match at {
            Some(at) if (offset..offset + len as u64).contains(&at) => Err(IoError(at)),
            _ => Ok(()),
        }
    }
}

impl Source for Store {
    type Error = IoError;

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.blocks(offset, buf.len());
        self.reads += 1;
        Self::fails(self.fail_read_at, offset, buf.len())?;
        buf.copy_from_slice(&self.bytes[offset as usize..][..buf.len()]);
        Ok(())
    }
}

impl DmaSource for Store {
    unsafe fn read_into_pages(&mut self, offset: u64, pfns: &[u64]) -> Result<(), IoError> {
        self.blocks(offset, pfns.len() * PAGE);
        Self::fails(self.fail_read_at, offset, pfns.len() * PAGE)?;
        for (i, pfn) in pfns.iter().enumerate() {
            self.ram.dma(pfn * PAGE as u64, &self.bytes[offset as usize + i * PAGE..][..PAGE]);
        }
        self.dma_pages += pfns.len();
        Ok(())
    }
}

impl Sink for Store {
    type Error = IoError;

    fn write_raw(&mut self, offset: u64, header: &[u8], pfns: &[u64]) -> Result<(), IoError> {
        let len = header.len() + pfns.len() * PAGE;
        self.blocks(offset, len);
        Self::fails(self.fail_write_at, offset, len)?;
        let at = offset as usize;
        self.bytes[at..at + header.len()].copy_from_slice(header);
        for (i, pfn) in pfns.iter().enumerate() {
            let page = self.ram.page(*pfn);
            self.bytes[at + header.len() + i * PAGE..][..PAGE].copy_from_slice(&page);
        }
        Ok(())
    }

    fn write_bytes(&mut self, offset: u64, bytes: &[u8]) -> Result<(), IoError> {
        self.blocks(offset, bytes.len());
        Self::fails(self.fail_write_at, offset, bytes.len())?;
        self.bytes[offset as usize..][..bytes.len()].copy_from_slice(bytes);
        Ok(())
    }
}

impl Device for Store {
    fn flush(&mut self) -> Result<(), IoError> {
        let state = self.header().map(|h| h.state);
        self.flushes.push(state);
        Ok(())
    }
}

/// Every buffer a save or a resume works in, as ksave keeps them.
pub struct Bufs {
    pub block: Box<[u8; PAGE]>,
    pub chunk_header: Box<[u8; PAGE]>,
    pub coded: Box<[u8; LZ4_OUT]>,
    pub pages: Box<[u8; LZ4_GROUP * PAGE]>,
    pub read_ahead: Box<[u8; READ_AHEAD]>,
    /// A sealed image's cipher and raw chunk (the resume's).
    pub seal: Option<(&'static Seal, Box<SealedChunk>)>,
    /// The save's coder and a sealed image's sealer, as ksave runs them
    /// (on this thread alone), on one queue.
    pub coder: QueueCoder<'static>,
    pub sealer: Option<QueueSealer<'static>>,
    queue: &'static Queue,
}

/// A fresh queue for a save, served by this thread alone.
pub fn save_queue() -> &'static Queue {
    Box::leak(Box::new(Queue::new()))
}

/// A save's coder on `queue`.
pub fn queue_coder(queue: &'static Queue) -> QueueCoder<'static> {
    // SAFETY: a fresh queue, which only this coder's thread submits to.
    unsafe { QueueCoder::new(queue) }
}

impl Bufs {
    pub fn new() -> Self {
        let boxed = |n| vec![0u8; n].into_boxed_slice();
        let queue = save_queue();
        Self {
            block: boxed(PAGE).try_into().unwrap(),
            chunk_header: boxed(PAGE).try_into().unwrap(),
            coded: boxed(LZ4_OUT).try_into().unwrap(),
            pages: boxed(LZ4_GROUP * PAGE).try_into().unwrap(),
            read_ahead: boxed(READ_AHEAD).try_into().unwrap(),
            seal: None,
            coder: queue_coder(queue),
            sealer: None,
            queue,
        }
    }

    /// The buffers of a sealed image's save or resume, under [`DATA_KEY`].
    pub fn sealed() -> Self {
        let chunk = vec![0u8; size_of::<SealedChunk>()].into_boxed_slice().try_into().unwrap();
        let seal: &'static Seal = Box::leak(Box::new(Seal::new(&DataKey(DATA_KEY))));
        let chunks = Box::leak(vec![0u8; CHUNKS_SEALING * size_of::<SealedChunk>()].into_boxed_slice()).as_mut_ptr();
        let bufs = Self::new();
        // SAFETY: the queue is the coder's, on this thread alone; the
        // chunks are leaked, CHUNKS_SEALING of them (u8 arrays: any
        // alignment), and the sealer's alone.
        let sealer = unsafe { QueueSealer::new(bufs.queue, seal, &mut *chunks.cast()) };
        Self { seal: Some((seal, chunk)), sealer: Some(sealer), ..bufs }
    }

    pub fn resume(&mut self) -> resume::Buffers<'_> {
        let seal = self.seal.as_mut().map(|(s, c)| (*s, &mut **c));
        resume::Buffers { block: &mut self.block, chunk_header: &mut self.chunk_header, coded: &mut self.coded, pages: &mut self.pages, seal, read_ahead: &mut self.read_ahead }
    }

    pub fn save(&mut self) -> commit::Buffers<'_> {
        commit::Buffers {
            block: &mut self.block,
            meta: (&mut self.pages[..META_BYTES]).try_into().unwrap(),
            scratch: (&mut self.coded[..META_BYTES]).try_into().unwrap(),
            writer: writer::Buffers {
                raw_header: &mut self.chunk_header,
                coder: Some(&mut self.coder),
                write_behind: Some(&mut self.read_ahead[..]),
                seal: self.seal.as_ref().zip(self.sealer.as_mut()).map(|((s, _), c)| (*s, c as &mut dyn ChunkSealer)),
            },
        }
    }
}

/// Free blocks by their first page: (first pfn, pages).
pub struct Blocks(pub BTreeMap<u64, u64>);

impl FreePages for Blocks {
    fn free_block(&mut self, pfn: u64) -> Option<u64> {
        self.0.get(&pfn).copied()
    }
}

/// A few blocks the saved kernel holds free, of 1 to 32 pages, all in RAM
/// (and some in the middle of noise, so that they are not zero pages).
pub fn free_blocks() -> Blocks {
    Blocks(BTreeMap::from([(0x10, 1), (0x120, 8), (0x300, 32), (0x3f0, 16), (0x5ff, 1), (0x6e0, 32)]))
}

/// The rule code [`free_blocks`] stands for in a header.
pub const FREE_RULE: u32 = 2;

/// The plan of a save of [`Ram::kernel`] memory on this machine, into a
/// store of `capacity` bytes of `align`-byte blocks.
pub fn plan(backup: &[BackupPair], lz4: bool, capacity: usize, align: u32) -> Plan<'_> {
    Plan {
        nonce: NONCE,
        created_unix: 1_700_000_000,
        lz4,
        capacity: capacity as u64,
        align,
        ram: &RAM,
        nvs: &NVS,
        image: OWN,
        backup,
        reentry: REENTRY,
        info: "test host 6.12",
        cpu_vendor: VENDOR,
        return_gdt: GDT,
        cr4_needed: 1 << 5,
        facs_signature: Some(FACS),
        iommu_left_on: false,
        free_rule: 0,
        filesystems: &[],
        sealed: false,
        free_as_found: false,
    }
}

/// The proof that `store` carries [`CLAIM`].
pub fn claimed(store: &Store) -> ksave_format::store::Claimed {
    check_claim(store.bytes[..PAGE].try_into().unwrap(), CLAIM.disk, &CLAIM).expect("a claimed store")
}

/// The stages of a save by `plan` into `store`, which the host saw where
/// it is, with an exact backup map and all memory in reach.
pub fn stages<'a>(plan: Plan<'a>, store: &Store) -> Stages<'a> {
    let block_size = store.align;
    let sectors = store.bytes.len() as u64 / 512;
    Stages {
        plan,
        claimed: claimed(store),
        found: FoundPartition { first_lba: FIRST_SECTOR * 512 / block_size as u64, blocks: sectors * 512 / block_size as u64, block_size },
        host: HostPartition { first_sector: FIRST_SECTOR, sectors },
        reach: 1 << 32,
        backup: Ok(exact()),
        started_us: clock(),
    }
}

/// A save of `ram` through the stages, as ksave runs it: the stages, then
/// the image with `free`'s pages left out.
pub fn save(stages: Stages, store: &mut Store, ram: &Ram, hole: Option<u64>, free: &mut dyn FreePages, free_rule: u32) -> Result<Summary, Failure> {
    save_counting(stages, store, ram, hole, free, &mut commit::NoneFree, free_rule)
}

/// [`save`], counting what the save needs with `counting` (a second walk
/// of the free pages) where the store is smaller than the worst case.
pub fn save_counting(stages: Stages, store: &mut Store, ram: &Ram, hole: Option<u64>, free: &mut dyn FreePages, counting: &mut dyn FreePages, free_rule: u32) -> Result<Summary, Failure> {
    let ready = stages.check()?;
    let mut bufs = Bufs::new();
    ready.write(store, &ram.reader(hole), free, counting, free_rule, bufs.save(), clock)
}

/// The usual save: [`Ram::kernel`]'s memory with [`free_blocks`] left out.
pub fn saved_image(seed: u64, lz4: bool, align: u32) -> (Ram, Store, Summary) {
    let ram = Ram::kernel(seed);
    let mut store = Store::new(CAPACITY, align, &ram);
    let backup = backup();
    let summary = save(stages(plan(&backup, lz4, CAPACITY, align), &store), &mut store, &ram, None, &mut free_blocks(), FREE_RULE).expect("the save");
    (ram, store, summary)
}

/// Moves the image in `store` onto this machine's disk, whose DMA reaches `ram`.
pub fn onto(store: &Store, ram: &Ram) -> Store {
    Store { bytes: store.bytes.clone(), align: store.align, ram: ram.clone(), fail_read_at: None, fail_write_at: None, flushes: Vec::new(), dma_pages: 0, reads: 0 }
}

/// A resume of the image on `store` into `ram`, on `machine`.
pub fn resume(store: &mut Store, machine: &Machine, ram: &mut Ram, when_refused: WhenRefused) -> Result<Resumed, Refused> {
    resume_with(store, machine, ram, when_refused, false)
}

/// [`resume`], `helped` through the helpers' queue: every check, decode
/// and large zeroing is handed over as a job (run by the loading thread
/// itself, there being no other here; the queue's own tests run helper
/// threads), so that failures arrive late, as from another CPU.
pub fn resume_with(store: &mut Store, machine: &Machine, ram: &mut Ram, when_refused: WhenRefused, helped: bool) -> Result<Resumed, Refused> {
    resume_in(&mut Bufs::new(), store, machine, ram, when_refused, helped)
}

/// The key a sealed image is saved and resumed under ([`Bufs::sealed`]).
pub const DATA_KEY: [u8; 32] = [0x5e; 32];

/// [`resume_with`] in `bufs` (a sealed image's: [`Bufs::sealed`]).
pub fn resume_in(bufs: &mut Bufs, store: &mut Store, machine: &Machine, ram: &mut Ram, when_refused: WhenRefused, helped: bool) -> Result<Resumed, Refused> {
    let mut helpers = LoneQueue { queue: Box::new(Queue::new()), ram: SharedRam(ram.clone()), started: false, stand_in_was: Vec::new() };
    let lone: Option<&mut dyn Helpers> = if helped { Some(&mut helpers) } else { None };
    // SAFETY: `ram` is a fake: every address is an index into a Vec, every
    // write is checked to fall in the RAM and NVS outside ksave's range,
    // and `machine` describes no other memory.
    let resumed = unsafe { resume::check_and_load(store, machine, ram, bufs.resume(), clock, when_refused, lone) };
    if helpers.started {
        helpers.park();
    }
    resumed
}

/// The page a [`LoneQueue`] "starts CPUs from" (the lowest RAM page from
/// 4 KiB on, as ksave picks it) and its stand-in, outside the memory map.
const HELD: (u64, u64) = (1, 0x78_0000 / PAGE as u64);

/// The helpers' queue with no helper.
struct LoneQueue {
    queue: Box<Queue>,
    ram: SharedRam,
    started: bool,
    /// The stand-in page as it was before the load.
    stand_in_was: Vec<u8>,
}

impl Helpers for LoneQueue {
    unsafe fn start(&mut self, _: &Machine) -> Option<Started<'_>> {
        assert!(!self.started, "started twice");
        self.started = true;
        // The stand-in is the helpers' to fill.
        let at = HELD.1 * PAGE as u64;
        self.ram.0.writable.borrow_mut().push(Range { start: at, end: at + PAGE as u64 });
        self.stand_in_was = self.ram.0.bytes.borrow()[at as usize..][..PAGE].to_vec();
        Some(Started { queue: &self.queue, mem: &self.ram, held: Some(HELD) })
    }
}

impl LoneQueue {
    /// What ksave does once the other CPUs are parked: the held page from
    /// its stand-in, which goes back as it was.
    fn park(&mut self) {
        let ram = &self.ram.0;
        let (page, stand_in) = (HELD.0 as usize * PAGE, HELD.1 as usize * PAGE);
        ram.writable.borrow_mut().pop();
        let mut bytes = ram.bytes.borrow_mut();
        bytes.copy_within(stand_in..stand_in + PAGE, page);
        bytes[stand_in..stand_in + PAGE].copy_from_slice(&self.stand_in_was);
    }
}

/// A [`Ram`] reached through a shared reference.
struct SharedRam(Ram);

// SAFETY: no thread besides the loading one is started (LoneQueue).
unsafe impl Sync for SharedRam {}

impl SharedMemory for SharedRam {
    unsafe fn zero(&self, addr: u64, len: u64) {
        self.0.dma(addr, &vec![0; len as usize]);
    }

    unsafe fn write(&self, addr: u64, data: &[u8]) {
        self.0.dma(addr, data);
    }

    unsafe fn read(&self, addr: u64, buf: &mut [u8]) {
        if addr / PAGE as u64 == HELD.1 {
            // The stand-in, outside the memory map.
            buf.copy_from_slice(&self.0.bytes.borrow()[addr as usize..][..buf.len()]);
            return;
        }
        // SAFETY: passed on.
        unsafe { PhysMemory::read(&self.0, addr, buf) }
    }
}
