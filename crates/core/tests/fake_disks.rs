//! Whole saves and whole resumes through a real disk driver on the
//! register-level fakes (`diskdrv --features fakes`): the core's stages and
//! `check_and_load` over a `ksave_core::store::DiskStore` on an AHCI disk,
//! a 4Kn NVMe namespace and a virtio-blk device, as ksave drives them.
//!
//! The fakes' devices do their DMA through host pointers (a "physical
//! address" is the address of the byte in this process), so physical memory
//! here is a real mapping below 2 GiB: its RAM ranges are pieces of it,
//! ksave's own range a hole in it, and the addresses in the image's plan
//! are those of its bytes.
#![allow(clippy::result_large_err)] // ksave_core's reasons, returned as it returns them

mod common;

use std::collections::BTreeMap;

use bootinfo::kexec::Coverage;
use common::{FACS, GDT, NONCE, REENTRY, VENDOR, clock, xorshift};
use diskdrv::ahci::{AhciDisk, AhciMemory};
use diskdrv::fakes::{self, FakeHal, Hba, Machine as FakeMachine, Namespace, NvmeController, VirtioBlkDevice, VirtioSetup};
use diskdrv::nvme::{NvmeDisk, NvmeMemory};
use diskdrv::pci::Address;
use diskdrv::virtio::{Transport, VirtioBlk, VirtioMemory};
use diskdrv::BlockDevice;
use ksave_core::resume::{self, Machine, PhysMemory, READ_AHEAD, Refused, Resumed, WhenRefused};
use ksave_core::save::{Failure, FoundPartition, HostPartition, Stages, Summary};
use ksave_core::store::DiskStore;
use ksave_format::chunk::{LZ4_GROUP, LZ4_OUT};
use ksave_format::commit::{self, FreePages, Plan};
use ksave_format::header::{Header, META_BYTES, State};
use ksave_format::store::{Extent, StoreMap};
use ksave_format::verdict::Refusal;
use ksave_format::writer::{self, Memory};
use ksave_format::{BackupPair, PAGE, Range};

/// The fake machine's address space: 8 MiB of host memory.
const SIZE: usize = 8 << 20;

/// `bytes` of zeroed, page-aligned host memory below 2 GiB, where every
/// fake device's DMA reaches it. Leaked: tests are short.
fn low_memory(bytes: usize) -> *mut u8 {
    // SAFETY: an anonymous private mapping; MAP_32BIT places it in the low
    // 2 GiB (Linux x86_64).
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes.div_ceil(PAGE) * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap MAP_32BIT");
    p.cast()
}

/// A `[u8; N]` in low memory (see [`low_memory`]): page aligned, so every
/// buffer the store hands to a disk is whole, aligned sectors.
fn low_array<const N: usize>() -> &'static mut [u8; N] {
    // SAFETY: fresh, page aligned, N bytes long, zeroed (a valid [u8; N]),
    // and never used for anything else.
    unsafe { &mut *low_memory(N).cast::<[u8; N]>() }
}

/// `value` in low memory.
fn low<T>(value: T) -> &'static mut T {
    assert!(align_of::<T>() <= PAGE);
    let ptr = low_memory(size_of::<T>()).cast::<T>();
    // SAFETY: fresh, aligned, large enough, and never used for anything else.
    unsafe {
        ptr.write(value);
        &mut *ptr
    }
}

/// A machine whose physical memory is [`SIZE`] bytes of host memory at
/// `base`: RAM with holes, ACPI NVS, and ksave's own range, all at the
/// host addresses of those bytes.
struct Phys {
    base: u64,
    ram: Vec<Range>,
    nvs: Vec<Range>,
    own: Range,
    /// What a resume may write (RAM and NVS outside `own`); empty while saving.
    writable: Vec<Range>,
}

impl Phys {
    /// Fresh memory, holding noise.
    fn new(seed: u64) -> Self {
        let base = low_memory(SIZE) as u64;
        let at = |start: u64, end: u64| Range { start: base + start, end: base + end };
        let mut phys = Self {
            base,
            ram: vec![at(0, 0x9_f000), at(0x10_0000, 0x70_0000)],
            nvs: vec![at(0x7f_0000, 0x7f_4000)],
            own: at(0x20_0000, 0x28_0000),
            writable: Vec::new(),
        };
        phys.garble(seed);
        phys
    }

