//! The real encoder against the real decoder, and every corruption the
//! decoder must catch.

use std::collections::BTreeMap;

use ksave_format::chunk::{self, LZ4_GROUP, LZ4_OUT};
use ksave_format::commit;
use ksave_format::header::{self, DATA_OFFSET, HeaderError, META_BLOCKS, META_OFFSET, State};
use ksave_format::reader::{self, ReadError};
use ksave_format::writer::{self, Memory, Sink, Totals, WriteError, worst_case_bytes};
use ksave_format::{BackupPair, PAGE, Range, config};

/// Test memory: page frame -> contents.
struct Mem(BTreeMap<u64, Box<[u8; PAGE]>>);

impl Memory for Mem {
    fn page(&self, pfn: u64) -> Option<&[u8; PAGE]> {
        self.0.get(&pfn).map(|b| &**b)
    }
}

/// A partition in a Vec; `flushes` records the header state at each flush.
struct Disk {
    bytes: Vec<u8>,
    /// The block size: every write must be whole, aligned blocks.
    align: u32,
    mem: *const Mem,
    flushes: Vec<Option<State>>,
}

impl commit::Device for Disk {
    fn flush(&mut self) -> Result<(), Self::Error> {
        let block: &[u8; PAGE] = self.bytes[..PAGE].try_into().unwrap();
        self.flushes.push(header::Header::decode(block).ok().map(|h| h.state));
        Ok(())
    }
}

impl Sink for Disk {
    type Error = &'static str;
    fn write_raw(&mut self, offset: u64, header: &[u8], pfns: &[u64]) -> Result<(), Self::Error> {
        self.check_blocks(offset, header.len() + pfns.len() * PAGE);
        // SAFETY: test-only; `mem` outlives the save.
        let mem = unsafe { &*self.mem };
        let mut at = offset as usize;
        self.put(at, header);
        at += header.len();
        for pfn in pfns {
            let page = *mem.page(*pfn).unwrap();
            self.put(at, &page);
            at += PAGE;
        }
        Ok(())
    }
    fn write_bytes(&mut self, offset: u64, bytes: &[u8]) -> Result<(), Self::Error> {
        self.check_blocks(offset, bytes.len());
        self.put(offset as usize, bytes);
        Ok(())
    }
}

impl Disk {
    fn check_blocks(&self, offset: u64, len: usize) {
        let align = self.align as u64;
        assert!(offset.is_multiple_of(align) && (len as u64).is_multiple_of(align), "write of {len} bytes at {offset} is not whole {align}-byte blocks");
    }

    fn put(&mut self, at: usize, data: &[u8]) {
        assert!(at + data.len() <= self.bytes.len(), "write beyond the partition");
        self.bytes[at..at + data.len()].copy_from_slice(data);
    }
}

fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

const RAM: [Range; 2] = [Range { start: 0, end: 0x40_0000 }, Range { start: 0x100_0000, end: 0x140_0000 }];
const IMAGE: Range = Range { start: 0x120_0000, end: 0x121_0000 };
/// ACPI NVS between the RAM ranges, as firmware maps put it.
const NVS: [Range; 1] = [Range { start: 0x80_0000, end: 0x80_8000 }];

/// Memory of the two RAM ranges and the NVS: runs of 64 random, zero or
/// text pages, as real memory comes; ksave's own pages are left out, as a
/// save does.
fn memory(seed: u64) -> Mem {
    let mut mem = memory_in(&RAM, seed);
    mem.0.extend(memory_in(&NVS, !seed).0);
    mem
}

fn memory_in(ranges: &[Range], seed: u64) -> Mem {
    let mut rng = xorshift(seed);
    let mut map = BTreeMap::new();
    let mut kind = 0;
    for r in ranges {
        for pfn in r.pages() {
            if IMAGE.contains(pfn * PAGE as u64) {
                continue;
            }
            if pfn % 64 == 0 {
                kind = rng() % 4;
            }
            let mut page = Box::new([0u8; PAGE]);
            match kind {
                0 => {} // zero
                1 => {
                    let line = format!("pfn {pfn:#x}: the quick brown fox jumps over the lazy dog\n");
                    for (i, b) in page.iter_mut().enumerate() {
                        *b = line.as_bytes()[i % line.len()];
                    }
                }
                _ => page.chunks_mut(8).for_each(|c| c.copy_from_slice(&rng().to_le_bytes())),
            }
            map.insert(pfn, page);
        }
    }
    Mem(map)
}

