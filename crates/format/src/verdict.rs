//! The one resume verdict: whether an image may be resumed on this machine,
//! and if not, why ([`Refusal`], a typed reason with a stable code).
//!
//! ksave (booted, or kexec'd by kernel C) and the host tool's `ksave
//! resume` ask the same question in the same order: [`resumable`]. ksave
//! prints the refusal's code as `ksave-metric refusal=N` and the tool does
//! too, so tests assert on codes; the sentence ([`Display`]) is for people.
//! Refusals found while loading ([`Refusal::Damaged`]) and before any image
//! is read ([`Refusal::NoStore`]) share the enum, so every way a resume
//! does not happen has one code.
//!
//! [`Display`]: core::fmt::Display

use core::fmt;

use crate::header::{FLAG_IOMMU_LEFT_ON, FLAG_RESUME_ATTEMPTED, Header, HeaderError, Meta, State};
use crate::{PAGE, Range};

/// Who asks: the two resumers differ in one rule only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resumer {
    /// ksave itself, about to load the image. A resume-attempted mark is
    /// the host tool's go-ahead, not a reason to refuse.
    Ksave,
    /// The host tool in a freshly booted kernel. A resume-attempted mark
    /// means an earlier hand-over never finished (ksave invalidates what it
    /// resumes): refused, so that no boot loops on the image.
    Host,
}

/// This machine, as the image must find it.
#[derive(Clone, Copy, Debug)]
pub struct Here<'a> {
    /// Who asks.
    pub resumer: Resumer,
    /// This boot's RAM, page aligned and sorted (as the saving host took it).
    pub ram: &'a [Range],
    /// This boot's ACPI NVS, likewise.
    pub nvs: &'a [Range],
    /// CPUID leaf 0's vendor ([`crate::cpu_vendor`]).
    pub cpu_vendor: [u8; 12],
    /// The CPU can run 5-level paging (CPUID.7.0:ECX.LA57).
    pub la57: bool,
    /// The ACPI FACS hardware signature now, or `None` if it cannot be read.
    pub facs_signature: Option<u32>,
    /// The load range of the ksave that will load the image, if known (the
    /// host tool may not know it; ksave always does).
    pub own: Option<Range>,
    /// The end of the memory the loader can reach (ksave's identity map);
    /// `u64::MAX` when it does not matter.
    pub reach: u64,
}

/// The refusals' stable codes, as `ksave-metric refusal=N` prints them.
pub mod code {
    /// [`Refusal::NoStore`].
    pub const NO_STORE: u32 = 1;
    /// [`Refusal::Unreadable`].
    pub const UNREADABLE: u32 = 2;
    /// [`Refusal::NoImage`].
    pub const NO_IMAGE: u32 = 3;
    /// [`Refusal::SaveFailed`].
    pub const SAVE_FAILED: u32 = 4;
    /// [`Refusal::Incomplete`].
    pub const INCOMPLETE: u32 = 5;
    /// [`Refusal::AlreadyResumed`].
    pub const ALREADY_RESUMED: u32 = 6;
    /// [`Refusal::EarlierAttemptUnfinished`].
    pub const EARLIER_ATTEMPT_UNFINISHED: u32 = 7;
    /// [`Refusal::OtherKsave`].
    pub const OTHER_KSAVE: u32 = 8;
    /// [`Refusal::SnapshotOnly`].
    pub const SNAPSHOT_ONLY: u32 = 9;
    /// [`Refusal::OtherCpuVendor`].
    pub const OTHER_CPU_VENDOR: u32 = 10;
    /// [`Refusal::NoLa57`].
    pub const NO_LA57: u32 = 11;
    /// [`Refusal::HardwareChanged`].
    pub const HARDWARE_CHANGED: u32 = 12;
    /// [`Refusal::HardwareUnknown`].
    pub const HARDWARE_UNKNOWN: u32 = 13;
    /// [`Refusal::BadMetadata`].
    pub const BAD_METADATA: u32 = 14;
    /// [`Refusal::RamMapDiffers`].
    pub const RAM_MAP_DIFFERS: u32 = 15;
    /// [`Refusal::NvsMapDiffers`].
    pub const NVS_MAP_DIFFERS: u32 = 16;
    /// [`Refusal::BeyondReach`].
    pub const BEYOND_REACH: u32 = 17;
    /// [`Refusal::Damaged`].
    pub const DAMAGED: u32 = 18;
    /// A file system the image saw was mounted since ([`super::Refusal::FilesystemMounted`];
    /// the host's check, `ksave resume`).
    pub const FILESYSTEM_MOUNTED: u32 = 19;
    /// The store is encrypted and the image's key is missing, not its, or
    /// the image not sealed ([`super::Refusal::Sealed`]).
    pub const SEALED: u32 = 20;
    /// A file system the image saw cannot be checked by this resumer
    /// ([`super::Refusal::FilesystemUnchecked`]; ksave on a bootloader
    /// start, which reads only the store's disk).
    pub const FILESYSTEM_UNCHECKED: u32 = 21;
}

