//! Mutation tests of every decoder in the format, deterministic and on
//! stable Rust (they replace the cargo-fuzz targets). Valid structures made
//! by the real encoders (a whole image saved through the commit protocol, a
//! config, a mailbox) are damaged: bits flipped, bytes set to interesting
//! values, fields set to their limits and just past them, cut short or
//! extended. Where the structure has a CRC-32C it is re-sealed in most
//! cases, so that the damage reaches the checks behind it, and left alone
//! in the others, where a change of up to 32 bits must be refused.
//!
//! What is asserted: no decoder panics or loops (each test runs on a
//! watchdog thread); each structure's decoder takes exactly what the rules
//! of docs/FORMAT.md allow (written out here from the document, from the
//! bytes), and what it takes encodes back to the same bytes but for what
//! the format ignores; an image the reader accepts keeps every invariant
//! the document states (chunks back to back inside the partition, pages in
//! the saved memory and in order, counts adding up); and an image whose
//! checksums were not re-sealed is refused or yields exactly the original
//! pages, one whose header was re-sealed only pages it had.
//!
//! Every case is reproducible from its test and number alone (the failure
//! message names both).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use common::*;
use crc::{CRC_32_ISCSI, Crc, Table};
use ksave_format::chunk::{self, Encoding, LZ4_GROUP, MAX_FREE_RUNS, MAX_RAW_PAGES};

/// The encoding bytes docs/FORMAT.md names, as a chunk header holds them.
const ENCODING_RAW: u8 = Encoding::Raw as u8;
const ENCODING_LZ4: u8 = Encoding::Lz4 as u8;
const ENCODING_FREE: u8 = Encoding::Free as u8;
use ksave_format::config::{self, Config};
use ksave_format::header::{self, DATA_OFFSET, Header, META_BLOCKS, META_OFFSET, Meta};
use ksave_format::mailbox::{self, Mailbox};
use ksave_format::{PAGE, Range, SECTOR};
use zerocopy::FromBytes;

/// splitmix64, seeded by the test and the case number.
struct Rng(u64);

impl Rng {
    fn new(test: &str, case: u64) -> Self {
        let name = test.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        Self(name ^ case.wrapping_mul(0xa24b_aed4_963e_e407))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let z = (self.0 ^ (self.0 >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }

    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
}

/// Runs `cases` cases on a watchdog thread: `make` builds the seeds there
/// and returns the case body. A case that panics or runs past the limit
/// fails the test with its number.
fn run_cases<F: FnMut(&mut Rng, u64)>(test: &'static str, cases: u64, make: impl FnOnce() -> F + Send + 'static) {
    const LIMIT: Duration = Duration::from_secs(120);
    let current = Arc::new(AtomicU64::new(u64::MAX));
    let (done, finished) = mpsc::channel();
    let at = current.clone();
    let worker = std::thread::spawn(move || {
        let start = Instant::now();
        let mut body = make();
        for case in 0..cases {
            at.store(case, Ordering::Relaxed);
            body(&mut Rng::new(test, case), case);
        }
        done.send(start.elapsed()).unwrap();
    });
    match finished.recv_timeout(LIMIT) {
        Ok(took) => println!("{test}: {cases} cases in {took:.2?}"),
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{test}: case {} still running after {LIMIT:?}", current.load(Ordering::Relaxed)),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            let case = current.load(Ordering::Relaxed);
            eprintln!("{test}: case {case} panicked (a case is reproduced from the test's name and its number)");
            std::panic::resume_unwind(worker.join().unwrap_err());
        }
    }
}

/// The values fields are set to: the limits of every width, the format's
/// own limits with their neighbours, and huge offsets.
fn limits() -> Vec<u64> {
    let format = [
        MAX_RAW_PAGES,
        MAX_FREE_RUNS,
        LZ4_GROUP,
        header::MAX_RAM_RANGES,
        header::MAX_NVS_RANGES,
        header::MAX_BACKUP_PAIRS,
        config::MAX_IOMMUS,
        PAGE,
        SECTOR as usize,
        DATA_OFFSET as usize,
        config::MAX_VMCOREINFO as usize,
        16384,
    ];
    let mut v: Vec<u64> = format.iter().flat_map(|&n| [n as u64 - 1, n as u64, n as u64 + 1]).collect();
    v.extend([0, 1, 2, 3, 0x7f, 0x80, 0xff, 0x7fff, 0x8000, 0xffff, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 1 << 32, 1 << 40, 1 << 52]);
    v.extend([1 << 63, u64::MAX >> 1, u64::MAX - PAGE as u64 + 1, u64::MAX - 1, u64::MAX]);
    v
}

/// Damages `b`, mostly in its first `live` bytes; `dict` holds values
/// that mean something to the structure (its own addresses, page numbers
/// and counts).
struct Mutator {
    limits: Vec<u64>,
    dict: Vec<u64>,
}

/// The header's fields (docs/FORMAT.md), but the message.
const HEADER_FIELDS: &[(usize, usize)] = &[
    (0, 8), (8, 4), (12, 4), (16, 8), (24, 8), (32, 8), (40, 8), (48, 8), (56, 4), (60, 4), (64, 4), (68, 4), (72, 4), (76, 4), (80, 8),
    (88, 8), (96, 8), (104, 8), (112, 8), (120, 4), (124, 4), (384, 8), (400, 8), (408, 2), (416, 8), (424, 4), (428, 4), (432, 4),
    (436, 4), (440, 8), (448, 4), (456, 8), (472, 8), (488, 4), (496, 8), (504, 8), (512, 4), (516, 4), (520, 8), (976, 8), (984, 8), (992, 4), (996, 4), (1000, 8),
];
/// A chunk header's fixed fields; its words follow from 40.
const CHUNK_FIELDS: &[(usize, usize)] = &[(0, 8), (8, 8), (16, 8), (24, 2), (26, 1), (27, 1), (28, 4), (32, 8)];
/// The config's fields, with the first and last range of each list.
const CONFIG_FIELDS: &[(usize, usize)] = &[
    (0, 8), (8, 4), (12, 4), (16, 8), (24, 8), (32, 8), (40, 8), (48, 8), (56, 8), (64, 4), (68, 4), (72, 8), (80, 8), (88, 8), (96, 8),
    (2104, 8), (2112, 8), (2376, 8), (2384, 4), (2388, 4), (2392, 4), (2396, 8), (2404, 8), (2636, 8), (2644, 8), (2652, 4), (2656, 8),
    (2712, 8), (2720, 8), (2728, 8), (2736, 8), (2752, 8), (2768, 4), (2772, 8), (2780, 8), (2788, 4), (2792, 4), (2796, 8),
    (3284, 8), (3292, 4), (3296, 8), (3304, 8), (3312, 8), (3320, 8),
];

impl Mutator {
    fn new(dict: Vec<u64>) -> Self {
        Self { limits: limits(), dict }
    }