const NONCE: u64 = 0x5eed_1234_abcd_0042;
const BACKUP: [BackupPair; 2] = [BackupPair { dest: 0x120_0000, src: 0x3f_0000 }, BackupPair { dest: 0x120_1000, src: 0x3f_1000 }];

/// A whole save through the commit protocol ksave runs.
fn save(mem: &Mem, lz4: bool, capacity: usize) -> Result<(Vec<u8>, Totals), WriteError<&'static str>> {
    save_ram(mem, &RAM, &NVS, lz4, capacity)
}

/// [`save`] of memory that holds only the RAM ranges `ram`.
fn save_ram(mem: &Mem, ram: &[Range], nvs: &[Range], lz4: bool, capacity: usize) -> Result<(Vec<u8>, Totals), WriteError<&'static str>> {
    let mut disk = Disk { bytes: vec![0; capacity], align: 512, mem, flushes: Vec::new() };
    let (_, totals) = save_to(&mut disk, mem, ram, nvs, lz4)?;
    Ok((disk.bytes, totals))
}

fn save_to(disk: &mut Disk, mem: &Mem, ram: &[Range], nvs: &[Range], lz4: bool) -> Result<(header::Header, Totals), WriteError<&'static str>> {
    save_with_free(disk, mem, ram, nvs, lz4, &mut commit::NoneFree)
}

/// Free blocks by their first page: (first pfn, pages).
struct Blocks(BTreeMap<u64, u64>);

impl commit::FreePages for Blocks {
    fn free_block(&mut self, pfn: u64) -> Option<u64> {
        self.0.get(&pfn).copied()
    }
}

fn save_with_free(
    disk: &mut Disk,
    mem: &Mem,
    ram: &[Range],
    nvs: &[Range],
    lz4: bool,
    free: &mut dyn commit::FreePages,
) -> Result<(header::Header, Totals), WriteError<&'static str>> {
    let plan = commit::Plan {
        nonce: NONCE,
        created_unix: 0,
        lz4,
        capacity: disk.bytes.len() as u64,
        align: disk.align,
        ram,
        nvs,
        image: IMAGE,
        backup: &BACKUP,
        reentry: 0,
        info: "test host 6.12",
        cpu_vendor: *b"TestVendor!!",
        return_gdt: (0xffff_8880_1f40_9000, 127),
        cr4_needed: 1 << 12 | 1 << 5,
        facs_signature: Some(0x1234),
        iommu_left_on: false,
        free_rule: 2,
    };
    let mut block = Box::new([0u8; PAGE]);
    let (mut raw_header, mut lz4_in, mut lz4_out) = (Box::new([0u8; PAGE]), Box::new([0u8; LZ4_GROUP * PAGE]), Box::new([0u8; LZ4_OUT]));
    let bufs = commit::Buffers { block: &mut block, writer: writer::Buffers { raw_header: &mut raw_header, lz4_in: &mut lz4_in, lz4_out: &mut lz4_out } };
    commit::save(&plan, mem, free, disk, bufs, || 0, 0)
}

/// What a walk of an image handed out.
#[derive(Default)]
struct Loaded {
    pages: BTreeMap<u64, Vec<u8>>,
    free: Vec<(u64, u64)>,
    /// Each chunk's offset and encoding.
    chunks: Vec<(u64, chunk::Encoding)>,
}

impl reader::Visitor<&[u8]> for Loaded {
    fn page(&mut self, pfn: u64, data: &[u8; PAGE]) {
        assert!(self.pages.insert(pfn, data.to_vec()).is_none(), "page {pfn} twice");
    }
    fn free_run(&mut self, first: u64, pages: u64) {
        self.free.push((first, pages));
    }
    fn chunk(&mut self, c: &chunk::ChunkInfo) {
        self.chunks.push((c.offset, c.encoding));
    }
}

