//! Mutation tests of partition lookup (part.rs), deterministic and on
//! stable Rust. Real GPTs, made by `build_gpt` on disks of 512- and
//! 4096-byte blocks, are damaged field by field (LBAs, sizes and counts at
//! their limits, GUIDs swapped, entries moved) and byte by byte; the disk
//! is sometimes cut short or grown. Most cases then re-seal the entry
//! array's CRC32 and the header's, so that the damage reaches the checks
//! behind them; the others leave the CRCs alone, and a change of up to 32
//! bits in one copy must then send the lookup to the other copy.
//!
//! What is asserted: no panic; the reads are bounded by the disk; a
//! partition found lies in the table its `Source` names, inside that
//! table's usable range and inside the disk; the backup is used only when
//! the primary is damaged; an error is the one the two tables call for.
//! Every case is reproducible from its number (the failure message names
//! it).

use crc::{CRC_32_ISO_HDLC, Crc, Table};
use diskdrv::fakes::FakeHal;
use diskdrv::part::{Entry, GptHeader, Guid, PartError, Partition, Source, build_gpt, entries_crc_ok, gpt_head_len, gpt_tail_len};
use diskdrv::part::{find_gpt_partition, parse_entry, parse_gpt_header, parse_mbr};
use diskdrv::{BlockDevice, Direction, DiskError, DiskInfo, MAX_BLOCK, Segment};

/// GPT's CRC32, slice-by-16: the tests re-seal an entry array a case.
const CRC32: Crc<u32, Table<16>> = Crc::<u32, Table<16>>::new(&CRC_32_ISO_HDLC);
const WANTED: Guid = uguid::guid!("9b3c2c1a-5e1f-4b4a-8c6f-2a1d3e4f5a6b");
const OTHER: Guid = uguid::guid!("11111111-2222-3333-4444-555555555555");
const LINUX: Guid = uguid::guid!("0fc63daf-8483-4772-8e79-3d69d8477de4");
/// Bytes of the entry array `build_gpt` writes: 128 entries of 128 bytes.
const ARRAY: usize = 128 * 128;

/// xorshift64*, seeded by the case number.
struct Rng(u64);

impl Rng {
    fn for_case(case: u64) -> Self {
        Self(0x6770_745f_6d75_7461 ^ case.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[(self.next() % xs.len() as u64) as usize]
    }
}

/// A disk in memory that counts its reads (FakeHal's bus addresses are
/// this process's addresses, so a segment is where the bytes go).
struct MemDisk {
    info: DiskInfo,
    bytes: Vec<u8>,
    reads: u64,
}

impl MemDisk {
    fn new(block_size: u32, bytes: Vec<u8>) -> Self {
        let blocks = bytes.len() as u64 / block_size as u64;
        let info = DiskInfo { model: Default::default(), serial: Default::default(), blocks, block_size, lba48: true, dma: true };
        Self { info, bytes, reads: 0 }
    }
}

impl BlockDevice for MemDisk {
    fn info(&self) -> &DiskInfo {
        &self.info
    }