    /// One to three damages; `fields` says where the structure's fields
    /// are (offset, width), so that words set to a limit mostly land on one.
    fn mutate(&self, rng: &mut Rng, b: &mut [u8], live: usize, fields: &[(usize, usize)]) {
        for _ in 0..rng.pick(&[1, 1, 1, 1, 1, 2, 2, 3]) {
            self.once(rng, b, live, fields);
        }
    }

    fn once(&self, rng: &mut Rng, b: &mut [u8], live: usize, fields: &[(usize, usize)]) {
        let len = b.len();
        let span = if rng.one_in(8) { len } else { live.clamp(1, len) };
        match rng.below(10) {
            0 | 1 => b[rng.below(span)] ^= 1 << rng.below(8),
            2 => b[rng.below(span)] = rng.pick(&[0, 0xff, 0x7f, 0x80, 1, 2, 8, 0x10, 0x40, 0xfe]),
            3..=6 => {
                let width = rng.pick(&[2, 4, 8, 8]).min(span);
                let (at, width) = match fields {
                    [] => (rng.below(span / width) * width, width),
                    _ if rng.one_in(4) => (rng.below(span / width) * width, width),
                    fields => rng.pick(fields),
                };
                let field = &mut b[at..at + width];
                let mut old = [0u8; 8];
                old[..width].copy_from_slice(field);
                let value = self.value(rng, u64::from_le_bytes(old), width);
                field.copy_from_slice(&value.to_le_bytes()[..width]);
            }
            7 => {
                let n = 1 + rng.below(16).min(span - 1);
                let (to, from) = (rng.below(span - n + 1), rng.below(len - n + 1));
                if rng.one_in(2) {
                    b.copy_within(from..from + n, to);
                } else {
                    b[to..to + n].iter_mut().for_each(|x| *x = rng.next() as u8);
                }
            }
            // The rest of the structure reads as zeros or ones (a short read).
            _ => {
                let fill = rng.pick(&[0, 0xff]);
                b[rng.below(span)..].fill(fill);
            }
        }
    }