/// Why an image is not resumed. Each variant has a stable [`code`](Self::code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The store could not be found or opened.
    NoStore,
    /// The store could not be read.
    Unreadable,
    /// No image header, or a bad one.
    NoImage(HeaderError),
    /// The last save failed: a record, not an image.
    SaveFailed,
    /// The save never committed.
    Incomplete,
    /// Resumed once already, or invalidated: never twice.
    AlreadyResumed,
    /// An earlier hand-over to ksave never finished ([`Resumer::Host`] only).
    EarlierAttemptUnfinished,
    /// Saved by a ksave at another load range.
    OtherKsave {
        /// The range the image records.
        saved: Range,
        /// This ksave's.
        here: Range,
    },
    /// The saved kernel's IOMMU was translating at its jump: a snapshot only.
    SnapshotOnly,
    /// Saved on another CPU vendor.
    OtherCpuVendor,
    /// The saved kernel runs in 5-level paging, which this CPU lacks.
    NoLa57,
    /// The ACPI hardware signature changed: the hardware did.
    HardwareChanged {
        /// When saved.
        saved: u32,
        /// Now.
        now: u32,
    },
    /// The image records a hardware signature and this boot's is unknown.
    HardwareUnknown,
    /// The metadata blocks are bad.
    BadMetadata(HeaderError),
    /// This machine's RAM map is not the saved one.
    RamMapDiffers {
        /// MiB saved.
        saved_mib: u64,
        /// Ranges saved.
        saved_ranges: u32,
        /// MiB here.
        here_mib: u64,
        /// Ranges here.
        here_ranges: u32,
    },
    /// This machine's ACPI NVS map is not the saved one.
    NvsMapDiffers {
        /// Ranges saved.
        saved_ranges: u32,
        /// Ranges here.
        here_ranges: u32,
    },
    /// Some memory lies beyond what the loader reaches.
    BeyondReach {
        /// Where the loader's reach ends.
        reach: u64,
    },
    /// A file system the saved system had mounted says it was mounted since
    /// ([`crate::header::FsSeen`]): resuming would undo what was written.
    FilesystemMounted {
        /// Which file system.
        id: crate::header::FsId,
        /// Its mount count when saved, and now.
        mounts: (u32, u32),
        /// Its last mount time when saved, and now.
        mounted_at: (u64, u64),
    },
    /// A btrfs file system the image saw was written since: its superblock
    /// generation moved (code [`code::FILESYSTEM_MOUNTED`] too).
    FilesystemWritten {
        /// Which file system.
        id: crate::header::FsId,
        /// Its generation when saved, and now (`u64::MAX`: no such btrfs).
        generation: (u64, u64),
    },
    /// An XFS the image saw was written since: its log's sector at the
    /// head the freeze left is another (code [`code::FILESYSTEM_MOUNTED`]).
    XfsLogWritten(crate::header::FsId),
    /// A file system the saved system had mounted could not be found and
    /// read here, so a mount since cannot be ruled out.
    FilesystemUnchecked(crate::header::FsId),
    /// The store is on an encrypted volume: the image needs the key the
    /// initramfs reads after the unlock, and must be sealed under it.
    Sealed(&'static str),
    /// A chunk failed its checks while loading.
    Damaged {
        /// The chunk's index (`u64::MAX`: the totals after the last chunk).
        chunk: u64,
        /// What is wrong.
        what: &'static str,
    },
}

