//! A physical memory map: sorted, non-overlapping regions, adjacent regions of
//! one kind merged. Fixed capacity so it needs no allocator.

use core::fmt;

/// How firmware says a physical range may be used (multiboot/e820 types).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    /// Usable RAM (e820 type 1).
    Ram,
    /// Reserved by firmware (type 2 and anything unknown).
    Reserved,
    /// ACPI tables, reclaimable after boot (type 3).
    AcpiReclaimable,
    /// ACPI non-volatile storage, kept across hibernation (type 4).
    AcpiNvs,
    /// Defective RAM (type 5).
    Defective,
}

impl RegionKind {
    /// Maps an e820/multiboot type number to a kind; unknown types are reserved.
    pub fn from_e820(typ: u32) -> Self {
        match typ {
            1 => Self::Ram,
            3 => Self::AcpiReclaimable,
            4 => Self::AcpiNvs,
            5 => Self::Defective,
            _ => Self::Reserved,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Ram => "RAM",
            Self::Reserved => "reserved",
            Self::AcpiReclaimable => "ACPI",
            Self::AcpiNvs => "ACPI NVS",
            Self::Defective => "defective",
        }
    }
}

/// One physical range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// What it is.
    pub kind: RegionKind,
}

impl Region {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// True if the region holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#014x}-{:#014x}) {:>9} KiB {}", self.start, self.end, self.len() / 1024, self.kind.name())
    }
}

/// Maximum regions kept; real e820 maps have a few dozen.
pub const MAX_REGIONS: usize = 128;

/// Why a region could not be added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// More than [`MAX_REGIONS`] distinct regions.
    Full,
    /// `start + len` overflows.
    Overflow,
}

/// A normalized memory map.
#[derive(Clone)]
pub struct MemoryMap {
    regions: [Region; MAX_REGIONS],
    count: usize,
}

impl Default for MemoryMap {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryMap {
    /// An empty map.
    pub const fn new() -> Self {
        Self { regions: [Region { start: 0, end: 0, kind: RegionKind::Reserved }; MAX_REGIONS], count: 0 }
    }

    /// The regions, sorted by start address.
    pub fn regions(&self) -> &[Region] {
        &self.regions[..self.count]
    }

    /// Adds a range. Where it overlaps existing regions the more restrictive
    /// kind wins (firmware maps do overlap, and RAM must never be assumed
    /// where anything says otherwise).
    pub fn add(&mut self, start: u64, len: u64, kind: RegionKind) -> Result<(), MapError> {
        let end = start.checked_add(len).ok_or(MapError::Overflow)?;
        if len == 0 {
            return Ok(());
        }
        // A more restrictive newcomer takes over the parts it overlaps.
        let mut i = 0;
        while i < self.count {
            let r = self.regions[i];
            if r.start < end && start < r.end && restrictiveness(kind) > restrictiveness(r.kind) {
                self.retype(i, start.max(r.start), end.min(r.end), kind)?;
                i = 0;
                continue;
            }
            i += 1;
        }
        // Then it fills the gaps the existing regions leave.
        let mut gaps = [(0u64, 0u64); MAX_REGIONS + 1];
        let mut n = 0;
        let mut cursor = start;
        for r in self.regions() {
            if r.end <= cursor || r.start >= end {
                continue;
            }
            if r.start > cursor {
                gaps[n] = (cursor, r.start);
                n += 1;
            }
            cursor = cursor.max(r.end);
        }
        if cursor < end {
            gaps[n] = (cursor, end);
            n += 1;
        }
        if self.count + n > MAX_REGIONS {
            return Err(MapError::Full);
        }
        for &(s, e) in &gaps[..n] {
            self.insert(Region { start: s, end: e, kind })?;
        }
        self.merge();
        Ok(())
    }

    /// Gives `[s, e)` inside region `i` the kind `kind`, splitting it.
    fn retype(&mut self, i: usize, s: u64, e: u64, kind: RegionKind) -> Result<(), MapError> {
        if self.count + 2 > MAX_REGIONS {
            return Err(MapError::Full);
        }
        let old = self.regions[i];
        self.remove(i);
        for (rs, re, k) in [(old.start, s, old.kind), (s, e, kind), (e, old.end, old.kind)] {
            if re > rs {
                self.insert(Region { start: rs, end: re, kind: k })?;
            }
        }
        Ok(())
    }

    fn remove(&mut self, i: usize) {
        self.regions.copy_within(i + 1..self.count, i);
        self.count -= 1;
    }

    fn insert(&mut self, region: Region) -> Result<(), MapError> {
        if self.count == MAX_REGIONS {
            return Err(MapError::Full);
        }
        let at = self.regions[..self.count].partition_point(|r| r.start < region.start);
        self.regions.copy_within(at..self.count, at + 1);
        self.regions[at] = region;
        self.count += 1;
        Ok(())
    }