    fn value(&self, rng: &mut Rng, old: u64, width: usize) -> u64 {
        let max = if width == 8 { u64::MAX } else { (1 << (8 * width)) - 1 };
        let v = match rng.below(6) {
            0 | 1 => rng.pick(&self.limits),
            2 if !self.dict.is_empty() => rng.pick(&self.dict),
            3 => old.wrapping_add(rng.pick(&[1u64, 1, 1, 2, 8, 512, 4096, 1 << 20]).wrapping_mul(rng.pick(&[1, u64::MAX]))),
            4 => rng.pick(&[0, 1, max, max - 1, max / 2, max / 2 + 1]),
            _ => old ^ 1 << rng.below(8 * width),
        };
        v & max
    }
}

/// The format's CRC-32C, slice-by-16: the tests seal a few blocks a case.
static CRC32C: Crc<u32, Table<16>> = Crc::<u32, Table<16>>::new(&CRC_32_ISCSI);

/// Writes the CRC-32C of everything but the last four bytes into them: the
/// seal of the header, the config and every chunk header.
fn seal(b: &mut [u8]) {
    let n = b.len() - 4;
    let crc = CRC32C.checksum(&b[..n]);
    b[n..].copy_from_slice(&crc.to_le_bytes());
}

/// Whether `b` ends in the CRC-32C of the rest.
fn sealed_ok(b: &[u8]) -> bool {
    b.len() >= 4 && CRC32C.checksum(&b[..b.len() - 4]) == u32_at(b, b.len() - 4)
}

/// Whether `a` and `b` differ, only within four adjacent bytes: a burst of
/// up to 32 bits, which a CRC-32C always detects.
fn short_burst(a: &[u8], b: &[u8]) -> bool {
    let differ: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
    !differ.is_empty() && differ[differ.len() - 1] - differ[0] < 4
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Pages of `ranges` (sorted, disjoint) outside `image`, by arithmetic.
fn pages_outside(ranges: &[Range], image: Range) -> u64 {
    let page = PAGE as u64;
    let (skip_from, skip_to) = (image.start.div_ceil(page), image.end.div_ceil(page));
    ranges.iter().map(|r| r.pages()).map(|p| (p.end - p.start) - p.end.min(skip_to).saturating_sub(p.start.max(skip_from))).sum()
}

/// Whether ranges are whole pages, in order and apart (docs/FORMAT.md).
fn sorted_pages(rs: &[Range]) -> bool {
    rs.iter().all(|r| r.start <= r.end && r.start % 4096 == 0 && r.end % 4096 == 0) && rs.windows(2).all(|p| p[0].end <= p[1].start)
}

/// Whether a range of `a` overlaps one of `b`.
fn overlap(a: &[Range], b: &[Range]) -> bool {
    a.iter().any(|x| b.iter().any(|y| x.start < y.end && y.start < x.end))
}

/// A small image saved through the commit protocol, with raw, LZ4 and
/// free-run chunks, and what the reader made of it.
struct Seed {
    image: Vec<u8>,
    walk: Walk,
    mutator: Mutator,
}

const SMALL_RAM: [Range; 2] = [Range { start: 0, end: 0x2_0000 }, Range { start: 0x11f_8000, end: 0x121_4000 }];
const SMALL_NVS: [Range; 1] = [Range { start: 0x80_0000, end: 0x80_2000 }];

fn seed(lz4: bool, align: u32) -> Seed {
    let mut mem = memory_in(&SMALL_RAM, 11, 4);
    mem.0.extend(memory_in(&SMALL_NVS, 12, 4).0);
    let mut disk = Disk::new(1 << 20, align, &mem);
    let mut free = Blocks(BTreeMap::from([(0x8, 4), (0x11fa, 4)]));
    save_with(&mut disk, &mem, &SMALL_RAM, &SMALL_NVS, lz4, &mut free, None).unwrap();
    let image = disk.bytes[..used_len(&disk.bytes) + 2 * PAGE].to_vec();
    let walk = walk(&image).unwrap();
    let encodings: Vec<u8> = walk.loaded.chunks.iter().map(|c| c.encoding as u8).collect();
    assert!(encodings.contains(&ENCODING_FREE) && encodings.contains(&ENCODING_RAW) && encodings.contains(&ENCODING_LZ4) == lz4, "{encodings:?}");
    // Addresses and page numbers this image is about, and its own counts.
    let h = &walk.header;
    let ranges = SMALL_RAM.iter().chain(&SMALL_NVS).chain([&IMAGE]);
    let mut dict: Vec<u64> = ranges.flat_map(|r| [r.start, r.end, r.start / 4096, r.end / 4096, r.end / 4096 - 1]).collect();
    dict.extend([h.chunks, h.data_bytes, h.pages_stored, h.pages_zero, h.pages_free, image.len() as u64, image.len() as u64 - DATA_OFFSET]);
    dict.extend(walk.loaded.chunks.iter().map(|c| c.offset));
    Seed { image, walk, mutator: Mutator::new(dict) }
}

fn seeds() -> [Seed; 2] {
    [seed(true, 512), seed(false, 4096)]
}

/// An accepted image keeps every rule of docs/FORMAT.md: its chunks lie
/// back to back inside the data it records and inside the partition, its
/// pages inside the saved RAM and NVS and outside ksave's range, its free
/// runs inside the RAM, and its counts add up.
fn check_consistent(case: u64, w: &Walk, partition: usize) {
    let h = &w.header;
    let at = |what: &str| format!("case {case}: accepted image {what}");
    assert!(sorted_pages(&w.ram) && sorted_pages(&w.nvs), "{}: {:x?} {:x?}", at("has unsorted or unaligned ranges"), w.ram, w.nvs);
    assert!(!overlap(&w.nvs, &w.ram), "{}", at("has NVS inside RAM"));
    assert_eq!((w.ram.len(), w.nvs.len(), w.backup.len()), (h.ram_ranges as usize, h.nvs_ranges as usize, h.backup_pairs as usize), "{}", at("lists"));
    let mut offset = DATA_OFFSET;
    for (i, c) in w.loaded.chunks.iter().enumerate() {
        assert!(c.index == i as u64 && c.offset == offset && offset.is_multiple_of(h.align as u64) && c.bytes.is_multiple_of(h.align as u64), "{}: {c:?}", at("chunk"));
        offset += c.bytes;
    }
    assert_eq!(w.loaded.chunks.len() as u64, h.chunks, "{}", at("chunk count"));
    assert!(offset == DATA_OFFSET + h.data_bytes && offset <= partition as u64, "{}", at("data length"));
    let mut saved: Vec<Range> = w.ram.iter().chain(&w.nvs).copied().collect();
    saved.sort_by_key(|r| r.start);
    let inside = |addr: u64, rs: &[Range]| rs.iter().any(|r| r.contains(addr)) && !h.image.contains(addr);
    assert!(w.loaded.pages.keys().all(|&p| inside(p * 4096, &saved)), "{}", at("stores a page outside the saved memory"));
    assert_eq!(w.loaded.pages.len() as u64, h.pages_stored, "{}", at("stored count"));
    let mut free_from = 0;
    for &(first, n) in &w.loaded.free {
        let (start, end) = (first * 4096, (first + n) * 4096);
        let in_one_ram = w.ram.iter().any(|r| r.start <= start && end <= r.end);
        assert!(n > 0 && first >= free_from && in_one_ram && (end <= h.image.start || h.image.end <= start), "{}: {first:#x}+{n}", at("free run"));
        free_from = first + n;
    }
    assert_eq!(w.loaded.free.iter().map(|f| f.1).sum::<u64>(), h.pages_free, "{}", at("free count"));
    assert_eq!(Some(pages_outside(&saved, h.image)), h.pages_stored.checked_add(h.pages_zero).and_then(|n| n.checked_add(h.pages_free)), "{}", at("totals"));
}

/// How much of the original a damaged image that reads must still hold.
#[derive(Clone, Copy, PartialEq)]
enum Same {
    /// Nothing: a re-sealed chunk table may list other pages.
    Nothing,
    /// Some of its pages, each as it was: a re-sealed header may record
    /// fewer chunks (and memory to match), never other contents.
    Pages,
    /// All of it: nothing was re-sealed.
    All,
}

/// Walks a damaged image: refused, or consistent and holding what `same`
/// says of the original.
fn walk_damaged(case: u64, seed: &Seed, image: &[u8], same: Same, what: &str) -> Option<Walk> {
    let w = walk(image).ok()?;
    check_consistent(case, &w, image.len());
    let (pages, free) = (&w.loaded.pages, &w.loaded.free);
    let (all_pages, all_free) = (&seed.walk.loaded.pages, &seed.walk.loaded.free);
    let kept = pages.iter().all(|(pfn, data)| all_pages.get(pfn) == Some(data)) && all_free.starts_with(free);
    assert!(same == Same::Nothing || kept, "case {case}: {what}: accepted with other pages or free runs");
    assert!(same != Same::All || (pages == all_pages && free == all_free), "case {case}: {what}: accepted without some of its pages");
    Some(w)
}

/// The bytes of an accepted header that need not survive a re-encode: the
/// reserved bytes and padding, bits of the FACS word other than bit 0, an
/// unknown FACS signature, an alignment of 0 (read as 512), and the CRC.
/// (The claim and every file system slot, used or not, survive.)
fn header_ignores(b: &[u8], again: &[u8], i: usize) -> bool {
    match i {
        124..128 | 396..400 | 410..416 | 425..428 | 452..456 | 492..496 | 1008.. => true,
        424 => (b[i] ^ again[i]) & 1 == 0,
        428..432 => b[424] & 1 == 0,
        436..440 => u32_at(b, 436) == 0,
        _ => false,
    }
}

/// A header the decoder accepted: re-encoded, it reads back the same and
/// keeps every byte the format gives a meaning; its fields are in range.
fn check_header(case: u64, b: &[u8; PAGE], h: &Header) {
    let mut again = [0u8; PAGE];
    h.encode(&mut again);
    assert_eq!(Header::decode(&again).as_ref(), Ok(h), "case {case}: a re-encoded header reads differently");
    if let Some(i) = (0..PAGE).find(|&i| b[i] != again[i] && !header_ignores(b, &again, i)) {
        panic!("case {case}: byte {i} of an accepted header does not survive a re-encode ({:#x} -> {:#x})", b[i], again[i]);
    }
    assert!(h.align == 512 || h.align == 4096, "case {case}: alignment {}", h.align);
    assert!(h.ram_ranges as usize <= header::MAX_RAM_RANGES && h.nvs_ranges as usize <= header::MAX_NVS_RANGES, "case {case}: range counts");
    assert!(h.backup_pairs as usize <= header::MAX_BACKUP_PAIRS && h.image.start <= h.image.end, "case {case}: backup pairs, ksave range");
}

/// What docs/FORMAT.md allows of a header block, from its bytes: whether
/// [`Header::decode`] must take it.
fn header_valid(b: &[u8]) -> bool {
    let w = |at| u32_at(b, at) as usize;
    let known = b[..8] == header::MAGIC && sealed_ok(b) && w(8) == header::VERSION as usize && (1..=4).contains(&w(12)) && w(56) == PAGE;
    let counts = w(64) <= header::MAX_RAM_RANGES && w(68) <= header::MAX_BACKUP_PAIRS && w(432) <= header::MAX_NVS_RANGES && w(488) <= header::MAX_FILESYSTEMS;
    known && counts && [0, 512, 4096].contains(&w(436)) && u64_at(b, 40) <= u64_at(b, 48)
}

/// The header block: decoded alone (re-sealed or not), and a re-sealed one
/// heading the whole image.
#[test]
fn image_headers() {
    run_cases("image_headers", 9_000, || {
        let seeds = seeds();
        move |rng, case| {
            let seed = &seeds[case as usize % 2];
            let original: &[u8; PAGE] = seed.image[..PAGE].try_into().unwrap();
            let mut block = *original;
            seed.mutator.mutate(rng, &mut block, 1008, HEADER_FIELDS);
            let sealed = !rng.one_in(4);
            if sealed {
                seal(&mut block);
            }
            let decoded = Header::decode(&block);
            assert_eq!(decoded.is_ok(), header_valid(&block), "case {case}: the decoder and docs/FORMAT.md disagree: {decoded:?}");
            let Ok(h) = decoded else { return };
            assert!(sealed || !short_burst(original, &block), "case {case}: a header changed in up to 32 bits, not re-sealed, was accepted");
            check_header(case, &block, &h);
            // The chunks are untouched: whatever reads holds the original's pages.
            if case % 2 == 0 {
                let mut image = seed.image.clone();
                image[..PAGE].copy_from_slice(&block);
                walk_damaged(case, seed, &image, if sealed { Same::Pages } else { Same::All }, "a header");
            }
        }
    });
}

/// Re-seals the metadata of `image` (its CRC in the header, counted from
/// the header's counts), then the header.
fn seal_meta(image: &mut [u8]) {
    let counts = [64, 68, 432].map(|at| u32_at(image, at) as usize);
    let len = header::meta_len(counts[0], counts[1], counts[2]);
    if len <= META_BLOCKS as usize * PAGE {
        let crc = CRC32C.checksum(&image[META_OFFSET as usize..META_OFFSET as usize + len]);
        image[72..76].copy_from_slice(&crc.to_le_bytes());
    }
    seal(&mut image[..PAGE]);
}

/// What docs/FORMAT.md allows of metadata for `header`: whether
/// [`Meta::parse`] must take `bytes`.
fn meta_valid(header: &Header, bytes: &[u8]) -> bool {
    let (ram, backup, nvs) = (header.ram_ranges as usize, header.backup_pairs as usize, header.nvs_ranges as usize);
    let len = 16 * (ram + backup + nvs);
    let ranges = |from: usize, n: usize| -> Vec<Range> { (from..from + n).map(|i| Range { start: u64_at(bytes, 16 * i), end: u64_at(bytes, 16 * i + 8) }).collect() };
    let whole = bytes.len() >= len && CRC32C.checksum(&bytes[..len]) == header.meta_crc;
    whole && sorted_pages(&ranges(0, ram)) && sorted_pages(&ranges(ram + backup, nvs)) && !overlap(&ranges(0, ram), &ranges(ram + backup, nvs))
}

/// The metadata blocks: parsed against a header whose counts may be
/// damaged too, re-sealed or not, cut short; then the whole image.
#[test]
fn metadata() {
    run_cases("metadata", 6_000, || {
        let seeds = seeds();
        move |rng, case| {
            let seed = &seeds[case as usize % 2];
            let mut image = seed.image.clone();
            let (meta_at, meta_end) = (META_OFFSET as usize, DATA_OFFSET as usize);
            let h = &seed.walk.header;
            let in_use = header::meta_len(h.ram_ranges as usize, h.backup_pairs as usize, h.nvs_ranges as usize);
            seed.mutator.mutate(rng, &mut image[meta_at..meta_end], in_use + 32, &[]);
            let recount = rng.one_in(3);
            if recount {
                let count = rng.pick(&[64, 68, 432]);
                let v = seed.mutator.value(rng, u32_at(&image, count) as u64, 4) as u32;
                image[count..count + 4].copy_from_slice(&v.to_le_bytes());
            }
            let sealed = !rng.one_in(4);
            if sealed {
                seal_meta(&mut image);
            } else {
                seal(&mut image[..PAGE]);
            }
            let Ok(header) = Header::decode(image[..PAGE].try_into().unwrap()) else { return };
            let cut = if rng.one_in(8) { rng.below(meta_end - meta_at) } else { meta_end - meta_at };
            let bytes = &image[meta_at..meta_at + cut];
            let parsed = Meta::parse(&header, bytes);
            assert_eq!(parsed.is_ok(), meta_valid(&header, bytes), "case {case}: the parser and docs/FORMAT.md disagree");
            if let Ok(meta) = parsed {
                let covered = &image[meta_at..meta_at + in_use];
                let caught = !sealed && !recount && short_burst(&seed.image[meta_at..meta_at + in_use], covered);
                assert!(!caught, "case {case}: metadata changed in up to 32 bits, not re-sealed, was accepted");
                let lists = (meta.ram_ranges().count(), meta.backup_pairs().count(), meta.nvs_ranges().count());
                assert_eq!(lists, (header.ram_ranges as usize, header.backup_pairs as usize, header.nvs_ranges as usize), "case {case}: list lengths");
                let pairs = meta.backup_pairs().map(|p| Range { start: p.dest, end: p.src });
                let items: Vec<u64> = meta.ram_ranges().chain(pairs).chain(meta.nvs_ranges()).flat_map(|r| [r.start, r.end]).collect();
                let expect: Vec<u64> = (0..items.len()).map(|i| u64_at(bytes, 8 * i)).collect();
                assert_eq!(items, expect, "case {case}: the lists are not the bytes");
                let (ram, nvs): (Vec<Range>, Vec<Range>) = (meta.ram_ranges().collect(), meta.nvs_ranges().collect());
                assert!(sorted_pages(&ram) && sorted_pages(&nvs), "case {case}: ranges {ram:x?} {nvs:x?}");
                assert!(!overlap(&nvs, &ram), "case {case}: NVS inside RAM");
            }
            if case % 2 == 0 {
                walk_damaged(case, seed, &image, Same::Pages, "metadata");
            }
        }
    });
}

/// Re-seals the chunk header at `c` (where the original image has it),
/// the chunk set's CRC over every header's CRC, then the image header.
fn seal_chunk(image: &mut [u8], chunks: &[chunk::ChunkInfo], c: &chunk::ChunkInfo) {
    let end = |c: &chunk::ChunkInfo| c.offset as usize + c.encoding.header_len();
    seal(&mut image[c.offset as usize..end(c)]);
    let mut set = CRC32C.digest();
    chunks.iter().for_each(|c| set.update(&image[end(c) - 4..end(c)]));
    image[76..80].copy_from_slice(&set.finalize().to_le_bytes());
    seal(&mut image[..PAGE]);
}

/// Bytes of a chunk header with `count` words that carry its fields.
fn chunk_live(count: usize) -> usize {
    40 + 8 * count + 8
}

/// The fields of a chunk header with `count` words: the fixed ones and
/// every word (a page number, or half a free run), and the one after.
fn chunk_fields(count: usize) -> Vec<(usize, usize)> {
    CHUNK_FIELDS.iter().copied().chain((0..=count).map(|i| (40 + 8 * i, 8))).collect()
}

/// What docs/FORMAT.md allows of a chunk header, from its bytes: whether
/// [`chunk::decode`] must take it.
fn chunk_valid(h: &[u8]) -> bool {
    let (count, encoding) = (h.get(24..26).map_or(0, |c| u16::from_le_bytes([c[0], c[1]]) as usize), h.get(26).copied());
    let (max, len) = match encoding {
        Some(ENCODING_RAW) => (MAX_RAW_PAGES, PAGE),
        Some(ENCODING_LZ4) => (LZ4_GROUP, SECTOR as usize),
        Some(ENCODING_FREE) if count % 2 == 0 => (MAX_FREE_RUNS * 2, PAGE),
        _ => return false,
    };
    h.len() == len && sealed_ok(h) && (1..=max).contains(&count)
}

/// A chunk header the decoder accepted: consistent, and encoding back to
/// the same bytes but for the words past its count (and the magic and the
/// length byte, which [`chunk::announced_len`] checks before it).
fn check_chunk_header(case: u64, h: &[u8]) {
    let d = chunk::decode(h).unwrap();
    let (len, enc, count) = (h.len(), d.fields.encoding, d.count());
    assert!(len == enc.header_len() && (1..=enc.max_words()).contains(&count), "case {case}: {len} bytes, encoding {enc:?}, {count} words");
    assert!(enc != Encoding::Free || count % 2 == 0, "case {case}: odd free-run words");
    let pfns: Vec<u64> = d.pfns().collect();
    let mut again = vec![0u8; len];
    chunk::encode(&mut again, &d.fields, &pfns);
    let announced = chunk::announced_len(&h[..len.min(SECTOR as usize)]) == Ok(len);
    let ignored = |i: usize| ((i < 8 || i == 27) && !announced) || (40 + 8 * count..len).contains(&i);
    if let Some(i) = (0..len).find(|&i| h[i] != again[i] && !ignored(i)) {
        panic!("case {case}: byte {i} of an accepted chunk header does not survive a re-encode");
    }
}

/// Chunk headers alone: damaged, cut short or extended, re-sealed or not.
#[test]
fn chunk_headers() {
    run_cases("chunk_headers", 10_000, || {
        let seeds = seeds();
        move |rng, case| {
            let seed = &seeds[case as usize % 2];
            let c = rng.pick(&seed.walk.loaded.chunks);
            let at = c.offset as usize;
            let original = &seed.image[at..at + c.encoding.header_len()];
            let mut h = original.to_vec();
            seed.mutator.mutate(rng, &mut h, chunk_live(c.pages as usize), &chunk_fields(c.pages as usize));
            if rng.one_in(6) {
                let len = rng.pick(&[4, 39, 44, 508, 511, 512, 513, 516, 4092, 4095, 4096, 4097, 4100, 8192]);
                h.resize(len, rng.pick(&[0, 0xff]));
            }
            let sealed = !rng.one_in(4);
            if sealed && h.len() >= 4 {
                seal(&mut h);
            }
            let announced = chunk::announced_len(&h[..h.len().min(SECTOR as usize)]);
            if let Ok(n) = announced {
                assert!((n == 512 || n == 4096) && n == h[27] as usize * 512 && h[..8] == chunk::CHUNK_MAGIC, "case {case}: announced {n}");
            }
            assert_eq!(chunk::decode(&h).is_ok(), chunk_valid(&h), "case {case}: the decoder and docs/FORMAT.md disagree");
            if chunk::decode(&h).is_ok() {
                let caught = !sealed && h.len() == original.len() && short_burst(original, &h);
                assert!(!caught, "case {case}: a chunk header changed in up to 32 bits, not re-sealed, was accepted");
                check_chunk_header(case, &h);
            }
        }
    });
}

/// Stored page contents, in order, whatever their page numbers.
fn contents(w: &Walk) -> Vec<&Vec<u8>> {
    let mut v: Vec<_> = w.loaded.pages.values().collect();
    v.sort();
    v
}

/// Chunk headers and tables in the image, re-sealed (each chunk's CRC, the
/// set's CRC in the header, the header's) or not: the reader refuses, or
/// hands out the original's page contents (under page numbers a re-sealed
/// table may have changed) in a consistent image.
#[test]
fn chunk_stream() {
    run_cases("chunk_stream", 6_000, || {
        let seeds = seeds();
        move |rng, case| {
            let seed = &seeds[case as usize % 2];
            let chunks = &seed.walk.loaded.chunks;
            let c = rng.pick(chunks);
            let mut image = seed.image.clone();
            let at = c.offset as usize;
            let whole = if rng.one_in(8) { c.bytes as usize } else { c.encoding.header_len() };
            seed.mutator.mutate(rng, &mut image[at..at + whole], chunk_live(c.pages as usize), &chunk_fields(c.pages as usize));
            let sealed = !rng.one_in(4);
            if sealed {
                seal_chunk(&mut image, chunks, &c);
            }
            if let Some(w) = walk_damaged(case, seed, &image, if sealed { Same::Nothing } else { Same::All }, "a chunk") {
                assert!(contents(&w) == contents(&seed.walk), "case {case}: a re-sealed chunk table handed out other page contents");
            }
        }
    });
}

/// Every word of every chunk's table (page numbers, free runs), set in
/// turn to its neighbours and to the edges of the saved ranges and of
/// ksave's: (seed, chunk, word, value).
fn table_sweep(seeds: &[Seed]) -> Vec<(usize, chunk::ChunkInfo, usize, u64)> {
    let ranges = SMALL_RAM.iter().chain(&SMALL_NVS).chain([&IMAGE]);
    let edges: Vec<u64> = ranges.flat_map(|r| [(r.start / 4096).wrapping_sub(1), r.start / 4096, r.end / 4096 - 1, r.end / 4096]).collect();
    let mut sweep = Vec::new();
    for (s, seed) in seeds.iter().enumerate() {
        for c in &seed.walk.loaded.chunks {
            for word in 0..c.pages as usize {
                let old = u64_at(&seed.image, c.offset as usize + 40 + 8 * word);
                let values = [old.wrapping_sub(1), old.wrapping_add(1), 0, u64::MAX].into_iter().chain(edges.iter().copied());
                sweep.extend(values.filter(|&v| v != old).map(|v| (s, *c, word, v)));
            }
        }
    }
    sweep
}

/// [`table_sweep`], each chunk re-sealed: the reader refuses, or hands out
/// the original's page contents in a consistent image.
#[test]
fn chunk_tables() {
    let cases = table_sweep(&seeds()).len() as u64;
    run_cases("chunk_tables", cases, || {
        let seeds = seeds();
        let sweep = table_sweep(&seeds);
        move |_, case| {
            let (s, c, word, value) = sweep[case as usize];
            let seed = &seeds[s];
            let mut image = seed.image.clone();
            let at = c.offset as usize + 40 + 8 * word;
            image[at..at + 8].copy_from_slice(&value.to_le_bytes());
            seal_chunk(&mut image, &seed.walk.loaded.chunks, &c);
            if let Some(w) = walk_damaged(case, seed, &image, Same::Nothing, "a chunk table") {
                assert!(contents(&w) == contents(&seed.walk), "case {case}: a re-sealed chunk table handed out other page contents");
            }
        }
    });
}

/// A free run moved into ACPI NVS, every checksum and count made good:
/// refused, though NVS is saved memory (firmware's, never free pages the
/// kernel could list; ksave would zero it).
#[test]
fn a_free_run_in_acpi_nvs_is_refused() {
    for seed in seeds() {
        let mut image = seed.image.clone();
        let chunks = &seed.walk.loaded.chunks;
        let c = chunks.iter().find(|c| c.encoding == Encoding::Free).unwrap();
        let table = c.offset as usize + 40;
        assert_eq!((u64_at(&image, table), u64_at(&image, table + 8)), (0x8, 4), "the seed's first free run");
        let nvs_pages = (SMALL_NVS[0].end - SMALL_NVS[0].start) / 4096;
        image[table..table + 8].copy_from_slice(&(SMALL_NVS[0].start / 4096).to_le_bytes());
        image[table + 8..table + 16].copy_from_slice(&nvs_pages.to_le_bytes());
        // The pages no longer listed free count as zero pages.
        let mut h = header_of(&image);
        h.pages_free -= 4 - nvs_pages;
        h.pages_zero += 4 - nvs_pages;
        h.encode((&mut image[..PAGE]).try_into().unwrap());
        seal_chunk(&mut image, chunks, c);
        let Err(e) = walk(&image) else { panic!("a free run in ACPI NVS was accepted") };
        assert!(format!("{e:?}").contains("free run outside the saved RAM"), "{e:?}");
    }
}

/// Damage anywhere in an image, the image cut short or extended, nothing
/// re-sealed: refused, or exactly the original pages.
#[test]
fn whole_images() {
    run_cases("whole_images", 5_000, || {
        let seeds = seeds();
        move |rng, case| {
            let seed = &seeds[case as usize % 2];
            let mut image = seed.image.clone();
            let used = used_len(&image);
            match rng.below(8) {
                0 => {
                    let anywhere = rng.below(used);
                    image.truncate(rng.pick(&[0, PAGE - 1, PAGE, DATA_OFFSET as usize, anywhere, used - 1, used]));
                }
                1 => image.extend((0..rng.below(3 * PAGE)).map(|i| i as u8)),
                _ => seed.mutator.mutate(rng, &mut image, used, &[]),
            }
            walk_damaged(case, seed, &image, Same::All, "damage");
        }
    });
}

/// The bytes of an accepted config that need not survive a re-encode:
/// flag bits other than LZ4 and the self-test, range and IOMMU slots past
/// their counts, the FACS word's other bits, an unknown FACS signature,
/// the padding and the CRC.
fn config_ignores(b: &[u8], again: &[u8], c: &Config, i: usize) -> bool {
    let unused = |from: usize, slot: usize, count: usize, to: usize| (from + slot * count..to).contains(&i);
    match i {
        64 => (b[i] ^ again[i]) & 7 == 0,
        65..68 | 2385..2388 | 3284.. => true,
        2384 => (b[i] ^ again[i]) & 1 == 0,
        2388..2392 => c.facs_signature.is_none(),
        _ => unused(72, 16, c.ram_count, 2120) || unused(2396, 16, c.nvs_count, 2652) || unused(2656, 8, c.iommu_count, 2720),
    }
}

/// A config the decoder accepted: it encodes back to the same bytes but
/// for what the layout ignores, and every field is what ksave relies on.
fn check_config(case: u64, b: &[u8; PAGE], c: &Config) {
    let mut again = [0u8; PAGE];
    c.encode(&mut again);
    assert_eq!(Config::decode(&again).as_ref(), Ok(c), "case {case}: a re-encoded config reads differently");
    if let Some(i) = (0..PAGE).find(|&i| b[i] != again[i] && !config_ignores(b, &again, c, i)) {
        panic!("case {case}: byte {i} of an accepted config does not survive a re-encode ({:#x} -> {:#x})", b[i], again[i]);
    }
    let ok = |rs: &[Range]| rs.iter().all(|r| r.start < r.end && r.start % 4096 == 0 && r.end % 4096 == 0) && rs.windows(2).all(|p| p[0].end <= p[1].start);
    assert!(!c.ram().is_empty() && ok(c.ram()) && ok(c.nvs()), "case {case}: RAM or NVS ranges out of order, empty or not whole pages");
    assert!(!overlap(c.nvs(), c.ram()), "case {case}: NVS inside RAM");
    assert!(c.ram_count <= config::MAX_RANGES && c.nvs_count <= config::MAX_NVS && c.iommu_count <= config::MAX_IOMMUS, "case {case}: counts");
    assert!(!c.partition_guid.is_zero() && c.partition_sectors > 0, "case {case}: partition");
    let note = c.vmcoreinfo;
    assert!(note.start <= note.end && note.end - note.start <= config::MAX_VMCOREINFO, "case {case}: vmcoreinfo {note:x?}");
}

/// What docs/FORMAT.md and the config's decoder contract allow, from the
/// bytes: whether [`Config::decode`] must take them.
fn config_valid(b: &[u8; PAGE]) -> bool {
    let ranges = |at: usize, n: usize| -> Vec<Range> { (0..n).map(|i| Range { start: u64_at(b, at + 16 * i), end: u64_at(b, at + 16 * i + 8) }).collect() };
    let ok = |rs: &[Range]| rs.iter().all(|r| r.start < r.end) && sorted_pages(rs);
    let (ram, nvs, iommus) = (u32_at(b, 68) as usize, u32_at(b, 2392) as usize, u32_at(b, 2652) as usize);
    let known = b[..8] == config::MAGIC && u32_at(b, 12) == 1 && sealed_ok(b) && u32_at(b, 8) == config::VERSION;
    let counts = (1..=config::MAX_RANGES).contains(&ram) && nvs <= config::MAX_NVS && iommus <= config::MAX_IOMMUS && u32_at(b, 2768) as usize <= header::MAX_FILESYSTEMS;
    let note = (u64_at(b, 2720), u64_at(b, 2728));
    let fields = b[32..48] != [0; 16] && u64_at(b, 56) > 0 && note.0 <= note.1 && note.1 - note.0 <= config::MAX_VMCOREINFO;
    // A file store's map: whole pages from the partition's start; no CRC
    // without one.
    let file_map = u64_at(b, 3284).is_multiple_of(PAGE as u64) && (u64_at(b, 3284) != 0 || u32_at(b, 3292) == 0);
    let fields = fields && file_map;
    known && counts && fields && ok(&ranges(72, ram)) && ok(&ranges(2396, nvs)) && !overlap(&ranges(72, ram), &ranges(2396, nvs))
}

/// Configs: one as `ksave setup` writes it, one with every list full, and
/// the block ksave.elf ships.
fn config_seeds() -> Vec<[u8; PAGE]> {
    let mut c = Config::new();
    (c.nonce, c.created_unix, c.partition_first_lba, c.partition_sectors) = (7, 1_700_000_000, 2048, 1 << 20);
    c.partition_guid = uguid::guid!("9b3c2c1a-5e1f-4b4a-8c6f-2a1d3e4f5a6b");
    c.ram[..2].copy_from_slice(&[Range { start: 0, end: 0x9f000 }, Range { start: 0x100000, end: 0x1ffe_0000 }]);
    c.nvs[0] = Range { start: 0x1ffe_0000, end: 0x2000_0000 };
    (c.ram_count, c.nvs_count, c.lz4, c.mailbox, c.facs_signature) = (2, 1, true, 0x7f00_0000, Some(0x1234));
    c.iommus[..2].copy_from_slice(&[bootinfo::acpi::RemappingUnit::Vtd(0xfed9_0000), bootinfo::acpi::RemappingUnit::AmdVi(0xfeb8_0000)]);
    (c.iommu_count, c.vmcoreinfo) = (2, Range { start: 0x3000_0000, end: 0x3000_0e00 });
    let info = "host 6.12.1 \u{e9}t\u{e9} \u{2603}".as_bytes();
    c.info[..info.len()].copy_from_slice(info);
    c.claim = ksave_format::store::Claim { id: [0x5a; 16], disk: [0xd1; 16] };
    c.filesystems[0] = header::FsSeen { partuuid: [0x3c; 16], kind: header::FS_EXT4, mounts: 9, mounted_at: 1_700_000_000 };
    c.fs_count = 1;
    let mut full = c.clone();
    full.filesystems = [c.filesystems[0]; header::MAX_FILESYSTEMS];
    full.fs_count = header::MAX_FILESYSTEMS;
    full.ram = std::array::from_fn(|i| Range { start: 0x20_0000 * i as u64, end: 0x20_0000 * i as u64 + 0x10_0000 });
    full.nvs = std::array::from_fn(|i| Range { start: 0x1000_0000 + 0x2000 * i as u64, end: 0x1000_1000 + 0x2000 * i as u64 });
    full.iommus = std::array::from_fn(|i| bootinfo::acpi::RemappingUnit::Vtd(0xfed0_0000 + 0x1000 * i as u64));
    (full.ram_count, full.nvs_count, full.iommu_count, full.facs_signature) = (config::MAX_RANGES, config::MAX_NVS, config::MAX_IOMMUS, None);
    full.vmcoreinfo = Range { start: 0x3000_0000, end: 0x3000_0000 + config::MAX_VMCOREINFO };
    full.info = [b'x'; config::INFO_LEN];
    full.file_map = Some(config::FileMapAt { offset: 1 << 30, crc: 0xc0ff_ee00 });
    let mut blocks = vec![[0u8; PAGE], [0u8; PAGE], config::SHIPPED];
    c.encode(&mut blocks[0]);
    full.encode(&mut blocks[1]);
    blocks
}

/// The ELF config section: damaged, re-sealed or not.
#[test]
fn config_sections() {
    run_cases("config_sections", 10_000, || {
        let seeds = config_seeds();
        for (i, b) in seeds.iter().enumerate().take(2) {
            check_config(u64::MAX - i as u64, b, &Config::decode(b).unwrap());
        }
        let dict: Vec<u64> = seeds[..2].iter().flat_map(|b| (72..3296).step_by(8).map(|at| u64_at(b, at))).filter(|&v| v != 0).collect();
        let mutator = Mutator::new(dict);
        move |rng, case| {
            let original = &seeds[case as usize % seeds.len()];
            let mut b = *original;
            mutator.mutate(rng, &mut b, 3328, CONFIG_FIELDS);
            let sealed = !rng.one_in(4);
            if sealed {
                seal(&mut b);
            }
            let decoded = Config::decode(&b);
            assert_eq!(decoded.is_ok(), config_valid(&b), "case {case}: the decoder and docs/FORMAT.md disagree: {:?}", decoded.as_ref().err());
            if let Ok(c) = decoded {
                assert!(sealed || !short_burst(original, &b), "case {case}: a config changed in up to 32 bits, not re-sealed, was accepted");
                check_config(case, &b, &c);
            }
        }
    });
}

/// The mailbox page has no checksum: whatever its bytes, ksave's tests of
/// it read exactly them, and a post leaves the stamp alone.
#[test]
fn mailboxes() {
    run_cases("mailboxes", 5_000, || {
        let mut posted = [0u8; PAGE];
        let (mb, _) = Mailbox::mut_from_prefix(&mut posted).unwrap();
        *mb = Mailbox::new(NONCE);
        mb.post(header::fail::IO, "no disk: \u{e9}\u{2603}");
        let mut empty = [0u8; PAGE];
        let (mb, _) = Mailbox::mut_from_prefix(&mut empty).unwrap();
        *mb = Mailbox::new(NONCE);
        let seeds = [posted, empty];
        let mutator = Mutator::new(vec![NONCE, 1, header::fail::IO as u64]);
        move |rng, case| {
            let mut page = seeds[case as usize % 2];
            mutator.mutate(rng, &mut page, 24 + mailbox::MESSAGE_LEN, &[(0, 8), (8, 8), (16, 4), (20, 4)]);
            let cut = rng.below(300);
            assert_eq!(Mailbox::ref_from_prefix(&page[..cut]).is_ok(), cut >= 24 + mailbox::MESSAGE_LEN, "case {case}: a mailbox of {cut} bytes");
            let (mb, _) = Mailbox::ref_from_prefix(&page).unwrap();
            for nonce in [NONCE, u64_at(&page, 8), !NONCE] {
                assert_eq!(mb.is_for(nonce), page[..8] == mailbox::MAGIC && u64_at(&page, 8) == nonce, "case {case}: is_for");
            }
            let text = &page[24..24 + mailbox::MESSAGE_LEN];
            let text = &text[..text.iter().position(|&b| b == 0).unwrap_or(text.len())];
            let expect = (u32_at(&page, 16) == 1).then(|| (u32_at(&page, 20), std::str::from_utf8(text).unwrap_or("(not UTF-8)")));
            assert_eq!(mb.posted(), expect, "case {case}: posted");
            // A post over whatever is there: the stamp and the rest of the page stay.
            let words = ["disk", "\u{e9}chec", "\u{2603}", " ", "NVMe timeout", "\u{1f4be}"];
            let why: String = (0..rng.below(120)).map(|_| rng.pick(&words)).collect();
            let mut after = page;
            let (mb, _) = Mailbox::mut_from_prefix(&mut after).unwrap();
            mb.post(7, &why);
            let mut n = why.len().min(mailbox::MESSAGE_LEN);
            while !why.is_char_boundary(n) {
                n -= 1;
            }
            assert_eq!(mb.posted(), Some((7, &why[..n])), "case {case}: a post reads back");
            assert!(after[..16] == page[..16] && after[24 + mailbox::MESSAGE_LEN..] == page[24 + mailbox::MESSAGE_LEN..], "case {case}: a post wrote outside its fields");
        }
    });
}