impl Refusal {
    /// The stable code (`ksave-metric refusal=N`; one of [`code`]).
    pub fn code(&self) -> u32 {
        match self {
            Self::NoStore => code::NO_STORE,
            Self::Unreadable => code::UNREADABLE,
            Self::NoImage(_) => code::NO_IMAGE,
            Self::SaveFailed => code::SAVE_FAILED,
            Self::Incomplete => code::INCOMPLETE,
            Self::AlreadyResumed => code::ALREADY_RESUMED,
            Self::EarlierAttemptUnfinished => code::EARLIER_ATTEMPT_UNFINISHED,
            Self::OtherKsave { .. } => code::OTHER_KSAVE,
            Self::SnapshotOnly => code::SNAPSHOT_ONLY,
            Self::OtherCpuVendor => code::OTHER_CPU_VENDOR,
            Self::FilesystemMounted { .. } | Self::FilesystemWritten { .. } | Self::XfsLogWritten(_) => code::FILESYSTEM_MOUNTED,
            Self::NoLa57 => code::NO_LA57,
            Self::HardwareChanged { .. } => code::HARDWARE_CHANGED,
            Self::HardwareUnknown => code::HARDWARE_UNKNOWN,
            Self::BadMetadata(_) => code::BAD_METADATA,
            Self::RamMapDiffers { .. } => code::RAM_MAP_DIFFERS,
            Self::NvsMapDiffers { .. } => code::NVS_MAP_DIFFERS,
            Self::BeyondReach { .. } => code::BEYOND_REACH,
            Self::Damaged { .. } => code::DAMAGED,
            Self::Sealed(_) => code::SEALED,
            Self::FilesystemUnchecked(_) => code::FILESYSTEM_UNCHECKED,
        }
    }

