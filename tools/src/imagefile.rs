//! Opening an image: a partition device, a partition image file, a whole
//! disk (device or file) with a GPT partition holding one, an image file
//! (`ksave setup --file`) itself, or the store a setup names (a file store
//! through its partition and map).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use ksave_format::PAGE;
use ksave_format::header::{Header, MAGIC, State};
use ksave_format::reader::Source;
use ksave_format::filemap;
use ksave_format::store::{Extent, StoreMap};
use ksave_format::verdict;

use ksave_format::seal::KeyBlock;

use crate::setup::{FileStore, Setup};
use crate::{filestore, sys};

/// An image store inside a file or device: a partition device or image
/// file (one extent from its start), or a partition of a whole disk (one
/// extent where the GPT says). Image offsets become file positions by the
/// store's extents, in 512-byte units (every image access is whole 512-byte
/// sectors).
pub struct ImageFile {
    /// The file or device.
    pub file: File,
    extents: Vec<Extent>,
    /// Opened O_DIRECT (a mounted partition, whose cache is the file
    /// system's; an image file): every transfer goes through a page-aligned
    /// buffer.
    direct: bool,
    /// The file's or device's length in bytes.
    len: u64,
    /// How the image was found, for messages.
    pub description: String,
    /// The store is a file on an encrypted volume (its map says so): its
    /// images are sealed.
    pub encrypted: bool,
    /// Its key block, read through the unlocked volume (docs/ENCRYPTION.md),
    /// or why not.
    pub key: Result<KeyBlock, String>,
}

/// Why an image file opened by itself has no key.
const NO_KEY: &str = "no key block read (the store's setup names it)";

/// The unit the host addresses a store in.
const SECTOR: u64 = 512;

/// Drops a block device's cached blocks (BLKFLSBUF, linux/fs.h): before
/// reading what ksave wrote behind the kernel's back, and after reading an
/// image, which would otherwise stay in the page cache and be saved with
/// the next image.
fn drop_cached_blocks(file: &File) -> std::io::Result<()> {
    if !file.metadata()?.file_type().is_block_device() {
        return Ok(());
    }
    // SAFETY: BLKFLSBUF takes no argument memory.
    let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(file), linux_raw_sys::ioctl::BLKFLSBUF as _) };
    if rc != 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

impl Drop for ImageFile {
    fn drop(&mut self) {
        // O_DIRECT left nothing cached (and a mounted partition's cache is
        // its file system's).
        if !self.direct {
            let _ = drop_cached_blocks(&self.file);
        }
    }
}

impl Source for ImageFile {
    type Error = std::io::Error;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        let mut at = 0;
        let pieces: Vec<_> = self.map().pieces(offset, buf.len() as u64).map_err(std::io::Error::other)?.collect();
        for piece in pieces {
            let part = &mut buf[at..at + piece.bytes as usize];
            if self.direct {
                // Whole pages around the piece: a file system may want its
                // block size (btrfs does, and reads anything else through
                // the page cache, stale here); a device's end may not be.
                let (at, end) = (piece.lba * SECTOR, piece.lba * SECTOR + piece.bytes);
                let (from, to) = (at / PAGE as u64 * PAGE as u64, end.next_multiple_of(PAGE as u64));
                let (from, to) = if to <= self.len { (from, to) } else { (at, end) };
                let mut bounce = Aligned::new((to - from) as usize);
                self.file.read_exact_at(bounce.bytes(), from)?;
                part.copy_from_slice(&bounce.bytes()[(at - from) as usize..(end - from) as usize]);
            } else {
                self.file.read_exact_at(part, piece.lba * SECTOR)?;
            }
            at += piece.bytes as usize;
        }
        Ok(())
    }
}

/// Page-aligned bytes for O_DIRECT transfers (which need the disk's
/// logical block alignment, at most a page).
struct Aligned(Vec<AlignedPage>, usize);

#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct AlignedPage([u8; PAGE]);

