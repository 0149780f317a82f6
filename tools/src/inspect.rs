//! Reading a whole image: header, metadata and every chunk, checked.

use anyhow::{Result, anyhow, bail};
use ksave_format::chunk::{ChunkInfo, LZ4_GROUP, LZ4_OUT, SealedChunk};
use ksave_format::seal::Seal;
use ksave_format::header::{Header, META_BLOCKS, Meta, State};
use ksave_format::reader;
use ksave_format::{BackupPair, PAGE, Range};

use crate::imagefile::ImageFile;
use crate::sys;
use ksave_format::verdict::{self, Here, Refusal, Resumer};

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
    /// The image is sealed, or its store encrypted: the cipher its key
    /// block gave, once the header's and metadata's tags checked, or why
    /// there is none (docs/ENCRYPTION.md).
    pub seal: Option<Result<Seal, String>>,
}

/// Reads and checks the header and metadata.
pub fn read(file: &mut ImageFile) -> Result<Image> {
    let header = file.header()?;
    let mut meta = Box::new([0u8; META_BLOCKS as usize * PAGE]);
    if header.state == State::Failed {
        return Ok(Image { header, ram: Vec::new(), backup: Vec::new(), nvs: Vec::new(), meta, seal: None });
    }
    let parsed = reader::read_meta(file, &header, &mut meta).map_err(|e| anyhow!("{}: {e}", file.description))?;
    let seal = (file.encrypted || header.sealed()).then(|| {
        let block = file.key.as_ref().map_err(Clone::clone)?;
        if block.claim_id != header.claim.id {
            return Err("the key block is another store's".to_string());
        }
        if block.nonce != header.nonce {
            return Err("the key block holds another image's key (a later save's, or one never completed)".to_string());
        }
        let seal = Seal::new(&block.key);
        let checked = if file.encrypted { Some(&seal) } else { None };
        reader::check_sealed::<std::io::Error>(checked, &header, &parsed, &mut vec![0u8; META_BLOCKS as usize * PAGE]).map_err(|e| e.to_string())?;
        Ok(seal)
    });
    let (ram, backup, nvs) = (parsed.ram_ranges().collect(), parsed.backup_pairs().collect(), parsed.nvs_ranges().collect());
    Ok(Image { header, ram, backup, nvs, meta, seal })
}

impl Image {
    /// The resume verdict on this machine, asked as ksave asks it
    /// (`verdict::resumable`); ksave asks again at the resume, with its
    /// own load range and reach, which the host does not know.
    pub fn verdict_here(&self) -> Result<Result<(), Refusal>> {
        let (ram, nvs) = (sys::ram_ranges()?, sys::nvs_ranges()?);
        let here = Here {
            resumer: Resumer::Host,
            ram: &ram,
            nvs: &nvs,
            cpu_vendor: ksave_format::cpu_vendor(),
            la57: ksave_format::cpu_has_la57(),
            facs_signature: sys::acpi_hardware_signature(),
            own: None,
            reach: u64::MAX,
        };
        let meta = Meta::parse(&self.header, &self.meta[..]);
        Ok(verdict::resumable(&self.header, meta.as_ref().map_err(|e| *e), &here).and(match &self.seal {
            Some(Err(_)) => Err(Refusal::Sealed("the image is sealed and its key is not to be had: the key block is destroyed, another image's, or the volume locked")),
            _ => Ok(()),
        }))
    }

    /// Whether it is sealed, for people.
    pub fn sealed_note(&self) -> Option<String> {
        match &self.seal {
            None => None,
            Some(Ok(_)) => Some("encrypted (AES-256-GCM), key block present and its tags check".into()),
            Some(Err(why)) => Some(format!("encrypted (AES-256-GCM); not readable: {why}")),
        }
    }

    /// Every range whose pages the image holds: RAM, then NVS.
    pub fn saved_ranges(&self) -> Vec<Range> {
        self.ram.iter().chain(&self.nvs).copied().collect()
    }
}

/// What a walk hands out: each stored page, each free run (first pfn,
/// pages), each chunk once checked.
pub struct Walk<P, F, C> {
    /// A stored page.
    pub page: P,
    /// A run of pages the kernel held free.
    pub free: F,
    /// A chunk that passed its checks.
    pub chunk: C,
}

impl<P: FnMut(u64, &[u8; PAGE]), F: FnMut(u64, u64), C: FnMut(&ChunkInfo)> Walk<P, F, C> {
    /// The three callbacks (a function, so closures get their types).
    pub fn new(page: P, free: F, chunk: C) -> Self {
        Self { page, free, chunk }
    }
}

impl<P: FnMut(u64, &[u8; PAGE]), F: FnMut(u64, u64), C: FnMut(&ChunkInfo)> reader::Visitor<ImageFile> for Walk<P, F, C> {
    fn page(&mut self, pfn: u64, data: &[u8; PAGE]) {
        (self.page)(pfn, data)
    }
    fn free_run(&mut self, first: u64, pages: u64) {
        (self.free)(first, pages)
    }
    fn chunk(&mut self, info: &ChunkInfo) {
        (self.chunk)(info)
    }
}

/// Walks every chunk with full checks.
pub fn walk<P: FnMut(u64, &[u8; PAGE]), F: FnMut(u64, u64), C: FnMut(&ChunkInfo)>(file: &mut ImageFile, image: &Image, mut visit: Walk<P, F, C>) -> Result<()> {
    let meta = Meta::parse(&image.header, &image.meta[..]).map_err(|e| anyhow!("{e}"))?;
    let (mut h, mut li, mut lo) = (Box::new([0u8; PAGE]), Box::new([0u8; LZ4_OUT]), Box::new([0u8; LZ4_GROUP * PAGE]));
    let seal = match &image.seal {
        None => None,
        Some(Ok(seal)) => Some(seal),
        Some(Err(why)) => bail!("{}: {why}", file.description),
    };
    let mut chunk = vec![0u8; size_of::<SealedChunk>()].into_boxed_slice();
    let chunk: &mut SealedChunk = (&mut chunk[..]).try_into().expect("sized");
    let bufs = reader::Buffers { header: &mut h, lz4_in: &mut li, lz4_out: &mut lo, seal: seal.map(|s| (s, chunk)) };
    let description = file.description.clone();
    let saved = reader::Saved::of(&meta, &image.header);
    reader::visit_chunks(file, &image.header, &saved, bufs, &mut visit).map_err(|e| anyhow!("{description}: {e}"))
}