    fn transfer(&mut self, dir: Direction, lba: u64, segments: &[Segment]) -> Result<(), DiskError> {
        assert_eq!(dir, Direction::Read, "a lookup writes nothing");
        self.reads += 1;
        let block = self.info.block_size as u64;
        let mut at = lba.saturating_mul(block);
        for s in segments {
            let end = at.saturating_add(s.len());
            if s.is_empty() || !s.len().is_multiple_of(block) {
                return Err(DiskError::BadSegment(*s));
            }
            if end > self.bytes.len() as u64 {
                return Err(DiskError::OutOfRange { lba, count: s.len() / block, capacity: self.info.blocks });
            }
            // SAFETY: the segment is the buffer the lookup lent for this
            // read (FakeHal: bus address = this process's address).
            unsafe { std::ptr::copy_nonoverlapping(self.bytes[at as usize..].as_ptr(), s.addr() as *mut u8, s.len() as usize) };
            at = end;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        Ok(())
    }
}

/// A disk holding a real GPT: three partitions, the wanted one second.
struct Seed {
    block: usize,
    bytes: Vec<u8>,
    found: Partition,
}

fn seed(block: usize, blocks: u64) -> Seed {
    let (first, last) = ((2 * block + ARRAY) as u64 / block as u64, blocks - 2 - ARRAY as u64 / block as u64);
    let span = (last - first) / 4;
    let parts = [(OTHER, 0), (WANTED, 1), (Guid::from_bytes([0x5a; 16]), 3)]
        .map(|(unique, i)| Entry { type_guid: LINUX, unique, first_lba: first + i * span, last_lba: first + (i + 1) * span - 1 });
    let (mut head, mut tail) = (vec![0; gpt_head_len(block)], vec![0; gpt_tail_len(block)]);
    build_gpt(block, blocks, Guid::from_bytes([0xd1; 16]), &parts, &mut head, &mut tail);
    let mut bytes = vec![0u8; blocks as usize * block];
    bytes[..head.len()].copy_from_slice(&head);
    let at = bytes.len() - tail.len();
    bytes[at..].copy_from_slice(&tail);
    let found = lookup(&mut MemDisk::new(block as u32, bytes.clone())).expect("a fresh GPT has the partition");
    assert_eq!((found.first_lba, found.last_lba, found.source), (parts[1].first_lba, parts[1].last_lba, Source::GptPrimary));
    Seed { block, bytes, found }
}

fn lookup(disk: &mut MemDisk) -> Result<Partition, PartError> {
    let mut buf = Box::new([0u8; MAX_BLOCK]);
    find_gpt_partition(disk, &FakeHal::default(), WANTED, &mut buf)
}

/// GPT header fields: (offset, width) (UEFI 2.10, table 5.5).
const HEADER_FIELDS: [(usize, usize); 14] =
    [(0, 8), (8, 4), (12, 4), (16, 4), (20, 4), (24, 8), (32, 8), (40, 8), (48, 8), (56, 16), (72, 8), (80, 4), (84, 4), (88, 4)];
/// Entry fields: type, unique GUID, first and last LBA, attributes, name.
const ENTRY_FIELDS: [(usize, usize); 6] = [(0, 16), (16, 16), (32, 8), (40, 8), (48, 8), (56, 72)];

/// Values a field of a GPT on a disk of `blocks` blocks is set to.
fn gpt_values(blocks: u64) -> Vec<u64> {
    let mut v = vec![0, 1, 2, 3, 33, 34, 35, 91, 92, 93, 127, 128, 129, 256, 511, 512, 513, 4096, 16383, 16384, 16385];
    v.extend([blocks - 35, blocks - 34, blocks - 2, blocks - 1, blocks, blocks + 1, 2 * blocks, 1 << 31, u32::MAX as u64 - 1]);
    v.extend([u32::MAX as u64, 1 << 32, 1 << 40, 1 << 63, u64::MAX - blocks, u64::MAX - 1, u64::MAX]);
    v
}

/// Where one copy of the GPT lies: its header and its entry array.
#[derive(Clone, Copy)]
struct Half {
    header: usize,
    entries: usize,
}

fn halves(s: &Seed) -> [Half; 2] {
    let end = s.bytes.len() - s.block;
    [Half { header: s.block, entries: 2 * s.block }, Half { header: end, entries: end - ARRAY }]
}

/// Damages one copy of the GPT (or the protective MBR): a field set to a
/// limit or a neighbour, a GUID swapped, a bit or a byte. Returns the bytes
/// it may have changed.
fn damage(rng: &mut Rng, s: &Seed, bytes: &mut [u8], copy: Half, values: &[u64]) -> std::ops::Range<usize> {
    let (at, width) = match rng.next() % 10 {
        0..=3 => {
            let (off, width) = rng.pick(&HEADER_FIELDS);
            (copy.header + off, width)
        }
        4..=6 => {
            let (off, width) = rng.pick(&ENTRY_FIELDS);
            (copy.entries + 128 * rng.pick(&[0, 1, 1, 2, 3, 127]) + off, width)
        }
        // The protective MBR's entries: type, first sector, count; its signature.
        7 => {
            let entry = 446 + 16 * (rng.next() % 4) as usize;
            rng.pick(&[(entry + 4, 1), (entry + 8, 4), (entry + 12, 4), (510, 2)])
        }
        _ => {
            let at = rng.pick(&[0, copy.header, copy.entries, copy.entries + 128]) + (rng.next() % s.block.min(512) as u64) as usize;
            bytes[at] ^= 1 << (rng.next() % 8);
            return at..at + 1;
        }
    };
    let field = &mut bytes[at..at + width];
    if width >= 16 {
        let guid = [WANTED.to_bytes(), OTHER.to_bytes(), LINUX.to_bytes(), [0; 16], (rng.next() as u128).to_le_bytes()];
        field[..16].copy_from_slice(&rng.pick(&guid));
        return at..at + 16;
    }
    let old = field.iter().rev().fold(0u64, |v, &b| v << 8 | b as u64);
    let new = match rng.next() % 4 {
        0 | 1 => rng.pick(values),
        2 => old.wrapping_add(rng.pick(&[1, u64::MAX, 2, u64::MAX - 1])),
        _ => old ^ 1 << (rng.next() % (8 * width as u64)),
    };
    field.copy_from_slice(&new.to_le_bytes()[..width]);
    at..at + width
}

fn le(b: &[u8], at: usize, width: usize) -> u64 {
    b[at..at + width].iter().rev().fold(0, |v, &x| v << 8 | x as u64)
}

/// Re-seals a copy: its entry array's CRC (over the array its header now
/// describes, if that is on the disk), then its header's CRC.
fn seal(bytes: &mut [u8], copy: Half, block: usize, entries_too: bool) {
    let h = copy.header;
    let array = le(bytes, h + 72, 8).checked_mul(block as u64).zip(le(bytes, h + 80, 4).checked_mul(le(bytes, h + 84, 4)));
    if let (true, Some((start, len))) = (entries_too, array)
        && start.saturating_add(len) <= bytes.len() as u64
    {
        let crc = CRC32.checksum(&bytes[start as usize..(start + len) as usize]);
        bytes[h + 88..h + 92].copy_from_slice(&crc.to_le_bytes());
    }
    let size = (le(bytes, h + 12, 4) as usize).clamp(92, 512);
    bytes[h + 16..h + 20].fill(0);
    let crc = CRC32.checksum(&bytes[h..h + size]);
    bytes[h + 16..h + 20].copy_from_slice(&crc.to_le_bytes());
}

/// The entry array `h` describes, if the disk holds it.
fn array<'b>(bytes: &'b [u8], block: usize, h: &GptHeader) -> Option<&'b [u8]> {
    let start = h.entries_lba.checked_mul(block as u64)?;
    let end = start.checked_add(h.entry_count as u64 * h.entry_size as u64).filter(|&end| end <= bytes.len() as u64)?;
    Some(&bytes[start as usize..end as usize])
}