    /// All of it, as the CPU sees it.
    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping made in `new`, SIZE bytes, leaked (never
        // unmapped), written only through `&mut self` or by a device while
        // a store call runs, never while this view lives.
        unsafe { std::slice::from_raw_parts(self.base as *const u8, SIZE) }
    }

    /// All of it, to write.
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `bytes`; `&mut self` makes this view the only one.
        unsafe { std::slice::from_raw_parts_mut(self.base as *mut u8, SIZE) }
    }

    /// Noise over all of it, as a fresh boot leaves memory.
    fn garble(&mut self, seed: u64) {
        let mut rng = xorshift(seed);
        self.bytes_mut().chunks_exact_mut(8).for_each(|w| w.copy_from_slice(&rng().to_le_bytes()));
    }

    /// A running kernel's memory in its RAM and NVS outside ksave's range:
    /// in runs of 16 pages, zero pages, text (LZ4 pays) and noise.
    fn kernel(seed: u64) -> Self {
        let mut phys = Self::new(!seed);
        let mut rng = xorshift(seed);
        let mut kind = 0;
        let (pfns, own, base) = (phys.pfns(), phys.own, phys.base);
        let bytes = phys.bytes_mut();
        for pfn in pfns {
            if own.contains(pfn * PAGE as u64) {
                continue;
            }
            if pfn % 16 == 0 {
                kind = rng() % 3;
            }
            let page = &mut bytes[(pfn * PAGE as u64 - base) as usize..][..PAGE];
            match kind {
                0 => page.fill(0),
                1 => {
                    let line = format!("pfn {pfn:#x}: the quick brown fox jumps over the lazy dog\n");
                    page.iter_mut().zip(line.bytes().cycle()).for_each(|(b, c)| *b = c);
                }
                _ => {}
            }
        }
        phys
    }

    /// Every page of its RAM and NVS.
    fn pfns(&self) -> impl Iterator<Item = u64> + use<> {
        let ranges: Vec<Range> = self.ram.iter().chain(&self.nvs).copied().collect();
        ranges.into_iter().flat_map(|r| r.pages())
    }

    /// Its first page.
    fn base_pfn(&self) -> u64 {
        self.base / PAGE as u64
    }

    /// Lets a resume write its RAM and NVS outside ksave's range.
    fn resume_target(&mut self) {
        self.writable.clear();
        for r in self.ram.iter().chain(&self.nvs) {
            for (s, e) in [(r.start, r.end.min(self.own.start)), (r.start.max(self.own.end), r.end)] {
                if s < e {
                    self.writable.push(Range { start: s, end: e });
                }
            }
        }
    }

    fn check_writable(&self, addr: u64, len: u64) {
        let ok = self.writable.iter().any(|r| r.start <= addr && addr + len <= r.end);
        assert!(ok, "write of {len:#x} bytes at {addr:#x}: not memory a resume may write");
    }

    /// The pages the jump displaced: exactly ksave's, from a spot in RAM.
    fn backup(&self) -> Vec<BackupPair> {
        self.own.pages().enumerate().map(|(i, pfn)| BackupPair { dest: pfn * PAGE as u64, src: self.base + 0x60_0000 + (i * PAGE) as u64 }).collect()
    }

    /// A few blocks the saved kernel holds free, of 1 to 32 pages, all in
    /// RAM outside ksave's range.
    fn free_blocks(&self) -> Blocks {
        let b = self.base_pfn();
        Blocks([(0x10, 1), (0x120, 8), (0x300, 32), (0x3f0, 16), (0x5ff, 1), (0x6e0, 32)].into_iter().map(|(p, n)| (b + p, n)).collect())
    }
}

impl PhysMemory for Phys {
    unsafe fn zero(&mut self, addr: u64, len: u64) {
        self.check_writable(addr, len);
        // SAFETY: checked to lie in the mapping's RAM or NVS outside ksave's range.
        unsafe { std::ptr::write_bytes(addr as *mut u8, 0, len as usize) };
    }