/// Reads an image back into a page map, checking everything.
fn load(image: &[u8]) -> Result<BTreeMap<u64, Vec<u8>>, ReadError<&'static str>> {
    load_all(image).map(|l| l.pages)
}

fn load_all(image: &[u8]) -> Result<Loaded, ReadError<&'static str>> {
    let mut src = image;
    let mut block = [0u8; PAGE];
    let h = reader::read_header(&mut src, &mut block)?;
    if h.state != State::Complete {
        return Err(ReadError::Totals("not complete"));
    }
    let mut meta_buf = Box::new([0u8; META_BLOCKS as usize * PAGE]);
    let meta = reader::read_meta(&mut src, &h, &mut meta_buf)?;
    assert_eq!(meta.backup_pairs().collect::<Vec<_>>(), BACKUP);
    let mut loaded = Loaded::default();
    let (mut hb, mut li, mut lo) = (Box::new([0u8; PAGE]), Box::new([0u8; LZ4_OUT]), Box::new([0u8; LZ4_GROUP * PAGE]));
    let bufs = reader::Buffers { header: &mut hb, lz4_in: &mut li, lz4_out: &mut lo };
    reader::visit_chunks(&mut src, &h, &reader::Saved::of(&meta, &h), bufs, &mut loaded)?;
    Ok(loaded)
}

fn assert_same(mem: &Mem, pages: &BTreeMap<u64, Vec<u8>>) {
    for (pfn, data) in &mem.0 {
        match pages.get(pfn) {
            Some(stored) => assert_eq!(&stored[..], &data[..], "page {pfn:#x}"),
            None => assert!(data.iter().all(|&b| b == 0), "non-zero page {pfn:#x} missing"),
        }
    }
    assert!(pages.keys().all(|p| mem.0.contains_key(p)));
}

#[test]
fn raw_round_trip_elides_zero_pages() {
    let mem = memory(1);
    let (image, totals) = save(&mem, false, 8 << 20).unwrap();
    let zero = mem.0.values().filter(|p| p.iter().all(|&b| b == 0)).count() as u64;
    assert_eq!(totals.pages_zero, zero);
    assert_eq!(totals.pages_stored + zero, mem.0.len() as u64);
    assert_eq!(totals.pages_lz4, 0);
    assert_same(&mem, &load(&image).unwrap());
    assert!(DATA_OFFSET + totals.data_bytes <= worst_case_bytes(mem.0.len() as u64));
}

#[test]
fn lz4_round_trip_compresses_text_and_keeps_random_raw() {
    let mem = memory(2);
    let (raw_image, raw) = save(&mem, false, 8 << 20).unwrap();
    let (image, lz) = save(&mem, true, 8 << 20).unwrap();
    assert!(lz.pages_lz4 > 0, "text pages should compress");
    assert!(lz.pages_lz4_skipped > 0, "random runs should stop the LZ4 attempts for a while");
    assert_eq!(raw.pages_lz4_skipped, 0);
    assert!(lz.pages_lz4 < lz.pages_stored, "random pages should stay raw");
    // A third of the stored pages are text (they all but vanish), two
    // thirds random: about 0.7, plus the chunk headers and padding of
    // 8-page groups.
    assert!(lz.data_bytes < raw.data_bytes * 4 / 5, "{} vs {}", lz.data_bytes, raw.data_bytes);
    assert_same(&mem, &load(&image).unwrap());
    assert_same(&mem, &load(&raw_image).unwrap());
}

#[test]
fn a_partition_too_small_is_full_not_overrun() {
    let mem = memory(3);
    assert_eq!(save(&mem, false, 1 << 20).err(), Some(WriteError::Full));
}

/// The header block an image starts with.
fn header_of(image: &[u8]) -> header::Header {
    header::Header::decode(image[..PAGE].try_into().unwrap()).unwrap()
}

fn flip(image: &[u8], at: usize) -> Vec<u8> {
    let mut v = image.to_vec();
    v[at] ^= 0x10;
    v
}