/// The header at `lba` of a disk, and whether its entry array (read
/// whole, as the spec describes it) is on the disk and matches its CRC.
fn table(bytes: &[u8], block: usize, lba: u64) -> Option<(GptHeader, bool)> {
    let at = lba.checked_mul(block as u64).filter(|&at| at < bytes.len() as u64)? as usize;
    let h = parse_gpt_header(bytes[at..at + 512].try_into().unwrap(), lba)?;
    Some((h, array(bytes, block, &h).is_some_and(|a| CRC32.checksum(a) == h.entries_crc)))
}

/// The first entry of a valid table with the wanted GUID.
fn wanted_in(bytes: &[u8], block: usize, h: &GptHeader) -> Option<Entry> {
    array(bytes, block, h)?.chunks(h.entry_size as usize).filter_map(parse_entry).find(|e| e.unique == WANTED)
}

/// What the lookup returned agrees with the two tables on the disk.
fn check_lookup(case: u64, bytes: &[u8], block: usize, got: &Result<Partition, PartError>) {
    let last = (bytes.len() / block) as u64 - 1;
    let primary = table(bytes, block, 1);
    let backup_lba = primary.as_ref().map(|p| p.0.alternate_lba).filter(|a| (2..=last).contains(a)).unwrap_or(last);
    let used = match primary {
        Some((h, true)) => Some((h, Source::GptPrimary)),
        _ => table(bytes, block, backup_lba).and_then(|(h, ok)| ok.then_some((h, Source::GptBackup))),
    };
    match (got, used) {
        (Ok(p), Some((h, source))) => {
            let e = wanted_in(bytes, block, &h).unwrap_or_else(|| panic!("case {case}: {p:?} is in no entry of the {source:?} table"));
            assert_eq!((p.first_lba, p.last_lba, p.source), (e.first_lba, e.last_lba, source), "case {case}: found where the tables do not say");
            assert!(h.usable.0 <= p.first_lba && p.first_lba <= p.last_lba && p.last_lba <= h.usable.1, "case {case}: {p:?} outside {:?}", h.usable);
            assert!(p.last_lba <= last, "case {case}: {p:?} runs past the disk's last block {last}");
        }
        (Err(PartError::NotFound), Some((h, source))) => {
            let e = wanted_in(bytes, block, &h);
            let usable = |e: &Entry| h.usable.0 <= e.first_lba && e.first_lba <= e.last_lba && e.last_lba <= h.usable.1 && e.last_lba <= last;
            assert!(!e.as_ref().is_some_and(usable), "case {case}: the {source:?} table has {e:?}, yet not found");
        }
        (Err(PartError::NoValidGpt | PartError::Disk(_)), None) => {}
        // A read past the end of the disk for an array the header puts there.
        (Err(PartError::Disk(DiskError::OutOfRange { .. })), Some(_)) => {}
        (got, used) => panic!("case {case}: lookup gave {got:?}, the tables say {:?}", used.map(|u| u.1)),
    }
}

