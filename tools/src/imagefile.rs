//! Opening an image: a partition device, a partition image file, or a whole
//! disk (device or file) with a GPT partition holding one.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use anyhow::{Context, Result, bail};
use ksave_format::PAGE;
use ksave_format::header::{Header, MAGIC, State};
use ksave_format::reader::Source;

use crate::sys;

/// An image inside a file or device, at a byte offset.
pub struct ImageFile {
    /// The file or device.
    pub file: File,
    /// Where the partition starts in it.
    pub offset: u64,
    /// How the image was found, for messages.
    pub description: String,
}

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
        self.file.read_exact_at(buf, self.offset + offset)
    }
}

impl ImageFile {
    /// Opens `path` (read-only, or read-write for `invalidate`).
    pub fn open(path: &Path, write: bool) -> Result<Self> {
        let file = OpenOptions::new().read(true).write(write).open(path).with_context(|| format!("opening {}", path.display()))?;
        drop_cached_blocks(&file).with_context(|| format!("flushing {}'s cache", path.display()))?;
        let mut magic = [0u8; 8];
        file.read_exact_at(&mut magic, 0).with_context(|| format!("reading {}", path.display()))?;
        if magic == MAGIC {
            return Ok(Self { file, offset: 0, description: path.display().to_string() });
        }
        if let Ok(gpt) = sys::gpt_entries(path) {
            for e in gpt.entries {
                let offset = e.first_lba * gpt.block_size;
                if file.read_exact_at(&mut magic, offset).is_ok() && magic == MAGIC {
                    return Ok(Self { file, offset, description: format!("{} partition {} (PARTUUID {})", path.display(), e.first_lba, e.unique) });
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

    /// Marks the image invalidated, with `why` as its message when given
    /// (else it keeps the one it has), and syncs; returns the state it had.
    pub fn invalidate(&mut self, why: Option<&str>) -> Result<State> {
        let mut header = self.header()?;
        let was = header.state;
        header.state = State::Invalidated;
        if let Some(why) = why {
            header.set_message(why);
        }
        self.write_header(&header)?;
        Ok(was)
    }

    /// Rewrites the header block and syncs.
    pub fn write_header(&mut self, header: &Header) -> Result<()> {
        let mut block = [0u8; PAGE];
        header.encode(&mut block);
        self.file.write_all_at(&block, self.offset)?;
        self.file.sync_all()?;
        Ok(())
    }
}