fn chunk_offsets(image: &[u8]) -> Vec<(u64, chunk::Encoding)> {
    load_all(image).unwrap().chunks
}

#[test]
fn every_corruption_is_caught() {
    let mem = memory(4);
    let (image, _) = save(&mem, true, 8 << 20).unwrap();
    let chunks = chunk_offsets(&image);
    let raw = chunks.iter().find(|c| c.1 == chunk::Encoding::Raw).unwrap().0 as usize;
    let lz4 = chunks.iter().find(|c| c.1 == chunk::Encoding::Lz4).unwrap().0 as usize;

    assert_eq!(load(&flip(&image, 20)).err(), Some(ReadError::Header(HeaderError::Checksum)), "header bit");
    assert_eq!(load(&flip(&image, META_OFFSET as usize + 3)).err(), Some(ReadError::Header(HeaderError::Checksum)), "metadata bit");
    let err = load(&flip(&image, raw + 45)).unwrap_err();
    assert!(matches!(err, ReadError::Chunk { what: "header checksum", .. }), "raw chunk header: {err:?}");
    let err = load(&flip(&image, raw + PAGE + 1000)).unwrap_err();
    assert!(matches!(err, ReadError::Chunk { what: "payload checksum", .. }), "raw payload: {err:?}");
    let err = load(&flip(&image, lz4 + 512 + 7)).unwrap_err();
    assert!(matches!(err, ReadError::Chunk { what: "payload checksum", .. }), "lz4 payload: {err:?}");

    // Truncated: the last chunk is cut off.
    let len = DATA_OFFSET as usize + {
        let mut b = [0u8; PAGE];
        b.copy_from_slice(&image[..PAGE]);
        header::Header::decode(&b).unwrap().data_bytes as usize
    };
    let err = load(&image[..len - 100]).unwrap_err();
    assert_eq!(err, ReadError::Io("read beyond the end"), "truncated");

    // Another format version, with a valid checksum.
    let mut other = image.clone();
    other[8] = header::VERSION as u8 + 1;
    let crc = ksave_format::CRC32C.checksum(&other[..PAGE - 4]);
    other[PAGE - 4..PAGE].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(load(&other).err(), Some(ReadError::Header(HeaderError::Version(header::VERSION + 1))));

    // Not ours at all.
    assert_eq!(load(&vec![0u8; 1 << 16]).err(), Some(ReadError::Header(HeaderError::BadMagic)));
}

#[test]
fn a_torn_save_never_looks_complete() {
    let mem = memory(5);
    let (mut image, _) = save(&mem, false, 8 << 20).unwrap();
    // The commit was torn: only its first sector reached the disk.
    let mut writing = [0u8; PAGE];
    header::Header::new(State::Writing, NONCE).encode(&mut writing);
    image[512..PAGE].copy_from_slice(&writing[512..]);
    assert_eq!(load(&image).err(), Some(ReadError::Header(HeaderError::Checksum)));
    // Never committed: the "writing" header is all there is.
    image[..PAGE].copy_from_slice(&writing);
    assert_eq!(load(&image).err(), Some(ReadError::Totals("not complete")));
}

#[test]
fn chunks_of_another_attempt_are_refused() {
    let mem = memory(6);
    let (image, _) = save(&mem, false, 8 << 20).unwrap();
    let mut h = header_of(&image);
    h.nonce ^= 1; // a header from a later attempt over an older image's chunks
    let mut forged = image.clone();
    h.encode((&mut forged[..PAGE]).try_into().unwrap());
    let err = load(&forged).unwrap_err();
    assert!(matches!(err, ReadError::Chunk { what: "from another save attempt", .. }), "{err:?}");
}