/// Whole lookups on damaged disks.
#[test]
fn gpt_lookups() {
    const CASES: u64 = 4_000;
    let start = std::time::Instant::now();
    let seeds = [seed(512, 256), seed(4096, 64)];
    for case in 0..CASES {
        let rng = &mut Rng::for_case(case);
        let s = &seeds[case as usize % 2];
        let (block, blocks) = (s.block, (s.bytes.len() / s.block) as u64);
        let values = gpt_values(blocks);
        let mut bytes = s.bytes.clone();
        let damaged = rng.pick(&[0, 0, 0, 1]);
        let copy = halves(s)[damaged];
        let (mut from, mut to) = (usize::MAX, 0);
        for _ in 0..rng.pick(&[1, 1, 1, 2, 3]) {
            let r = damage(rng, s, &mut bytes, copy, &values);
            (from, to) = (from.min(r.start), to.max(r.end));
        }
        let sealing = rng.next() % 4;
        if sealing > 0 {
            seal(&mut bytes, copy, block, sealing > 1);
        }
        let resized = rng.next().is_multiple_of(10);
        if resized {
            bytes.resize(block * rng.pick(&[3, 8, blocks as usize / 2, blocks as usize - 1, blocks as usize + 1, 2 * blocks as usize]), 0);
        }
        let mut disk = MemDisk::new(block as u32, bytes);
        let got = lookup(&mut disk);
        assert!(disk.reads <= 2 * disk.info.blocks + 4, "case {case}: {} reads of a disk of {} blocks", disk.reads, disk.info.blocks);
        check_lookup(case, &disk.bytes, block, &got);
        if sealing == 0 && !resized && short_burst(&s.bytes[from..to], &disk.bytes[from..to]) {
            // Caught by a CRC32 (bursts up to 32 bits), or outside what
            // the CRCs cover: either way the other copy, or this one, has it.
            let p = got.unwrap_or_else(|e| panic!("case {case}: one copy damaged in up to 32 bits, and {e:?}"));
            assert_eq!((p.first_lba, p.last_lba), (s.found.first_lba, s.found.last_lba), "case {case}: one copy damaged");
        }
    }
    println!("gpt_lookups: {CASES} cases in {:.2?}", start.elapsed());
}

/// Whether `a` and `b` differ, only within four adjacent bytes.
fn short_burst(a: &[u8], b: &[u8]) -> bool {
    let first = a.iter().zip(b).position(|(x, y)| x != y);
    let last = a.iter().zip(b).rposition(|(x, y)| x != y);
    matches!((first, last), (Some(f), Some(l)) if l - f < 4)
}

/// A classic MBR for a disk of `blocks` sectors: two partitions, the
/// second up to the disk's last sector.
fn classic_mbr(mbr: &mut [u8], blocks: u64) {
    let half = blocks as u32 / 2;
    for (i, (kind, first, count)) in [(0x83u8, 1, half - 1), (0x07, half, half)].into_iter().enumerate() {
        let e = &mut mbr[446 + 16 * i..446 + 16 * (i + 1)];
        e[4] = kind;
        e[8..12].copy_from_slice(&u32::to_le_bytes(first));
        e[12..16].copy_from_slice(&u32::to_le_bytes(count));
    }
}

/// What UEFI 2.10 (5.3.2) and part.rs's contract allow of a GPT header
/// read from `lba`: whether [`parse_gpt_header`] must take it.
fn header_valid(sector: &[u8; 512], lba: u64) -> bool {
    let size = le(sector, 12, 4) as usize;
    let mut zeroed = *sector;
    zeroed[16..20].fill(0);
    let sealed = (92..=512).contains(&size) && CRC32.checksum(&zeroed[..size]) == le(sector, 16, 4) as u32;
    let entry_size = le(sector, 84, 4);
    let sane = le(sector, 24, 8) == lba && entry_size >= 128 && entry_size.is_multiple_of(128) && le(sector, 80, 4) <= 16384;
    &sector[..8] == b"EFI PART" && sealed && sane && le(sector, 40, 8) <= le(sector, 48, 8)
}

