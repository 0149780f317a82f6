//! What the format's integration tests share: test memory, an in-memory
//! partition, a whole save through the real commit protocol, and a walk of
//! an image through the real reader.
#![allow(dead_code)]

use std::collections::BTreeMap;

use ksave_format::chunk::{self, LZ4_GROUP, LZ4_OUT, SealedChunk};
use ksave_format::seal::{DataKey, Seal};
use ksave_format::commit;
use ksave_format::codec::Lz4;
use ksave_format::header::{self, Header, META_BLOCKS, META_BYTES, State};
use ksave_format::reader::{self, ReadError};
use ksave_format::store::{Claim, Claimed};
use ksave_format::writer::{self, ChunkSealer, GROUPS_IN_FLIGHT, GroupBuffers, Inline, InlineSealer, Memory, Sink, Totals, WriteError};
use ksave_format::{BackupPair, PAGE, Range};

/// Test memory: page frame -> contents.
pub struct Mem(pub BTreeMap<u64, Box<[u8; PAGE]>>);

impl Memory for Mem {
    fn page(&self, pfn: u64) -> Option<&[u8; PAGE]> {
        self.0.get(&pfn).map(|b| &**b)
    }
}

/// A partition in a Vec; `flushes` records the header state at each flush.
pub struct Disk {
    pub bytes: Vec<u8>,
    /// The block size: every write must be whole, aligned blocks.
    pub align: u32,
    pub mem: *const Mem,
    pub flushes: Vec<Option<State>>,
}

