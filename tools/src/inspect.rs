//! Reading a whole image: header, metadata and every chunk, checked.

use anyhow::{Result, anyhow};
use ksave_format::header::{Header, META_BLOCKS, Meta, State};
use ksave_format::chunk::{ChunkInfo, LZ4_GROUP, LZ4_OUT};
use ksave_format::reader;
use ksave_format::{BackupPair, PAGE, Range};

use crate::imagefile::ImageFile;

/// An image's header and metadata.
pub struct Image {
    /// The header.
    pub header: Header,
    /// RAM ranges saved.
    pub ram: Vec<Range>,
    /// Backup pairs.
    pub backup: Vec<BackupPair>,
    /// ACPI NVS ranges saved.
    pub nvs: Vec<Range>,
    /// The metadata blocks as read, for walking the chunks.
    meta: Box<[u8; META_BLOCKS as usize * PAGE]>,
}

/// Reads and checks the header and metadata.
pub fn read(file: &mut ImageFile) -> Result<Image> {
    let header = file.header()?;
    let mut meta = Box::new([0u8; META_BLOCKS as usize * PAGE]);
    if header.state == State::Failed {
        return Ok(Image { header, ram: Vec::new(), backup: Vec::new(), nvs: Vec::new(), meta });
    }
    let parsed = reader::read_meta(file, &header, &mut meta).map_err(|e| anyhow!("{}: {e}", file.description))?;
    let (ram, backup, nvs) = (parsed.ram_ranges().collect(), parsed.backup_pairs().collect(), parsed.nvs_ranges().collect());
    Ok(Image { header, ram, backup, nvs, meta })
}

impl Image {
    /// Every range whose pages the image holds: RAM, then NVS.
    pub fn saved_ranges(&self) -> Vec<Range> {
        self.ram.iter().chain(&self.nvs).copied().collect()
    }
}

/// Walks every chunk with full checks.
pub fn walk(file: &mut ImageFile, image: &Image, mut page: impl FnMut(u64, &[u8; PAGE]), chunk: impl FnMut(&ChunkInfo)) -> Result<()> {
    let meta = Meta::parse(&image.header, &image.meta[..]).map_err(|e| anyhow!("{e}"))?;
    let (mut h, mut li, mut lo) = (Box::new([0u8; PAGE]), Box::new([0u8; LZ4_OUT]), Box::new([0u8; LZ4_GROUP * PAGE]));
    let bufs = reader::Buffers { header: &mut h, lz4_in: &mut li, lz4_out: &mut lo };
    let description = file.description.clone();
    reader::visit_chunks(file, &image.header, &meta, bufs, |pfn, data| page(pfn, data), chunk).map_err(|e| anyhow!("{description}: {e}"))
}