    unsafe fn write(&mut self, addr: u64, data: &[u8]) {
        self.check_writable(addr, data.len() as u64);
        // SAFETY: as for zero; `data` is the loader's buffer, not this memory.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), addr as *mut u8, data.len()) };
    }

    unsafe fn read(&self, addr: u64, buf: &mut [u8]) {
        assert!(self.ram.iter().chain(&self.nvs).any(|r| r.start <= addr && addr + buf.len() as u64 <= r.end), "read at {addr:#x}: not RAM or NVS");
        // SAFETY: inside the mapping (checked above).
        unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len()) };
    }
}

impl Memory for Phys {
    fn page(&self, pfn: u64) -> Option<&[u8; PAGE]> {
        let addr = pfn.checked_mul(PAGE as u64)?;
        if addr < self.base || addr + PAGE as u64 > self.base + SIZE as u64 {
            return None;
        }
        // SAFETY: a whole page inside the mapping; nothing writes it while a
        // save runs (the devices only read memory then).
        Some(unsafe { &*(addr as *const [u8; PAGE]) })
    }
}

/// Free blocks by their first page: (first pfn, pages).
struct Blocks(BTreeMap<u64, u64>);

impl FreePages for Blocks {
    fn free_block(&mut self, pfn: u64) -> Option<u64> {
        self.0.get(&pfn).copied()
    }
}

/// The rule code free blocks stand for in a header.
const FREE_RULE: u32 = 2;

/// Every buffer a save or a resume works in, in low, page-aligned memory
/// (the disks DMA into and out of them), as ksave keeps them in its image.
struct Bufs {
    block: &'static mut [u8; PAGE],
    chunk_header: &'static mut [u8; PAGE],
    coded: &'static mut [u8; LZ4_OUT],
    pages: &'static mut [u8; LZ4_GROUP * PAGE],
    read_ahead: &'static mut [u8; READ_AHEAD],
    coder: ksave_core::helpers::QueueCoder<'static>,
}

impl Bufs {
    fn new() -> Self {
        Self { block: low_array(), chunk_header: low_array(), coded: low_array(), pages: low_array(), read_ahead: low_array(), coder: common::queue_coder(common::save_queue()) }
    }

    fn resume(&mut self) -> resume::Buffers<'_> {
        resume::Buffers { block: self.block, chunk_header: self.chunk_header, coded: self.coded, pages: self.pages, seal: None, read_ahead: self.read_ahead }
    }

    fn save(&mut self) -> commit::Buffers<'_> {
        commit::Buffers {
            block: self.block,
            meta: (&mut self.pages[..META_BYTES]).try_into().unwrap(),
            scratch: (&mut self.coded[..META_BYTES]).try_into().unwrap(),
            writer: writer::Buffers { raw_header: self.chunk_header, coder: Some(&mut self.coder), write_behind: Some(&mut self.read_ahead[..]), seal: None },
        }
    }
}

/// A whole save of `phys` through the core's stages into the store
/// `extents` on `disk`, with the free blocks left out.
fn save<D: BlockDevice>(disk: &mut D, hal: &FakeHal, extents: &[Extent], phys: &Phys) -> Summary {
    try_save(disk, hal, extents, phys, None).expect("the save")
}

/// The saved memory while one of its pages lies elsewhere (ksave's
/// start-up page, while the other CPUs run): (its frame, its stand-in).
struct Held<'p>(&'p Phys, u64, &'p [u8; PAGE]);

impl Memory for Held<'_> {
    fn page(&self, pfn: u64) -> Option<&[u8; PAGE]> {
        if pfn == self.1 { Some(self.2) } else { self.0.page(pfn) }
    }
}