impl Aligned {
    fn new(len: usize) -> Self {
        Self(vec![AlignedPage([0; PAGE]); len.div_ceil(PAGE)], len)
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the pages are contiguous plain bytes (repr(C), size PAGE,
        // no padding) and at least `len` long; the slice borrows self.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), self.1) }
    }
}

impl ImageFile {
    /// Opens the store `setup` names: its partition, or the file in it
    /// (through the partition's blocks and the file's map, which must be
    /// the one setup wrote: a file moved since is refused).
    pub fn open_setup(setup: &Setup, write: bool) -> Result<Self> {
        let mut image = match &setup.file {
            Some(store) => Self::open_file_store(&setup.device, store, write)?,
            None => Self::open(&setup.device, write)?,
        };
        if let Some(volume) = setup.file.as_ref().and_then(|f| f.key.as_ref()) {
            // Whose key it is, the image's header says (inspect::read).
            image.key = crate::keyblock::read(volume).map_err(|e| format!("{e:#}"));
        }
        Ok(image)
    }

    /// Opens the file store `store` in the partition `device`.
    pub fn open_file_store(device: &Path, store: &FileStore, write: bool) -> Result<Self> {
        let (image, crc) = Self::open_file_map(device, store.map_offset, write)?;
        if crc != store.map_crc {
            bail!("{}: its map is not the one setup wrote (CRC {crc:#010x}, setup's {:#010x}): the file moved or was replaced; run `ksave setup --file {}` again", image.description, store.map_crc, store.path.display());
        }
        Ok(image)
    }

    /// Opens the file store whose map begins `map_offset` bytes into the
    /// partition `device`; returns it and its map's CRC.
    pub fn open_file_map(device: &Path, map_offset: u64, write: bool) -> Result<(Self, u32)> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new().read(true).write(write).custom_flags(libc::O_DIRECT).open(device).with_context(|| format!("opening {}", device.display()))?;
        let blocks = sys::device_len(&file)? / SECTOR;
        let description = format!("the image file at byte {map_offset} of {}", device.display());
        let mut image = Self { file, extents: vec![Extent { lba: 0, blocks }], direct: true, len: blocks * SECTOR, description, encrypted: false, key: Err(NO_KEY.into()) };
        let mut table = vec![Extent::default(); filemap::MAX_EXTENTS];
        let part = filemap::Partition { first_lba: 0, blocks, block_size: SECTOR as u32 };
        let head = filemap::read(part, map_offset, |lba, page| image.read_at(lba * SECTOR, page), &mut [0; PAGE], &mut table).map_err(|e| anyhow!("{}: {e}", image.description))?;
        // A map is plaintext and rewritable: a partition that begins with a
        // LUKS header makes the store encrypted whatever it says (as ksave).
        let mut first = [0u8; PAGE];
        image.read_at(0, &mut first)?;
        image.encrypted = head.encrypted || filemap::is_luks(&first);
        image.extents = filemap::image_extents(&mut table[..head.extents], head.image_starts_at_page(), SECTOR as u32).to_vec();
        StoreMap::new(SECTOR as u32, &image.extents).map_err(|e| anyhow!("{}: {e}", image.description))?;
        // As ksave: an image header in the file carries the map's claim.
        let mut block = [0u8; PAGE];
        image.read_at(0, &mut block)?;
        if Header::decode(&block).is_ok_and(|h| h.claim.id != head.claim_id) {
            bail!("{}: its header's claim is not its map's (the map is stale): run `ksave setup` again", image.description);
        }
        Ok((image, head.crc))
    }

