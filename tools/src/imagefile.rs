//! Opening an image: a partition device, a partition image file, or a whole
//! disk (device or file) with a GPT partition holding one.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use ksave_format::PAGE;
use ksave_format::header::{Header, MAGIC, State};
use ksave_format::reader::Source;
use ksave_format::store::{Extent, StoreMap};
use ksave_format::verdict;

use crate::sys;

/// An image store inside a file or device: a partition device or image
/// file (one extent from its start), or a partition of a whole disk (one
/// extent where the GPT says). Image offsets become file positions by the
/// store's extents, in 512-byte units (every image access is whole 512-byte
/// sectors).
pub struct ImageFile {
    /// The file or device.
    pub file: File,
    extent: [Extent; 1],
    /// How the image was found, for messages.
    pub description: String,
}

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
        let _ = drop_cached_blocks(&self.file);
    }
}

impl Source for ImageFile {
    type Error = std::io::Error;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        let mut at = 0;
        for piece in self.map().pieces(offset, buf.len() as u64).map_err(std::io::Error::other)? {
            self.file.read_exact_at(&mut buf[at..at + piece.bytes as usize], piece.lba * SECTOR)?;
            at += piece.bytes as usize;
        }
        Ok(())
    }
}

impl ImageFile {
    /// Opens `path` (read-only, or read-write for `invalidate`).
    pub fn open(path: &Path, write: bool) -> Result<Self> {
        let file = OpenOptions::new().read(true).write(write).open(path).with_context(|| format!("opening {}", path.display()))?;
        drop_cached_blocks(&file).with_context(|| format!("flushing {}'s cache", path.display()))?;
        let size = sys::device_len(&file)?;
        let mut magic = [0u8; 8];
        file.read_exact_at(&mut magic, 0).with_context(|| format!("reading {}", path.display()))?;
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

    /// Reads the header block (checks it).
    pub fn header(&mut self) -> Result<Header> {
        let mut block = [0u8; PAGE];
        ksave_format::reader::read_header(self, &mut block).map_err(|e| anyhow::anyhow!("{}: {e}", self.description))
    }

    fn new(file: File, extent: Extent, description: String) -> Result<Self> {
        StoreMap::new(SECTOR as u32, &[extent]).map_err(|e| anyhow!("{description}: {e}"))?;
        Ok(Self { file, extent: [extent], description })
    }

    /// The store's extents.
    fn map(&self) -> StoreMap<'_> {
        StoreMap::new(SECTOR as u32, &self.extent).expect("checked in ImageFile::new")
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
        for piece in self.map().pieces(0, PAGE as u64)? {
            self.file.write_all_at(&block[at..at + piece.bytes as usize], piece.lba * SECTOR)?;
            at += piece.bytes as usize;
        }
        self.file.sync_all()?;
        Ok(())
    }
}