/// [`save`], failing as it fails; with `held`, one page's contents are
/// taken from its stand-in (where the writer reads and where the disk
/// does DMA: `DiskStore::take_page_from`).
fn try_save<D: BlockDevice>(disk: &mut D, hal: &FakeHal, extents: &[Extent], phys: &Phys, held: Option<(u64, &[u8; PAGE])>) -> Result<Summary, Failure> {
    let block_size = disk.info().block_size;
    let map = StoreMap::new(block_size, extents).expect("a store map");
    let capacity = map.bytes();
    let backup = phys.backup();
    let plan = Plan {
        nonce: NONCE,
        created_unix: 1_700_000_000,
        lz4: true,
        capacity,
        align: block_size,
        ram: &phys.ram,
        nvs: &phys.nvs,
        image: phys.own,
        backup: &backup,
        reentry: REENTRY,
        info: "fake disks 6.12",
        cpu_vendor: VENDOR,
        return_gdt: GDT,
        cr4_needed: 1 << 5,
        facs_signature: Some(FACS),
        iommu_left_on: false,
        free_rule: 0,
        filesystems: &[],
        sealed: false,
        free_as_found: false,
    };
    // The partition as found and as the host saw it: the first extent's
    // start, the whole store's size.
    let first_lba = extents[0].lba;
    let sectors = capacity / 512;
    let pages = phys.own.pages().count();
    // The store as `ksave setup` left it: claimed; ksave reads the claim
    // back before anything else.
    let mut bufs = Bufs::new();
    let mut store = DiskStore::new(disk, hal.clone(), map);
    Header::claiming(common::CLAIM, "claimed by ksave setup").encode(bufs.block);
    ksave_format::writer::Sink::write_bytes(&mut store, 0, &bufs.block[..]).expect("the claim written");
    bufs.block.fill(0);
    ksave_format::reader::Source::read_at(&mut store, 0, &mut bufs.block[..]).expect("the claim read");
    let stages = Stages {
        plan,
        claimed: ksave_core::save::check_claim(bufs.block, common::CLAIM.disk, &common::CLAIM)?,
        found: FoundPartition { first_lba, blocks: capacity / block_size as u64, block_size },
        host: HostPartition { first_sector: first_lba * block_size as u64 / 512, sectors },
        reach: 1 << 32,
        backup: Ok(Coverage { pairs: pages, outside: 0, duplicates: 0, uncovered: 0, sources_inside: 0, in_place: 0 }),
        started_us: clock(),
    };
    let ready = stages.check().expect("the stages pass");
    assert!(ready.worst_case_bytes() <= capacity);
    match held {
        Some((pfn, stand_in)) => {
            // SAFETY: the stand-in is low memory of this test, read only while the store lives.
            unsafe { store.take_page_from(pfn, stand_in.as_ptr() as u64) };
            let mem = Held(phys, pfn, stand_in);
            ready.write(&mut store, &mem, &mut phys.free_blocks(), &mut ksave_format::commit::NoneFree, FREE_RULE, bufs.save(), clock)
        }
        None => ready.write(&mut store, phys, &mut phys.free_blocks(), &mut ksave_format::commit::NoneFree, FREE_RULE, bufs.save(), clock),
    }
}

/// A whole resume of the image in the store `extents` on `disk` into `phys`.
fn resume<D: BlockDevice>(disk: &mut D, hal: &FakeHal, extents: &[Extent], phys: &mut Phys) -> Result<Resumed, Refused> {
    let map = StoreMap::new(disk.info().block_size, extents).expect("a store map");
    let mut store = DiskStore::new(disk, hal.clone(), map);
    let mut bufs = Bufs::new();
    phys.resume_target();
    let (ram, nvs) = (phys.ram.clone(), phys.nvs.clone());
    let machine = Machine { cpu_vendor: VENDOR, la57: false, facs_signature: Ok(FACS), own: phys.own, reach: 1 << 32, ram: &ram, nvs: &nvs };
    // SAFETY: `phys` is this test's own mapping; every CPU write is checked
    // to fall in its RAM and NVS outside ksave's range, the devices' DMA is
    // checked afterwards (every other byte unchanged), and the buffers and
    // the drivers' memory are other mappings.
    unsafe { resume::check_and_load(&mut store, &machine, phys, bufs.resume(), clock, WhenRefused::KeepImage, None) }
}

/// The image header in the store's first block on `disk`.
fn header(disk: &fakes::Disk, first_sector: u64) -> Header {
    let bytes = disk.borrow().bytes(first_sector, (PAGE / 512) as u64);
    Header::decode(bytes.as_slice().try_into().unwrap()).expect("an image header")
}