impl commit::Device for Disk {
    fn flush(&mut self) -> Result<(), Self::Error> {
        let block: &[u8; PAGE] = self.bytes[..PAGE].try_into().unwrap();
        self.flushes.push(Header::decode(block).ok().map(|h| h.state));
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
    /// A zeroed partition of `capacity` bytes and blocks of `align`, for a
    /// save of `mem`.
    pub fn new(capacity: usize, align: u32, mem: &Mem) -> Self {
        Self { bytes: vec![0; capacity], align, mem, flushes: Vec::new() }
    }

    fn check_blocks(&self, offset: u64, len: usize) {
        let align = self.align as u64;
        assert!(offset.is_multiple_of(align) && (len as u64).is_multiple_of(align), "write of {len} bytes at {offset} is not whole {align}-byte blocks");
    }

    fn put(&mut self, at: usize, data: &[u8]) {
        assert!(at + data.len() <= self.bytes.len(), "write beyond the partition");
        self.bytes[at..at + data.len()].copy_from_slice(data);
    }
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

pub const RAM: [Range; 2] = [Range { start: 0, end: 0x40_0000 }, Range { start: 0x100_0000, end: 0x140_0000 }];
pub const IMAGE: Range = Range { start: 0x120_0000, end: 0x121_0000 };
/// ACPI NVS between the RAM ranges, as firmware maps put it.
pub const NVS: [Range; 1] = [Range { start: 0x80_0000, end: 0x80_8000 }];

/// Memory of the two RAM ranges and the NVS: runs of 64 random, zero or
/// text pages, as real memory comes; ksave's own pages are left out, as a
/// save does.
pub fn memory(seed: u64) -> Mem {
    let mut mem = memory_in(&RAM, seed, 64);
    mem.0.extend(memory_in(&NVS, !seed, 64).0);
    mem
}

/// Memory of `ranges` but ksave's own pages: runs of `run` random, zero or
/// text pages.
pub fn memory_in(ranges: &[Range], seed: u64, run: u64) -> Mem {
    let mut rng = xorshift(seed);
    let mut map = BTreeMap::new();
    let mut kind = 0;
    for r in ranges {
        for pfn in r.pages() {
            if IMAGE.contains(pfn * PAGE as u64) {
                continue;
            }
            if pfn % run == 0 {
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

pub const NONCE: u64 = 0x5eed_1234_abcd_0042;
pub const BACKUP: [BackupPair; 2] = [BackupPair { dest: 0x120_0000, src: 0x3f_0000 }, BackupPair { dest: 0x120_1000, src: 0x3f_1000 }];

/// A whole save through the commit protocol ksave runs.
pub fn save(mem: &Mem, lz4: bool, capacity: usize) -> Result<(Vec<u8>, Totals), WriteError<&'static str>> {
    save_ram(mem, &RAM, &NVS, lz4, capacity)
}

/// [`save`] of memory that holds only the RAM ranges `ram`.
pub fn save_ram(mem: &Mem, ram: &[Range], nvs: &[Range], lz4: bool, capacity: usize) -> Result<(Vec<u8>, Totals), WriteError<&'static str>> {
    let mut disk = Disk::new(capacity, 512, mem);
    let (_, totals) = save_to(&mut disk, mem, ram, nvs, lz4)?;
    Ok((disk.bytes, totals))
}

pub fn save_to(disk: &mut Disk, mem: &Mem, ram: &[Range], nvs: &[Range], lz4: bool) -> Result<(Header, Totals), WriteError<&'static str>> {
    save_with(disk, mem, ram, nvs, lz4, &mut commit::NoneFree, None)
}

/// Free blocks by their first page: (first pfn, pages).
pub struct Blocks(pub BTreeMap<u64, u64>);

impl commit::FreePages for Blocks {
    fn free_block(&mut self, pfn: u64) -> Option<u64> {
        self.0.get(&pfn).copied()
    }
}

/// A save leaving out what `free` holds free, sealed under `key` when
/// there is one.
pub fn save_with(
    disk: &mut Disk,
    mem: &Mem,
    ram: &[Range],
    nvs: &[Range],
    lz4: bool,
    free: &mut dyn commit::FreePages,
    key: Option<&DataKey>,
) -> Result<(Header, Totals), WriteError<&'static str>> {
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
        filesystems: &FILESYSTEMS,
        sealed: key.is_some(),
        free_as_found: false,
    };
    let mut block = Box::new([0u8; PAGE]);
    let (mut raw_header, mut meta, mut scratch) = (Box::new([0u8; PAGE]), Box::new([0u8; META_BYTES]), Box::new([0u8; META_BYTES]));
    let seal = key.map(Seal::new);
    let mut chunk = Box::new([0u8; size_of::<SealedChunk>()]);
    let (mut lz4, mut groups) = (Lz4, Box::new([GroupBuffers::EMPTY; GROUPS_IN_FLIGHT + 1]));
    let mut coder = Inline::new(&mut lz4, &mut groups);
    let mut behind = vec![0u8; 128 << 10];
    let mut sealer = seal.as_ref().map(|s| InlineSealer::new(s, &mut chunk));
    let bufs = commit::Buffers {
        block: &mut block,
        meta: &mut meta,
        scratch: &mut scratch,
        writer: writer::Buffers { raw_header: &mut raw_header, coder: Some(&mut coder), write_behind: Some(&mut behind), seal: seal.as_ref().zip(sealer.as_mut()).map(|(s, c)| (s, c as &mut dyn ChunkSealer)) },
    };
    commit::save(&plan, &claimed(), mem, free, disk, bufs, || 0, 0)
}

/// The file systems a saved test system had mounted.
pub const FILESYSTEMS: [header::FsSeen; 2] = [
    header::FsSeen { partuuid: [0x3c; 16], kind: header::FS_EXT4, mounts: 9, mounted_at: 1_700_000_000 },
    header::FsSeen { partuuid: [0x4d; 16], kind: header::FS_EXT4, mounts: 1, mounted_at: 1_700_000_100 },
];

/// The claim the test stores carry.
pub const CLAIM: Claim = Claim { id: [0x5a; 16], disk: [0xd1; 16] };

/// The proof a store is ksave's, as a save gets it from a claimed store.
pub fn claimed() -> Claimed {
    let mut block = [0u8; PAGE];
    Header::claiming(CLAIM, "claimed by ksave setup").encode(&mut block);
    Claimed::check(&block, CLAIM.disk, &CLAIM).expect("a claimed header")
}

/// What a walk of an image handed out.
#[derive(Default)]
pub struct Loaded {
    /// Stored pages, which must come in strictly ascending order.
    pub pages: BTreeMap<u64, Vec<u8>>,
    pub free: Vec<(u64, u64)>,
    pub chunks: Vec<chunk::ChunkInfo>,
}

impl reader::Visitor<&[u8]> for Loaded {
    fn page(&mut self, pfn: u64, data: &[u8; PAGE]) {
        assert!(self.pages.last_key_value().is_none_or(|(&last, _)| pfn > last), "page {pfn:#x} after a page at or above it");
        self.pages.insert(pfn, data.to_vec());
    }
    fn free_run(&mut self, first: u64, pages: u64) {
        self.free.push((first, pages));
    }
    fn chunk(&mut self, c: &chunk::ChunkInfo) {
        self.chunks.push(*c);
    }
}

/// A complete image as the reader accepted it: its header, the lists of
/// its metadata, and what its chunks handed out.
pub struct Walk {
    pub header: Header,
    pub ram: Vec<Range>,
    pub nvs: Vec<Range>,
    pub backup: Vec<BackupPair>,
    pub loaded: Loaded,
}

/// Reads a complete image through the reader, checking everything.
pub fn walk(image: &[u8]) -> Result<Walk, ReadError<&'static str>> {
    walk_with(image, None)
}