    /// Opens `path` (read-only, or read-write for `invalidate`).
    pub fn open(path: &Path, write: bool) -> Result<Self> {
        let file = OpenOptions::new().read(true).write(write).open(path).with_context(|| format!("opening {}", path.display()))?;
        drop_cached_blocks(&file).with_context(|| format!("flushing {}'s cache", path.display()))?;
        let size = sys::device_len(&file)?;
        let mut magic = [0u8; 8];
        file.read_exact_at(&mut magic, 0).with_context(|| format!("reading {}", path.display()))?;
        if magic == filemap::MAGIC && file.metadata()?.file_type().is_file() {
            // An image file itself: the image follows its map. ksave wrote
            // it under the file system, so its cached pages are stale: read
            // it O_DIRECT, from the disk.
            use std::os::unix::fs::OpenOptionsExt;
            if write {
                bail!("{} is an image file, immutable: it is written through its partition (`ksave invalidate` with no path, for the store set up)", path.display());
            }
            // A kernel that cannot drop them reads the disk all the same.
            let _ = filestore::drop_cached_pages(&file);
            let file = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).with_context(|| format!("opening {} O_DIRECT", path.display()))?;
            let mut page = Aligned::new(PAGE);
            file.read_exact_at(page.bytes(), 0)?;
            let pages = u64::from_le_bytes(page.bytes()[16..24].try_into().expect("8 bytes"));
            let start = pages.checked_mul(PAGE as u64).filter(|&s| s > 0 && s < size).with_context(|| format!("{}: its file map is damaged", path.display()))?;
            let mut image = Self::new(file, Extent { lba: start / SECTOR, blocks: (size - start) / SECTOR }, format!("{} (an image file)", path.display()))?;
            image.direct = true;
            return Ok(image);
        }
        if magic == MAGIC {
            return Self::new(file, Extent { lba: 0, blocks: size / SECTOR }, path.display().to_string());
        }
        if let Ok(gpt) = sys::gpt_entries(path) {
            for e in gpt.entries {
                let offset = e.first_lba * gpt.block_size;
                if file.read_exact_at(&mut magic, offset).is_ok() && magic == MAGIC {
                    let blocks = (e.last_lba + 1).saturating_sub(e.first_lba) * gpt.block_size / SECTOR;
                    let extent = Extent { lba: offset / SECTOR, blocks };
                    return Self::new(file, extent, format!("{} partition {} (PARTUUID {})", path.display(), e.first_lba, e.unique));
                }
            }
        }
        bail!("no ksave image on {}: neither a ksave partition nor a disk with one", path.display())
    }

    /// The store's extents (in 512-byte units of the file or device).
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// The store's size in bytes.
    pub fn bytes(&self) -> u64 {
        self.map().bytes()
    }

    /// Reads the header block (checks it).
    pub fn header(&mut self) -> Result<Header> {
        let mut block = [0u8; PAGE];
        ksave_format::reader::read_header(self, &mut block).map_err(|e| anyhow::anyhow!("{}: {e}", self.description))
    }

    fn new(file: File, extent: Extent, description: String) -> Result<Self> {
        StoreMap::new(SECTOR as u32, &[extent]).map_err(|e| anyhow!("{description}: {e}"))?;
        let len = sys::device_len(&file)?;
        Ok(Self { file, extents: vec![extent], direct: false, len, description, encrypted: false, key: Err(NO_KEY.into()) })
    }

    /// The store's extents.
    fn map(&self) -> StoreMap<'_> {
        StoreMap::new(SECTOR as u32, &self.extents).expect("checked when opened")
    }

    /// Marks the image invalidated as [`verdict::invalidate`] does, with
    /// `why` as its message when given (else it keeps the one it has), and
    /// syncs; returns the state it had.
    pub fn invalidate(&mut self, why: Option<&str>) -> Result<State> {
        let mut block = [0u8; PAGE];
        self.read_at(0, &mut block).with_context(|| format!("reading {}", self.description))?;
        let was = verdict::invalidate(&mut block, why).map_err(|e| anyhow!("{}: {e}", self.description))?;
        if was != State::Invalidated {
            self.write_block(&block)?;
        }
        Ok(was)
    }

    /// Rewrites the header block and syncs.
    pub fn write_header(&mut self, header: &Header) -> Result<()> {
        let mut block = [0u8; PAGE];
        header.encode(&mut block);
        self.write_block(&block)
    }

    fn write_block(&mut self, block: &[u8; PAGE]) -> Result<()> {
        let mut at = 0;
        let pieces: Vec<_> = self.map().pieces(0, PAGE as u64)?.collect();
        for piece in pieces {
            let part = &block[at..at + piece.bytes as usize];
            if self.direct {
                let mut bounce = Aligned::new(part.len());
                bounce.bytes().copy_from_slice(part);
                self.file.write_all_at(bounce.bytes(), piece.lba * SECTOR)?;
            } else {
                self.file.write_all_at(part, piece.lba * SECTOR)?;
            }
            at += piece.bytes as usize;
        }
        self.file.sync_all()?;
        Ok(())
    }
}