#[test]
fn random_damage_never_panics_and_never_passes_silently() {
    // A stable-Rust stand-in for fuzzing (fuzz/ has the cargo-fuzz target):
    // flip bytes all over a valid image; the decoder must either refuse it
    // or hand back exactly the original pages.
    let mem = memory_in(&RAM[..1], 7);
    let (image, _) = save_ram(&mem, &RAM[..1], &[], true, 8 << 20).unwrap();
    let mut rng = xorshift(99);
    let used = DATA_OFFSET as usize + {
        let mut b = [0u8; PAGE];
        b.copy_from_slice(&image[..PAGE]);
        header::Header::decode(&b).unwrap().data_bytes as usize
    };
    for _ in 0..300 {
        let mut bad = image.clone();
        for _ in 0..1 + rng() % 3 {
            let at = (rng() % used as u64) as usize;
            bad[at] ^= 1 << (rng() % 8);
        }
        if let Ok(pages) = load(&bad) {
            assert_same(&mem, &pages); // damage only in padding
        }
    }
}

#[test]
fn config_round_trip_and_refusals() {
    assert_eq!(config::Config::decode(&config::SHIPPED), Err(config::ConfigError::NotConfigured));
    let mut c = config::Config::new();
    c.nonce = 7;
    c.partition_guid = uguid::Guid::from_bytes([0xab; 16]);
    c.partition_first_lba = 2048;
    c.partition_sectors = 1 << 20;
    c.lz4 = true;
    c.ram[0] = Range { start: 0, end: 0x9f000 };
    c.ram[1] = Range { start: 0x100000, end: 0x1ffe_0000 };
    c.ram_count = 2;
    c.nvs[0] = Range { start: 0x1ffe_0000, end: 0x2000_0000 };
    c.nvs_count = 1;
    c.iommus[0] = bootinfo::acpi::RemappingUnit::Vtd(0xfed9_0000);
    c.iommus[1] = bootinfo::acpi::RemappingUnit::AmdVi(0xfeb8_0000);
    c.iommu_count = 2;
    c.info[..11].copy_from_slice(b"host 6.12.1");
    let mut block = [0u8; PAGE];
    c.encode(&mut block);
    assert_eq!(config::Config::decode(&block), Ok(c.clone()));
    assert_eq!(config::Config::decode(&block).unwrap().info(), "host 6.12.1");
    let mut bad = block;
    bad[100] ^= 1;
    assert_eq!(config::Config::decode(&bad), Err(config::ConfigError::Checksum));
    let mut overlapping = c.clone();
    overlapping.ram[1].start = 0x9_0000;
    overlapping.encode(&mut block);
    assert_eq!(config::Config::decode(&block), Err(config::ConfigError::Field("RAM ranges")));
    let mut nvs_in_ram = c.clone();
    nvs_in_ram.nvs[0] = Range { start: 0x1000_0000, end: 0x1000_8000 };
    nvs_in_ram.nvs_count = 1;
    nvs_in_ram.encode(&mut block);
    assert_eq!(config::Config::decode(&block), Err(config::ConfigError::Field("NVS range overlaps RAM")));
    let mut none = c;
    none.ram_count = 0;
    none.encode(&mut block);
    assert_eq!(config::Config::decode(&block), Err(config::ConfigError::Field("RAM range count")));
    assert_eq!(config::Config::decode(&[0u8; PAGE]), Err(config::ConfigError::BadMagic));
}

/// The commit protocol: the header reads *writing* at the first flush and
/// at the data flush, and *complete* only at the last one.
#[test]
fn commit_protocol_flushes_writing_then_data_then_complete() {
    let mem = memory(9);
    let mut disk = Disk { bytes: vec![0; 8 << 20], align: 512, mem: &mem, flushes: Vec::new() };
    let (h, _) = save_to(&mut disk, &mem, &RAM, &NVS, false).unwrap();
    assert_eq!(h.nvs_ranges, 1);
    assert_eq!(disk.flushes, [Some(State::Writing), Some(State::Writing), Some(State::Complete)]);
    assert_eq!((h.state, h.cpu_vendor, h.message()), (State::Complete, *b"TestVendor!!", "test host 6.12"));
    let read = header::Header::decode(disk.bytes[..PAGE].try_into().unwrap()).unwrap();
    assert_eq!((read.return_gdt, read.cr4_needed), ((0xffff_8880_1f40_9000, 127), 1 << 12), "only LA57 is a need");
    assert_eq!(read.facs_signature, Some(0x1234));
    assert_eq!(load(&disk.bytes).unwrap().len() as u64, h.pages_stored);
}