    /// A short name for a code, if it is one.
    pub fn name_of(code: u32) -> Option<&'static str> {
        Some(match code {
            code::NO_STORE => "no store",
            code::UNREADABLE => "unreadable",
            code::NO_IMAGE => "no image",
            code::SAVE_FAILED => "save failed",
            code::INCOMPLETE => "incomplete",
            code::ALREADY_RESUMED => "already resumed",
            code::EARLIER_ATTEMPT_UNFINISHED => "earlier attempt unfinished",
            code::OTHER_KSAVE => "other ksave",
            code::SNAPSHOT_ONLY => "snapshot only",
            code::OTHER_CPU_VENDOR => "other CPU vendor",
            code::NO_LA57 => "no LA57",
            code::HARDWARE_CHANGED => "hardware changed",
            code::HARDWARE_UNKNOWN => "hardware unknown",
            code::BAD_METADATA => "bad metadata",
            code::RAM_MAP_DIFFERS => "RAM map differs",
            code::NVS_MAP_DIFFERS => "NVS map differs",
            code::BEYOND_REACH => "beyond reach",
            code::DAMAGED => "damaged",
            code::FILESYSTEM_MOUNTED => "file system mounted since",
            code::SEALED => "sealed",
            code::FILESYSTEM_UNCHECKED => "file system unchecked",
            _ => return None,
        })
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoStore => write!(f, "the image store is not there"),
            Self::Unreadable => write!(f, "the image store cannot be read"),
            Self::NoImage(e) => write!(f, "no resumable image: {e}"),
            Self::SaveFailed => write!(f, "no image: the last save failed"),
            Self::Incomplete => write!(f, "the image is incomplete: its save never committed"),
            Self::AlreadyResumed => write!(f, "the image was already resumed or invalidated: an image is never resumed twice"),
            Self::EarlierAttemptUnfinished => write!(f, "an earlier resume of this image did not finish"),
            Self::OtherKsave { saved, here } => {
                write!(f, "the image was saved by a ksave at {:#x}-{:#x}, this one is at {:#x}-{:#x}", saved.start, saved.end, here.start, here.end)
            }
            Self::SnapshotOnly => write!(
                f,
                "the saved kernel's IOMMU was translating at its jump (no suspend hook: CONFIG_SUSPEND off), which a fresh boot cannot recreate: the image is a snapshot only"
            ),
            Self::OtherCpuVendor => write!(f, "the image was saved on another CPU vendor"),
            Self::NoLa57 => write!(f, "the saved kernel runs with 5-level paging (CR4.LA57), which this CPU does not have"),
            Self::HardwareChanged { saved, now } => {
                write!(f, "the ACPI hardware signature changed ({saved:#x} when saved, {now:#x} now): the hardware configuration changed")
            }
            Self::HardwareUnknown => write!(f, "the image records an ACPI hardware signature, and this boot's cannot be read"),
            Self::BadMetadata(e) => write!(f, "bad image metadata: {e}"),
            Self::RamMapDiffers { saved_mib, saved_ranges, here_mib, here_ranges } => write!(
                f,
                "RAM map differs: the image holds {saved_mib} MiB in {saved_ranges} ranges, this machine has {here_mib} MiB in {here_ranges} ranges"
            ),
            Self::NvsMapDiffers { saved_ranges, here_ranges } => {
                write!(f, "ACPI NVS map differs: the image holds {saved_ranges} ranges, this machine has {here_ranges}")
            }
            Self::BeyondReach { reach } => write!(f, "memory above ksave's identity map ({} GiB)", reach >> 30),
            Self::FilesystemMounted { id, mounts, mounted_at } => write!(
                f,
                "the file system with {id} was mounted since the image was saved (mount count {} then, {} now; last mounted at {} then, {} now): its data moved on",
                mounts.0,
                mounts.1,
                mounted_at.0,
                mounted_at.1
            ),
            Self::FilesystemWritten { id, generation: (_, u64::MAX) } => {
                write!(f, "the btrfs file system with {id} no longer holds its superblock (made another file system since?): its data moved on")
            }
            Self::FilesystemWritten { id, generation: (then, now) } => {
                write!(f, "the btrfs file system with {id} was written since the image was saved (generation {then} then, {now} now): its data moved on")
            }
            Self::XfsLogWritten(id) => {
                write!(f, "the XFS file system with {id} was written since the image was saved (its log moved on from the head the image left): its data moved on")
            }
            Self::Sealed(what) => write!(f, "{what}"),
            Self::FilesystemUnchecked(id) => write!(
                f,
                "the file system with {id}, which the image saw, is not on the store's disk as a partition ksave can read: a mount since cannot be ruled out here (the initramfs checks it)"
            ),
            Self::Damaged { chunk: u64::MAX, what } => write!(f, "image damaged: chunks do not match the header: {what}"),
            Self::Damaged { chunk, what } => write!(f, "image damaged: chunk {chunk}: {what}"),
        }
    }
}

impl core::error::Error for Refusal {}