    fn merge(&mut self) {
        let mut i = 0;
        while i + 1 < self.count {
            let (a, b) = (self.regions[i], self.regions[i + 1]);
            if a.end == b.start && a.kind == b.kind {
                self.regions[i].end = b.end;
                self.remove(i + 1);
            } else {
                i += 1;
            }
        }
    }

    /// Bytes of usable RAM.
    pub fn ram_bytes(&self) -> u64 {
        self.ram().map(|r| r.len()).sum()
    }

    /// The usable RAM regions.
    pub fn ram(&self) -> impl Iterator<Item = &Region> {
        self.regions().iter().filter(|r| r.kind == RegionKind::Ram)
    }

    /// True if `[start, start+len)` lies wholly inside one RAM region.
    pub fn is_ram(&self, start: u64, len: u64) -> bool {
        let Some(end) = start.checked_add(len) else { return false };
        self.ram().any(|r| r.start <= start && end <= r.end)
    }
}

fn restrictiveness(kind: RegionKind) -> u8 {
    match kind {
        RegionKind::Ram => 0,
        RegionKind::AcpiReclaimable => 1,
        RegionKind::AcpiNvs => 2,
        RegionKind::Reserved => 3,
        RegionKind::Defective => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(map: &MemoryMap) -> [(u64, u64, RegionKind); 8] {
        let mut out = [(0, 0, RegionKind::Reserved); 8];
        for (o, r) in out.iter_mut().zip(map.regions()) {
            *o = (r.start, r.end, r.kind);
        }
        out
    }

    #[test]
    fn sorts_and_merges_adjacent_ram() {
        let mut map = MemoryMap::new();
        map.add(0x100000, 0x100000, RegionKind::Ram).unwrap();
        map.add(0, 0x9fc00, RegionKind::Ram).unwrap();
        map.add(0x200000, 0x100000, RegionKind::Ram).unwrap();
        assert_eq!(map.regions().len(), 2);
        assert_eq!(map.regions()[0], Region { start: 0, end: 0x9fc00, kind: RegionKind::Ram });
        assert_eq!(map.regions()[1], Region { start: 0x100000, end: 0x300000, kind: RegionKind::Ram });
        assert_eq!(map.ram_bytes(), 0x9fc00 + 0x200000);
    }

    #[test]
    fn reserved_overrides_ram_where_they_overlap() {
        let mut map = MemoryMap::new();
        map.add(0, 0x1000_0000, RegionKind::Ram).unwrap();
        map.add(0x0ff0_0000, 0x20_0000, RegionKind::Reserved).unwrap();
        let k = kinds(&map);
        assert_eq!(k[0], (0, 0x0ff0_0000, RegionKind::Ram));
        assert_eq!(k[1], (0x0ff0_0000, 0x1010_0000, RegionKind::Reserved));
        assert_eq!(map.regions().len(), 2);
        // RAM added over reserved does not turn it back into RAM.
        map.add(0x0ff0_0000, 0x1000, RegionKind::Ram).unwrap();
        assert!(!map.is_ram(0x0ff0_0000, 0x1000));
        assert!(map.is_ram(0x1000, 0x1000));
        assert!(!map.is_ram(0x0fef_f000, 0x2000));
    }

    #[test]
    fn overflow_and_capacity_are_errors() {
        let mut map = MemoryMap::new();
        assert_eq!(map.add(u64::MAX, 2, RegionKind::Ram), Err(MapError::Overflow));
        for i in 0..MAX_REGIONS as u64 {
            map.add(i * 0x2000, 0x1000, RegionKind::Ram).unwrap();
        }
        assert_eq!(map.add(0x1000_0000, 0x1000, RegionKind::Ram), Err(MapError::Full));
        assert_eq!(map.regions().len(), MAX_REGIONS);
    }

    #[test]
    fn a_range_spanning_several_gaps_fills_each() {
        let mut map = MemoryMap::new();
        map.add(0x1000, 0x1000, RegionKind::Reserved).unwrap();
        map.add(0x3000, 0x1000, RegionKind::Reserved).unwrap();
        map.add(0, 0x6000, RegionKind::Ram).unwrap();
        let k = kinds(&map);
        assert_eq!(map.regions().len(), 5);
        assert_eq!(k[0], (0, 0x1000, RegionKind::Ram));
        assert_eq!(k[2], (0x2000, 0x3000, RegionKind::Ram));
        assert_eq!(k[4], (0x4000, 0x6000, RegionKind::Ram));
        assert_eq!(map.ram_bytes(), 0x4000);
    }

    #[test]
    fn empty_ranges_are_ignored() {
        let mut map = MemoryMap::new();
        map.add(0x5000, 0, RegionKind::Ram).unwrap();
        assert!(map.regions().is_empty());
    }
}