/// After a resume of an image of `saved` (a snapshot of the saved memory)
/// into `phys`, which held `before`: every stored page byte-identical,
/// every free page zeroed, and everything else (ksave's range, the holes
/// between the ranges) untouched, DMA included.
fn check_restored(phys: &Phys, saved: &[u8], before: &[u8], free: &Blocks) {
    let now = phys.bytes();
    let is_free = |pfn: u64| free.0.iter().any(|(&p, &n)| (p..p + n).contains(&pfn));
    let mut memory = vec![false; SIZE / PAGE];
    for pfn in phys.pfns() {
        memory[(pfn - phys.base_pfn()) as usize] = true;
    }
    for (i, in_memory) in memory.into_iter().enumerate() {
        let pfn = phys.base_pfn() + i as u64;
        let page = &now[i * PAGE..][..PAGE];
        if !in_memory || phys.own.contains(pfn * PAGE as u64) {
            assert!(page == &before[i * PAGE..][..PAGE], "page {pfn:#x} (no RAM or ksave's) was written");
        } else if is_free(pfn) {
            assert!(page.iter().all(|&b| b == 0), "free page {pfn:#x} not zeroed");
        } else {
            assert!(page == &saved[i * PAGE..][..PAGE], "page {pfn:#x} not restored");
        }
    }
}

/// A save into `extents` on `disk`, then a resume from that disk into the
/// memory re-garbled: the whole round trip, checked page by page; the
/// image is invalidated on the disk afterwards.
fn round_trip<D: BlockDevice>(disk: &mut D, hal: &FakeHal, fake: &fakes::Disk, extents: &[Extent], seed: u64) -> (Summary, Resumed) {
    let mut phys = Phys::kernel(seed);
    let saved = phys.bytes().to_vec();
    let summary = save(disk, hal, extents, &phys);
    let block_size = disk.info().block_size as u64;
    let first_sector = extents[0].lba * block_size / 512;
    let h = header(fake, first_sector);
    assert_eq!(h.state, State::Complete);
    assert_eq!(h.pages_stored, summary.totals.pages_stored);

    phys.garble(seed ^ 0xdead_beef);
    let before = phys.bytes().to_vec();
    let resumed = resume(disk, hal, extents, &mut phys).expect("the image resumes");
    assert_eq!(resumed.way_back, Ok(resume::WayBack { reentry: REENTRY, gdt: GDT, la57: false }));
    assert_eq!(resumed.loaded.pages_stored, summary.totals.pages_stored);
    check_restored(&phys, &saved, &before, &phys.free_blocks());
    assert_eq!(header(fake, first_sector).state, State::Invalidated, "invalidated before the way back");
    (summary, resumed)
}

/// The partition: 12 MiB from sector 2048.
const FIRST_SECTOR: u64 = 2048;
const PART_BYTES: u64 = 12 << 20;

/// The partition as one extent of `block_size`-byte blocks.
fn partition(block_size: u64) -> [Extent; 1] {
    [Extent { lba: FIRST_SECTOR * 512 / block_size, blocks: PART_BYTES / block_size }]
}

fn ahci_machine() -> (FakeHal, fakes::Disk) {
    let hal = FakeHal::default();
    let disk = fakes::disk(64 << 11); // 64 MiB
    hal.add_hba(Hba::new(vec![None, Some(disk.clone())], true));
    (hal, disk)
}

fn open_ahci<'m>(hal: &FakeHal, mem: &'m mut AhciMemory) -> AhciDisk<'m, FakeHal> {
    // SAFETY: the fake HBA is this test's alone.
    unsafe { AhciDisk::open(hal.clone(), FakeMachine::ABAR, 1, mem) }.expect("open port 1")
}

/// An NVMe controller with one namespace of 4 KiB blocks.
fn nvme_machine() -> (FakeHal, fakes::Disk) {
    let hal = FakeHal::default();
    let disk = fakes::disk(64 << 11);
    hal.add_nvme(NvmeController::new(vec![Namespace { disk: disk.clone(), lbads: 12 }]));
    (hal, disk)
}

fn open_nvme<'m>(hal: &FakeHal, mem: &'m mut NvmeMemory) -> NvmeDisk<'m, FakeHal> {
    // SAFETY: the fake controller is this test's alone.
    unsafe { NvmeDisk::open(hal.clone(), FakeMachine::NVME_BAR, 0, mem) }.expect("open namespace 1")
}