/// The verdict on the image `header` (and its metadata `meta`, read after
/// the header checked) for the machine `here`. The order is the order of
/// the checks: the header's state first, the memory maps last.
pub fn resumable(header: &Header, meta: Result<&Meta, HeaderError>, here: &Here) -> Result<(), Refusal> {
    match header.state {
        State::Complete => {}
        State::Invalidated => return Err(Refusal::AlreadyResumed),
        State::Writing => return Err(Refusal::Incomplete),
        State::Failed => return Err(Refusal::SaveFailed),
    }
    if here.resumer == Resumer::Host && header.flags & FLAG_RESUME_ATTEMPTED != 0 {
        return Err(Refusal::EarlierAttemptUnfinished);
    }
    if let Some(own) = here.own
        && header.image != own
    {
        return Err(Refusal::OtherKsave { saved: header.image, here: own });
    }
    if header.flags & FLAG_IOMMU_LEFT_ON != 0 {
        return Err(Refusal::SnapshotOnly);
    }
    if header.cpu_vendor != here.cpu_vendor {
        return Err(Refusal::OtherCpuVendor);
    }
    if header.cr4_needed & crate::header::CR4_NEEDED != 0 && !here.la57 {
        return Err(Refusal::NoLa57);
    }
    // The firmware changes the signature when the hardware changed; one
    // that cannot be read is doubt, and doubt refuses.
    match (header.facs_signature, here.facs_signature) {
        (None, _) => {}
        (Some(saved), Some(now)) if saved == now => {}
        (Some(saved), Some(now)) => return Err(Refusal::HardwareChanged { saved, now }),
        (Some(_), None) => return Err(Refusal::HardwareUnknown),
    }
    let meta = meta.map_err(Refusal::BadMetadata)?;
    if !meta.ram_ranges().eq(here.ram.iter().copied()) {
        let mib = |it: &mut dyn Iterator<Item = Range>| it.map(|r| r.end - r.start).sum::<u64>() >> 20;
        return Err(Refusal::RamMapDiffers {
            saved_mib: mib(&mut meta.ram_ranges()),
            saved_ranges: header.ram_ranges,
            here_mib: mib(&mut here.ram.iter().copied()),
            here_ranges: here.ram.len() as u32,
        });
    }
    // The saved kernel's firmware calls expect their NVS where it was.
    if !meta.nvs_ranges().eq(here.nvs.iter().copied()) {
        return Err(Refusal::NvsMapDiffers { saved_ranges: header.nvs_ranges, here_ranges: here.nvs.len() as u32 });
    }
    if here.ram.iter().chain(here.nvs).any(|r| r.end > here.reach) {
        return Err(Refusal::BeyondReach { reach: here.reach });
    }
    Ok(())
}