/// A save that fails half-way leaves a *writing* header, never an image;
/// a failure record is never taken for one either.
#[test]
fn a_failed_save_leaves_no_image() {
    let mem = memory(10);
    let mut disk = Disk { bytes: vec![0; 1 << 20], align: 512, mem: &mem, flushes: Vec::new() };
    assert_eq!(save_to(&mut disk, &mem, &RAM, &NVS, false).err(), Some(WriteError::Full));
    assert_eq!(disk.flushes, [Some(State::Writing)]);
    assert_eq!(load(&disk.bytes).err(), Some(ReadError::Totals("not complete")));
    let mut block = [0u8; PAGE];
    commit::record_failure(&mut disk, NONCE, 0, header::fail::IO, "disk error", &mut block).unwrap();
    let h = header::Header::decode(disk.bytes[..PAGE].try_into().unwrap()).unwrap();
    assert_eq!((h.state, h.fail_code, h.message()), (State::Failed, header::fail::IO, "disk error"));
}

/// On a disk of 4 KiB blocks every write is whole blocks (the test disk
/// checks), LZ4 chunks are padded to a block, and the image reads back.
#[test]
fn a_4k_disk_gets_whole_blocks_and_the_image_reads_back() {
    let mem = memory(3);
    let mut disk = Disk { bytes: vec![0; 8 << 20], align: 4096, mem: &mem, flushes: Vec::new() };
    let (h, totals) = save_to(&mut disk, &mem, &RAM, &NVS, true).unwrap();
    assert_eq!(h.align, 4096);
    assert!(totals.pages_lz4 > 0, "LZ4 chunks were made");
    assert!(chunk_offsets(&disk.bytes).iter().all(|(off, _)| off % 4096 == 0), "every chunk starts a block");
    assert_same(&mem, &load(&disk.bytes).unwrap());
}

#[test]
fn free_pages_are_listed_not_stored_and_everything_stays_in_order() {
    for lz4 in [false, true] {
        let mem = memory(6);
        // Free blocks: one inside the first range, one whose head is below
        // ksave's range and whose pages run into it, one ending at a range end.
        let blocks = Blocks(BTreeMap::from([(0x10, 16), (0x11f8, 16), (0x3f8, 8)]));
        let mut disk = Disk { bytes: vec![0; 8 << 20], align: 512, mem: &mem, flushes: Vec::new() };
        let (h, totals) = save_with_free(&mut disk, &mem, &RAM, &NVS, lz4, &mut { blocks }).unwrap();
        // 0x11f8..0x1200 are free; 0x1200.. is ksave's, never listed.
        assert_eq!((h.pages_free, totals.pages_free, h.free_rule), (16 + 8 + 8, 32, 2));
        let loaded = load_all(&disk.bytes).unwrap();
        assert_eq!(loaded.free, [(0x10, 16), (0x3f8, 8), (0x11f8, 8)]);
        let is_free = |pfn: u64| loaded.free.iter().any(|&(f, n)| (f..f + n).contains(&pfn));
        assert!(loaded.pages.keys().all(|&p| !is_free(p)));
        // Every other page reads back as saved.
        for (pfn, data) in mem.0.iter().filter(|(p, _)| !is_free(**p)) {
            match loaded.pages.get(pfn) {
                Some(stored) => assert_eq!(&stored[..], &data[..], "page {pfn:#x}"),
                None => assert!(data.iter().all(|&b| b == 0), "non-zero page {pfn:#x} missing"),
            }
        }
        // Stored pages come in ascending order, whatever the encoding.
        assert!(loaded.pages.keys().is_sorted());
    }
}

#[test]
fn totals_that_do_not_add_up_are_refused() {
    let mem = memory(7);
    let (image, _) = save(&mem, false, 8 << 20).unwrap();
    let mut h = header_of(&image);
    // One zero page claimed too many: the counts no longer cover the memory.
    h.pages_zero += 1;
    let mut bad = image.clone();
    h.encode((&mut bad[..PAGE]).try_into().unwrap());
    assert_eq!(load(&bad).err(), Some(ReadError::Totals("stored, zero and free pages do not add up to the memory saved")));
}