#[test]
fn whole_save_and_resume_on_ahci() {
    let (hal, fake) = ahci_machine();
    let mut mem = Box::new(AhciMemory::new());
    let mut disk = open_ahci(&hal, &mut mem);
    assert_eq!(disk.info().block_size, 512);
    let (summary, resumed) = round_trip(&mut disk, &hal, &fake, &partition(512), 1);
    let t = summary.totals;
    assert!(t.pages_stored > 0 && t.pages_zero > 0 && t.pages_free > 0, "{t:?}");
    assert!(resumed.loaded.pages_zeroed >= t.pages_zero + t.pages_free);
    // Nothing was written outside the partition.
    let end = FIRST_SECTOR + PART_BYTES / 512;
    assert!(fake.borrow().written().all(|s| (FIRST_SECTOR..end).contains(&s)));
}

/// A page whose contents lie elsewhere during the save (ksave's start-up
/// page while the other CPUs run) is saved from its stand-in: a page of
/// noise, so stored raw and moved by DMA, and a page of text, coded.
#[test]
fn a_page_held_elsewhere_is_saved_from_its_stand_in() {
    for want_raw in [true, false] {
        let (hal, _fake) = ahci_machine();
        let mut mem = Box::new(AhciMemory::new());
        let mut disk = open_ahci(&hal, &mut mem);
        let mut phys = Phys::kernel(7);
        let free = phys.free_blocks();
        let is_free = |pfn: u64| free.0.iter().any(|(&first, &n)| (first..first + n).contains(&pfn));
        // Noise has nearly every byte value; text a handful.
        let kinds = |page: &[u8; PAGE]| page.iter().collect::<std::collections::BTreeSet<_>>().len();
        let pfn = phys
            .pfns()
            .filter(|&pfn| !phys.own.contains(pfn * PAGE as u64) && !is_free(pfn))
            .find(|&pfn| {
                let k = kinds(phys.page(pfn).unwrap());
                if want_raw { k > 250 } else { (2..40).contains(&k) }
            })
            .expect("such a page");
        let saved = phys.bytes().to_vec();
        let stand_in = low_array::<PAGE>();
        stand_in.copy_from_slice(phys.page(pfn).unwrap());
        let at = (pfn * PAGE as u64 - phys.base) as usize;
        phys.bytes_mut()[at..at + PAGE].fill(0xcc);
        let summary = try_save(&mut disk, &hal, &partition(512), &phys, Some((pfn, stand_in))).expect("the save");
        assert!(summary.totals.pages_lz4 > 0);
        // Put back, as parking the other CPUs does; then a fresh boot.
        phys.bytes_mut()[at..at + PAGE].copy_from_slice(stand_in);
        phys.garble(99);
        let before = phys.bytes().to_vec();
        resume(&mut disk, &hal, &partition(512), &mut phys).expect("the image resumes");
        check_restored(&phys, &saved, &before, &free);
    }
}

#[test]
fn whole_save_and_resume_on_nvme_with_4k_blocks() {
    let (hal, fake) = nvme_machine();
    let mem = low(NvmeMemory::new());
    let mut disk = open_nvme(&hal, mem);
    assert_eq!(disk.info().block_size, 4096);
    let (summary, _) = round_trip(&mut disk, &hal, &fake, &partition(4096), 2);
    assert!(summary.totals.pages_stored > 0);
    let end = FIRST_SECTOR + PART_BYTES / 512;
    assert!(fake.borrow().written().all(|s| (FIRST_SECTOR..end).contains(&s)));
}

#[test]
fn whole_save_and_resume_on_virtio_blk_with_4k_blocks() {
    let hal = FakeHal::default();
    let fake = fakes::disk(64 << 11);
    hal.add_virtio_blk((0, 5, 0), VirtioBlkDevice::new(fake.clone(), VirtioSetup { blk_size: 4096, ..VirtioSetup::default() }));
    let transport = Transport::find(&hal, Address { bus: 0, device: 5, function: 0 }).expect("the virtio structures");
    let mem = low(VirtioMemory::new());
    // SAFETY: the fake device is this test's alone.
    let mut disk = unsafe { VirtioBlk::open(hal.clone(), transport, mem) }.expect("open virtio-blk");
    assert_eq!(disk.info().block_size, 4096);
    round_trip(&mut disk, &hal, &fake, &partition(4096), 3);
}