/// Marks the image whose header block is `block` (as read) invalidated,
/// with `why` as its message (else it keeps its own), in place, ready to be
/// written back; returns the state it had. Every invalidation goes through
/// here (ksave after a load or a refusal, the host tool's `invalidate`,
/// `resume --or-invalidate` and `hibernate`). One already invalidated is
/// left as it is, first reason kept.
pub fn invalidate(block: &mut [u8; PAGE], why: Option<&str>) -> Result<State, HeaderError> {
    let mut header = Header::decode(block)?;
    let was = header.state;
    if was != State::Invalidated {
        header.state = State::Invalidated;
        if let Some(why) = why {
            header.set_message(why);
        }
        // A sealed image's tags go too: setting the state back (its CRC
        // made good) does not make it resumable again.
        header.tag = [0; crate::seal::TAG_LEN];
        header.meta_tag = [0; crate::seal::TAG_LEN];
        header.encode(block);
    }
    Ok(was)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::{MetaLists, encode_meta};

    const RAM: [Range; 2] = [Range { start: 0x1000, end: 0x9f000 }, Range { start: 0x100000, end: 0x2000_0000 }];
    const NVS: [Range; 1] = [Range { start: 0x9f000, end: 0xa0000 }];
    const OWN: Range = Range { start: 0x200_0000, end: 0x208_0000 };

    fn here() -> Here<'static> {
        Here { resumer: Resumer::Ksave, ram: &RAM, nvs: &NVS, cpu_vendor: *b"AuthenticAMD", la57: false, facs_signature: Some(7), own: Some(OWN), reach: 1 << 32 }
    }

    fn image() -> (Header, [u8; 4 * PAGE]) {
        let mut h = Header::new(State::Complete, 1);
        h.image = OWN;
        h.cpu_vendor = *b"AuthenticAMD";
        h.facs_signature = Some(7);
        h.ram_ranges = 2;
        h.nvs_ranges = 1;
        let mut meta = [0u8; 4 * PAGE];
        let (_, crc) = encode_meta(MetaLists { ram: &RAM, backup: &[], nvs: &NVS }, &mut meta);
        h.meta_crc = crc;
        (h, meta)
    }

    fn verdict(change: impl Fn(&mut Header, &mut Here)) -> Result<(), Refusal> {
        let (mut h, meta) = image();
        let mut here = here();
        change(&mut h, &mut here);
        let parsed = Meta::parse(&h, &meta);
        resumable(&h, parsed.as_ref().map_err(|e| *e), &here)
    }

    #[test]
    fn a_matching_image_is_resumable() {
        assert_eq!(verdict(|_, _| {}), Ok(()));
    }

    #[test]
    fn every_check_refuses_with_its_own_code() {
        type Change<'a> = &'a dyn Fn(&mut Header, &mut Here);
        let cases: [(Change, u32); 15] = [
            (&|h, _| h.state = State::Invalidated, code::ALREADY_RESUMED),
            (&|h, _| h.state = State::Writing, code::INCOMPLETE),
            (&|h, _| h.state = State::Failed, code::SAVE_FAILED),
            (&|h, here| (h.flags, here.resumer) = (FLAG_RESUME_ATTEMPTED, Resumer::Host), code::EARLIER_ATTEMPT_UNFINISHED),
            (&|_, here| here.own = Some(Range { start: 0, end: 0x1000 }), code::OTHER_KSAVE),
            (&|h, _| h.flags = FLAG_IOMMU_LEFT_ON, code::SNAPSHOT_ONLY),
            (&|_, here| here.cpu_vendor = *b"GenuineIntel", code::OTHER_CPU_VENDOR),
            (&|h, _| h.cr4_needed = crate::header::CR4_NEEDED, code::NO_LA57),
            (&|_, here| here.facs_signature = Some(8), code::HARDWARE_CHANGED),
            (&|_, here| here.facs_signature = None, code::HARDWARE_UNKNOWN),
            (&|h, _| h.meta_crc ^= 1, code::BAD_METADATA),
            (&|_, here| here.ram = &RAM[..1], code::RAM_MAP_DIFFERS),
            (&|_, here| here.nvs = &[], code::NVS_MAP_DIFFERS),
            (&|_, here| here.reach = 1 << 20, code::BEYOND_REACH),
            (&|h, _| h.flags = crate::header::FLAG_LZ4, 0),
        ];
        for (i, (change, code)) in cases.iter().enumerate() {
            assert_eq!(verdict(change).err().map_or(0, |r| r.code()), *code, "case {i}");
        }
    }

    #[test]
    fn the_mark_is_the_tools_alone_to_honour() {
        assert_eq!(verdict(|h, _| h.flags = FLAG_RESUME_ATTEMPTED), Ok(()));
    }

    #[test]
    fn the_host_need_not_know_ksaves_range_nor_reach() {
        assert_eq!(verdict(|_, here| (here.own, here.reach) = (None, u64::MAX)), Ok(()));
    }

    #[test]
    fn codes_are_distinct_and_named() {
        let mut seen = [false; 22];
        for code in 1..=21 {
            assert!(Refusal::name_of(code).is_some());
            assert!(!core::mem::replace(&mut seen[code as usize], true));
        }
        assert_eq!(Refusal::name_of(22), None);
    }

    #[test]
    fn invalidate_keeps_the_first_reason() {
        let (h, _) = image();
        let mut block = [0u8; PAGE];
        h.encode(&mut block);
        assert_eq!(invalidate(&mut block, Some("why")), Ok(State::Complete));
        let after = Header::decode(&block).unwrap();
        assert_eq!((after.state, after.message()), (State::Invalidated, "why"));
        let before = block;
        assert_eq!(invalidate(&mut block, Some("again")), Ok(State::Invalidated));
        assert_eq!(block, before);
    }
}