/// [`walk`] of an image on a store that is encrypted when `key` is given.
pub fn walk_with(image: &[u8], key: Option<&DataKey>) -> Result<Walk, ReadError<&'static str>> {
    let mut src = image;
    let mut block = [0u8; PAGE];
    let header = reader::read_header(&mut src, &mut block)?;
    if header.state != State::Complete {
        return Err(ReadError::Totals("not complete"));
    }
    let mut meta_buf = Box::new([0u8; META_BLOCKS as usize * PAGE]);
    let meta = reader::read_meta(&mut src, &header, &mut meta_buf)?;
    let seal = key.map(Seal::new);
    reader::check_sealed(seal.as_ref(), &header, &meta, &mut vec![0u8; META_BLOCKS as usize * PAGE])?;
    let (ram, nvs, backup) = (meta.ram_ranges().collect(), meta.nvs_ranges().collect(), meta.backup_pairs().collect());
    let mut loaded = Loaded::default();
    let (mut hb, mut li, mut lo) = (Box::new([0u8; PAGE]), Box::new([0u8; LZ4_OUT]), Box::new([0u8; LZ4_GROUP * PAGE]));
    let mut chunk = Box::new([0u8; size_of::<SealedChunk>()]);
    let bufs = reader::Buffers { header: &mut hb, lz4_in: &mut li, lz4_out: &mut lo, seal: seal.as_ref().map(|s| (s, &mut *chunk)) };
    reader::visit_chunks(&mut src, &header, &reader::Saved::of(&meta, &header), bufs, &mut loaded)?;
    Ok(Walk { header, ram, nvs, backup, loaded })
}

/// [`walk`] of an image saved with [`BACKUP`].
pub fn load_all(image: &[u8]) -> Result<Loaded, ReadError<&'static str>> {
    let w = walk(image)?;
    assert_eq!(w.backup, BACKUP);
    Ok(w.loaded)
}

/// Reads an image back into a page map, checking everything.
pub fn load(image: &[u8]) -> Result<BTreeMap<u64, Vec<u8>>, ReadError<&'static str>> {
    load_all(image).map(|l| l.pages)
}

pub fn assert_same(mem: &Mem, pages: &BTreeMap<u64, Vec<u8>>) {
    for (pfn, data) in &mem.0 {
        match pages.get(pfn) {
            Some(stored) => assert_eq!(&stored[..], &data[..], "page {pfn:#x}"),
            None => assert!(data.iter().all(|&b| b == 0), "non-zero page {pfn:#x} missing"),
        }
    }
    assert!(pages.keys().all(|p| mem.0.contains_key(p)));
}

/// The header block an image starts with.
pub fn header_of(image: &[u8]) -> Header {
    Header::decode(image[..PAGE].try_into().unwrap()).unwrap()
}

/// Bytes of `image` in use: the header, the metadata and the chunks.
pub fn used_len(image: &[u8]) -> usize {
    (header::DATA_OFFSET + header_of(image).data_bytes) as usize
}