/// Headers, entries and MBRs alone: each parser takes exactly what the
/// rules allow, and what it takes is what the bytes say.
#[test]
fn gpt_parsers() {
    const CASES: u64 = 12_000;
    let start = std::time::Instant::now();
    let seeds = [seed(512, 256), seed(4096, 64)];
    for case in 0..CASES {
        let rng = &mut Rng::for_case(!case);
        let s = &seeds[case as usize % 2];
        let blocks = (s.bytes.len() / s.block) as u64;
        let (copy, lba) = rng.pick(&[(halves(s)[0], 1), (halves(s)[1], blocks - 1)]);
        let mut bytes = s.bytes.clone();
        if case % 2 == 1 {
            classic_mbr(&mut bytes, blocks);
        }
        for _ in 0..rng.pick(&[1, 1, 2, 3]) {
            damage(rng, s, &mut bytes, copy, &gpt_values(blocks));
        }
        let sealed = !rng.next().is_multiple_of(4);
        if sealed {
            seal(&mut bytes, copy, s.block, false);
        }
        let sector: &[u8; 512] = bytes[copy.header..copy.header + 512].try_into().unwrap();
        assert_eq!(parse_gpt_header(sector, lba).is_some(), header_valid(sector, lba), "case {case}: the parser and the rules disagree");
        if let Some(h) = parse_gpt_header(sector, lba) {
            let fields = (h.my_lba, h.alternate_lba, h.usable, h.entries_lba, h.entry_count, h.entry_size, h.entries_crc);
            let bytes_say = (le(sector, 24, 8), le(sector, 32, 8), (le(sector, 40, 8), le(sector, 48, 8)), le(sector, 72, 8));
            let sizes = (le(sector, 80, 4) as u32, le(sector, 84, 4) as u32, le(sector, 88, 4) as u32);
            assert_eq!(fields, (bytes_say.0, bytes_say.1, bytes_say.2, bytes_say.3, sizes.0, sizes.1, sizes.2), "case {case}: fields");
            assert!(h.my_lba == lba && h.entry_size >= 128 && h.entry_size.is_multiple_of(128) && h.entry_count <= 16384, "case {case}: {h:?}");
            assert!(h.usable.0 <= h.usable.1, "case {case}: usable {:?}", h.usable);
            let original = &s.bytes[copy.header..copy.header + 92];
            assert!(sealed || !short_burst(original, &sector[..92]), "case {case}: a header changed in up to 32 bits, not re-sealed, was accepted");
            // The array, whole or cut short.
            if let Some(a) = array(&bytes, s.block, &h).filter(|_| case % 4 == 0) {
                let cut = &a[..a.len().saturating_sub(rng.pick(&[0, 0, 1, 128, a.len()]))];
                assert_eq!(entries_crc_ok(&h, cut), cut.len() == a.len() && CRC32.checksum(a) == h.entries_crc, "case {case}: array CRC");
            }
        }
        // One entry, cut anywhere.
        let at = copy.entries + 128 * rng.pick(&[0, 1, 2, 3]);
        let cut = rng.pick(&[0, 16, 32, 47, 48, 49, 64, 128]);
        let entry = &bytes[at..at + cut];
        let expect = (cut >= 48 && entry[..16] != [0; 16]).then(|| (&entry[..16], &entry[16..32], le(entry, 32, 8), le(entry, 40, 8)));
        let got = parse_entry(entry).map(|e| (e.type_guid.to_bytes(), e.unique.to_bytes(), e.first_lba, e.last_lba));
        assert_eq!(got.as_ref().map(|g| (&g.0[..], &g.1[..], g.2, g.3)), expect, "case {case}: entry of {cut} bytes");
        // The protective MBR, or any sector taken for an MBR.
        let mbr: &[u8; 512] = bytes[..512].try_into().unwrap();
        let index = (rng.next() % 5) as usize;
        let e = 446 + 16 * index.min(3);
        let (kind, first, count) = (mbr[e + 4], le(mbr, e + 8, 4), le(mbr, e + 12, 4));
        let valid = index < 4 && mbr[510..] == [0x55, 0xaa] && kind != 0 && kind != 0xee && count > 0 && first + count <= blocks;
        let expect = valid.then(|| Partition { first_lba: first, last_lba: first + count - 1, source: Source::Mbr, disk: Guid::ZERO, type_guid: Guid::ZERO });
        assert_eq!(parse_mbr(mbr, index, blocks), expect, "case {case}: MBR entry {index}");
    }
    println!("gpt_parsers: {CASES} cases in {:.2?}", start.elapsed());
}