#[test]
fn a_store_of_three_extents_round_trips() {
    let (hal, fake) = ahci_machine();
    let mut mem = Box::new(AhciMemory::new());
    let mut disk = open_ahci(&hal, &mut mem);
    // 512 KiB, 512 KiB, then 10 MiB, out of order on the disk.
    let extents = [Extent { lba: 40_960, blocks: 1024 }, Extent { lba: 4096, blocks: 1024 }, Extent { lba: 70_000, blocks: 20_480 }];
    round_trip(&mut disk, &hal, &fake, &extents, 4);
    // The image went into every extent and nowhere else.
    let written: Vec<u64> = fake.borrow().written().collect();
    for e in &extents {
        assert!(written.iter().any(|s| (e.lba..e.lba + e.blocks).contains(s)), "nothing in {e:?}");
    }
    assert!(written.iter().all(|s| extents.iter().any(|e| (e.lba..e.lba + e.blocks).contains(s))));
}

/// A disk error at `bad` (a 512-byte sector) mid-load, after the verdict:
/// an unreadable image, this boot's memory given up, the image invalidated.
fn error_mid_load<D: BlockDevice>(disk: &mut D, hal: &FakeHal, fake: &fakes::Disk, extents: &[Extent], inject: impl FnOnce(u64)) {
    let mut phys = Phys::kernel(5);
    save(disk, hal, extents, &phys);
    let block_size = disk.info().block_size as u64;
    let first_sector = extents[0].lba * block_size / 512;
    // Halfway through what the save wrote: well past the header and
    // metadata, in the chunks.
    let last = fake.borrow().written().max().unwrap();
    let bad = first_sector + (last - first_sector) / 2;
    assert!(bad > first_sector + 64 * 8, "past the metadata");
    inject(bad);
    phys.garble(6);
    let refused = resume(disk, hal, extents, &mut phys).expect_err("refused");
    assert!(matches!(refused.refusal, Refusal::Unreadable | Refusal::Damaged { .. }), "{:?}", refused.refusal);
    assert!(refused.memory_lost, "loading had begun");
    assert_eq!(refused.invalidated, Some(Ok(())));
    let h = header(fake, first_sector);
    assert_eq!(h.state, State::Invalidated);
}

#[test]
fn a_read_error_mid_load_on_ahci_gives_up_memory_and_invalidates() {
    let (hal, fake) = ahci_machine();
    let mut mem = Box::new(AhciMemory::new());
    let mut disk = open_ahci(&hal, &mut mem);
    let inject = |bad| hal.0.hba.borrow_mut().as_mut().unwrap().ports[1].faults.read_error_at = Some(bad);
    error_mid_load(&mut disk, &hal, &fake, &partition(512), inject);
}

#[test]
fn a_read_error_mid_load_on_nvme_gives_up_memory_and_invalidates() {
    let (hal, fake) = nvme_machine();
    let mem = low(NvmeMemory::new());
    let mut disk = open_nvme(&hal, mem);
    // The fake NVMe counts faults in the namespace's blocks.
    let inject = |bad: u64| hal.0.nvme.borrow_mut().as_mut().unwrap().faults.read_error_at = Some(bad / 8);
    error_mid_load(&mut disk, &hal, &fake, &partition(4096), inject);
}

#[test]
fn a_write_error_fails_the_save_with_the_disk_error() {
    let (hal, fake) = ahci_machine();
    let mut mem = Box::new(AhciMemory::new());
    let mut disk = open_ahci(&hal, &mut mem);
    hal.0.hba.borrow_mut().as_mut().unwrap().ports[1].faults.write_error_at = Some(FIRST_SECTOR + 2000);
    let phys = Phys::kernel(7);
    let failure = try_save(&mut disk, &hal, &partition(512), &phys, None).expect_err("the save fails");
    assert!(failure.message.as_str().starts_with("disk error: device error"), "{}", failure.message.as_str());
    // The header says the image is no use: it was never completed.
    assert_ne!(header(&fake, FIRST_SECTOR).state, State::Complete);
}
