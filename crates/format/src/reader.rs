//! The decoder: checks an image and hands its pages out, used by the host
//! tool (verify, inspect, export) and by restore.

use crate::chunk::{self, ChunkInfo, Encoding, LZ4_GROUP, LZ4_OUT, MAX_RAW_PAGES, SEALED_RAW_PAGES, SealedChunk};
use crate::codec::{Lz4, PageCodec};
use crate::header::{DATA_OFFSET, Header, HeaderError, META_BLOCKS, META_OFFSET, Meta};
use crate::seal::{Seal, Sealed, chunk_tag_at};
use crate::{CRC32C, PAGE, PayloadHasher, payload_hash};

/// Reads bytes of the partition.
pub trait Source {
    /// The source's error.
    type Error;
    /// Fills `buf` from byte `offset` of the partition.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error>;
}

/// An image already in memory.
impl Source for &[u8] {
    type Error = &'static str;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        let at = usize::try_from(offset).map_err(|_| "read beyond the end")?;
        let src = at.checked_add(buf.len()).and_then(|end| self.get(at..end)).ok_or("read beyond the end")?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// Why an image was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadError<E> {
    /// Reading failed.
    Io(E),
    /// The header or metadata is bad.
    Header(HeaderError),
    /// A chunk is bad.
    Chunk {
        /// Its index.
        index: u64,
        /// Its byte offset in the partition.
        offset: u64,
        /// What is wrong.
        what: &'static str,
    },
    /// The chunks do not add up to what the header says.
    Totals(&'static str),
    /// A sealed image cannot be read without its key, a plain one is not
    /// taken from an encrypted store, or the header's or metadata's tag
    /// does not check.
    Seal(&'static str),
}

impl<E: core::fmt::Debug> core::fmt::Display for ReadError<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "read error: {e:?}"),
            Self::Header(e) => write!(f, "{e}"),
            Self::Chunk { index, offset, what } => write!(f, "chunk {index} at byte {offset}: {what}"),
            Self::Totals(what) => write!(f, "chunks do not match the header: {what}"),
            Self::Seal(what) => write!(f, "{what}"),
        }
    }
}

/// Reads and checks the header.
pub fn read_header<S: Source>(src: &mut S, block: &mut [u8; PAGE]) -> Result<Header, ReadError<S::Error>> {
    src.read_at(0, block).map_err(ReadError::Io)?;
    Header::decode(block).map_err(ReadError::Header)
}

/// Reads the metadata blocks into `buf` and checks them.
pub fn read_meta<'a, S: Source>(src: &mut S, header: &Header, buf: &'a mut [u8; META_BLOCKS as usize * PAGE]) -> Result<Meta<'a>, ReadError<S::Error>> {
    src.read_at(META_OFFSET, buf).map_err(ReadError::Io)?;
    Meta::parse(header, buf).map_err(ReadError::Header)
}

/// Checks what a sealed image's header says against `seal`, with its
/// metadata `meta` as read: that the image is sealed (an encrypted
/// store takes no plain image: it could be anyone's), the metadata's tag
/// and the header's. With no `seal` (the store is not encrypted) only that
/// the image is not sealed: its key is needed. `scratch` is overwritten.
pub fn check_sealed<E>(seal: Option<&Seal>, header: &Header, meta: &Meta, scratch: &mut [u8]) -> Result<(), ReadError<E>> {
    match (seal, header.sealed()) {
        (None, false) => Ok(()),
        (None, true) => Err(ReadError::Seal("the image is encrypted: its key is read from the unlocked volume (`ksave resume` in the initramfs)")),
        (Some(_), false) => Err(ReadError::Seal("the store is on an encrypted volume but the image is not sealed: refused")),
        (Some(seal), true) => {
            Seal::check(seal.meta_tag(meta.bytes(), scratch), &header.meta_tag).map_err(|_| ReadError::Seal("the metadata's tag does not check (another key, or forged)"))?;
            let mut block = [0u8; PAGE];
            header.tagged_block(&mut block);
            Seal::check(seal.header_tag(&block), &header.tag).map_err(|_| ReadError::Seal("the header's tag does not check (another key, or forged)"))
        }
    }
}

/// Working memory for [`visit_chunks`].
pub struct Buffers<'b> {
    /// A chunk header.
    pub header: &'b mut [u8; PAGE],
    /// A compressed payload.
    pub lz4_in: &'b mut [u8; LZ4_OUT],
    /// A decompressed group, or a run of raw pages being read.
    pub lz4_out: &'b mut [u8; LZ4_GROUP * PAGE],
    /// A sealed image ([`check_sealed`] passed): its cipher, and a raw chunk
    /// being read (its pages are handed out only once its tag checks).
    pub seal: Option<(&'b Seal, &'b mut SealedChunk)>,
}

/// What a walk of the chunks hands out, chunk by chunk, in image order.
/// Stored pages come in ascending page order; a chunk's pages are handed
/// out before its payload check is known (restore, which must not act on
/// bad data before it knows, keeps the rule by writing only memory it may
/// lose: see crates/core/src/resume.rs).
pub trait Visitor<S: Source> {
    /// A stored page's contents.
    fn page(&mut self, _pfn: u64, _data: &[u8; PAGE]) {}

    /// Reads a raw chunk's pages (`pfns.len()` pages from byte `at`),
    /// hands them out and returns their [`payload_hash`] for the reader to
    /// check. By default through `buf`, [`LZ4_GROUP`] pages a read, each
    /// handed to [`Self::page`]; restore reads them straight into place
    /// instead, and may return `None` to check them against `_hash` itself,
    /// later (on another CPU), reporting a mismatch as `_chunk`'s.
    fn raw_pages(&mut self, src: &mut S, at: u64, pfns: &[u64], buf: &mut [u8; LZ4_GROUP * PAGE], _chunk: ChunkAt, _hash: u64) -> Result<Option<u64>, S::Error> {
        let mut hasher = PayloadHasher::new();
        for (run, run_pfns) in pfns.chunks(LZ4_GROUP).enumerate() {
            let buf = &mut buf[..run_pfns.len() * PAGE];
            src.read_at(at + (run * LZ4_GROUP * PAGE) as u64, buf)?;
            hasher.update(buf);
            for (p, data) in run_pfns.iter().zip(buf.chunks_exact(PAGE)) {
                self.page(*p, data.try_into().unwrap());
            }
        }
        Ok(Some(hasher.digest()))
    }

    /// A coded chunk, before its bytes are read: return true to take it
    /// whole (read its bytes, then check (or open) and decode it and hand
    /// out its pages later, on another CPU, reporting a failure as the
    /// chunk's: [`check_and_decode`], [`Seal::open`] and [`decode`]), false
    /// for the reader to do it now.
    fn coded_chunk(&mut self, _src: &mut S, _chunk: &CodedChunkAt) -> Result<bool, S::Error> {
        Ok(false)
    }

    /// A sealed raw chunk's pages (`pfns.len()` pages of ciphertext from
    /// byte `at`), before they are read: return true to take them (read
    /// them, check `tag` over `aad` and them, decrypt them and hand them
    /// out later, on another CPU: [`Seal::open_in_pieces`], reporting a
    /// failure as `chunk`'s), false for the reader to do it now.
    fn sealed_raw_pages(&mut self, _src: &mut S, _at: u64, _pfns: &[u64], _chunk: ChunkAt, _aad: &[u8], _tag: &[u8; crate::seal::TAG_LEN]) -> Result<bool, S::Error> {
        Ok(false)
    }

    /// A run of pages the saved kernel held free (they read as zeros).
    fn free_run(&mut self, _first: u64, _pages: u64) {}

    /// A chunk that passed every check.
    fn chunk(&mut self, _info: &ChunkInfo) {}
}

/// A [`Visitor`] that only checks.
pub struct CheckOnly;

impl<S: Source> Visitor<S> for CheckOnly {}

/// Walks every chunk, checking each fully, and tells `visitor` what each
/// holds. Checks besides each chunk's own: stored pages strictly ascending,
/// free runs ascending and inside the saved memory, and the totals the
/// header committed (stored + zero + free = every page saved).
pub fn visit_chunks<S: Source>(src: &mut S, header: &Header, saved: &Saved, bufs: Buffers, visitor: &mut impl Visitor<S>) -> Result<(), ReadError<S::Error>> {
    if header.sealed() != bufs.seal.is_some() {
        return Err(ReadError::Seal(if header.sealed() { "the image is encrypted: its key is needed" } else { "a plain image on an encrypted store" }));
    }
    let Buffers { header: chunk_header, lz4_in, lz4_out, mut seal } = bufs;
    let cipher = seal.as_ref().map(|(cipher, _)| *cipher);
    let saved_pages = saved.pages;
    let ram = &saved.ram;
    let saved = &saved.ranges;
    // The header's CRC holds, but its length may still be anything.
    let end = DATA_OFFSET.checked_add(header.data_bytes).ok_or(ReadError::Totals("data length"))?;
    let mut offset = DATA_OFFSET;
    let mut chunks_digest = CRC32C.digest();
    let mut order = Order::default();
    for index in 0..header.chunks {
        let bad = |what| ReadError::Chunk { index, offset, what };
        if offset + header.align as u64 > end {
            return Err(bad("beyond the data the header records"));
        }
        let header_len = read_chunk_header(src, offset, header.align, chunk_header).map_err(|e| e.at(index, offset))?;
        let head = &chunk_header[..header_len];
        let decoded = chunk::decode(head).map_err(bad)?;
        chunks_digest.update(&head[header_len - 4..]);
        // What a sealed chunk's tag binds: its header before the tag.
        let sealed = cipher.map(|c| Opening { seal: c, index, aad: &head[..chunk_tag_at(header_len)], tag: chunk::tag(head) });
        let fields = decoded.fields;
        if fields.index != index {
            return Err(bad("out of order"));
        }
        if fields.nonce != header.nonce {
            return Err(bad("from another save attempt"));
        }
        let count = decoded.count();
        let payload_at = offset + header_len as u64;
        let payload_len = fields.payload_len as usize;
        match fields.encoding {
            Encoding::Free => {
                if fields.payload_len != 0 {
                    return Err(bad("payload length"));
                }
                if let Some(o) = &sealed {
                    o.open(&mut []).map_err(bad)?;
                }
                for (first, pages) in decoded.runs() {
                    order.free_run(first, pages, ram, header).map_err(bad)?;
                    visitor.free_run(first, pages);
                }
            }
            encoding => {
                let mut pfns = [0u64; MAX_RAW_PAGES];
                for (slot, pfn) in pfns.iter_mut().zip(decoded.pfns()) {
                    *slot = order.stored(pfn, saved, header).map_err(bad)?;
                }
                let pfns = &pfns[..count];
                // Raw pages are read where the visitor wants them (zero
                // copy); other codecs decode from the buffers.
                if encoding == Encoding::Raw && sealed.is_some() {
                    // Sealed: read into the chunk buffer, opened, then handed out.
                    let (Some(o), Some((_, chunk))) = (&sealed, &mut seal) else { unreachable!("sealed") };
                    if payload_len != count * PAGE || count > SEALED_RAW_PAGES {
                        return Err(bad("payload length"));
                    }
                    if !visitor.sealed_raw_pages(src, payload_at, pfns, ChunkAt { index, offset }, o.aad, &o.tag).map_err(ReadError::Io)? {
                        let pages = &mut chunk[..payload_len];
                        src.read_at(payload_at, pages).map_err(ReadError::Io)?;
                        o.open(pages).map_err(bad)?;
                        for (p, data) in pfns.iter().zip(pages.chunks_exact(PAGE)) {
                            visitor.page(*p, data.try_into().unwrap());
                        }
                    }
                } else if encoding == Encoding::Raw {
                    if payload_len != count * PAGE {
                        return Err(bad("payload length"));
                    }
                    let at = ChunkAt { index, offset };
                    let digest = visitor.raw_pages(src, payload_at, pfns, lz4_out, at, fields.payload_hash).map_err(ReadError::Io)?;
                    if digest.is_some_and(|d| d != fields.payload_hash) {
                        return Err(bad("payload checksum"));
                    }
                } else {
                    let chunk = CodedChunk { offset, encoding, pfns, payload_len: fields.payload_len, hash: fields.payload_hash, align: header.align, sealed };
                    read_coded_chunk(src, index, &chunk, lz4_in, lz4_out, visitor).map_err(|e| e.at(index, offset))?;
                }
            }
        }
        let bytes = fields.encoding.bytes_on_disk(payload_len, header.align);
        visitor.chunk(&ChunkInfo { index, offset, pages: count as u16, encoding: fields.encoding, bytes });
        offset += bytes;
    }
    check_totals(header, offset, &order, saved_pages, chunks_digest.finalize())
}

/// The memory an image's metadata says it holds, copied out of the
/// metadata blocks (so that their buffer can be reused while the chunks
/// are read).
pub struct Saved {
    ranges: heapless_ranges::Ranges,
    /// The saved RAM alone: free runs lie there, never in ACPI NVS.
    ram: heapless_ranges::Ranges,
    /// Pages in the saved RAM and NVS outside ksave's own range: stored,
    /// zero and free together.
    pages: u64,
}

impl Saved {
    /// The saved RAM and NVS of `meta`, for the image `header` describes.
    pub fn of(meta: &Meta, header: &Header) -> Self {
        // Counted, not walked: a range of the metadata may span 2^52 pages.
        // A page is ksave's if its address lies in ksave's range.
        let page = PAGE as u64;
        let (own_from, own_to) = (header.image.start.div_ceil(page), header.image.end.div_ceil(page));
        let outside = |p: core::ops::Range<u64>| (p.end - p.start) - p.end.min(own_to).saturating_sub(p.start.max(own_from));
        Self { ranges: meta.saved_ranges().collect(), ram: meta.ram_ranges().collect(), pages: meta.saved_ranges().map(|r| outside(r.pages())).sum() }
    }
}

/// The order rules, and the counts the totals are checked against.
#[derive(Default)]
struct Order {
    /// The next stored page must be above this one.
    last_stored: Option<u64>,
    /// The next free run must start at or above this page.
    free_from: u64,
    stored: u64,
    free: u64,
}

impl Order {
    /// A stored page must lie in the saved memory, outside ksave's own
    /// range, above the one before.
    fn stored(&mut self, pfn: u64, saved: &heapless_ranges::Ranges, header: &Header) -> Result<u64, &'static str> {
        let addr = pfn.checked_mul(PAGE as u64).ok_or("page address")?;
        if !saved.contains(addr) || header.image.contains(addr) {
            return Err("page outside the saved RAM and NVS");
        }
        if self.last_stored.is_some_and(|last| pfn <= last) {
            return Err("stored pages out of order");
        }
        self.last_stored = Some(pfn);
        self.stored += 1;
        Ok(pfn)
    }

    /// A free run must be whole pages of one saved RAM range (the kernel
    /// frees no firmware memory), outside ksave's own range, above the run
    /// before.
    fn free_run(&mut self, first: u64, pages: u64, ram: &heapless_ranges::Ranges, header: &Header) -> Result<(), &'static str> {
        let start = first.checked_mul(PAGE as u64).ok_or("free run address")?;
        let end = pages.checked_mul(PAGE as u64).and_then(|len| start.checked_add(len)).ok_or("free run address")?;
        if pages == 0 || !ram.contains_range(start, end) || (start < header.image.end && header.image.start < end) {
            return Err("free run outside the saved RAM");
        }
        if first < self.free_from {
            return Err("free runs out of order");
        }
        self.free_from = first + pages;
        self.free += pages;
        Ok(())
    }
}

/// A chunk's error before it knows where it is.
enum ChunkError<E> {
    Io(E),
    Bad(&'static str),
}

impl<E> ChunkError<E> {
    fn at(self, index: u64, offset: u64) -> ReadError<E> {
        match self {
            Self::Io(e) => ReadError::Io(e),
            Self::Bad(what) => ReadError::Chunk { index, offset, what },
        }
    }
}

/// Reads a chunk header into `buf`: its first `align` bytes (one block of
/// the disk), then the rest the header announces. Returns its length.
fn read_chunk_header<S: Source>(src: &mut S, offset: u64, align: u32, buf: &mut [u8; PAGE]) -> Result<usize, ChunkError<S::Error>> {
    let first = align as usize;
    src.read_at(offset, &mut buf[..first]).map_err(ChunkError::Io)?;
    let len = chunk::announced_len(&buf[..first]).map_err(ChunkError::Bad)?;
    if len > first {
        src.read_at(offset + first as u64, &mut buf[first..len]).map_err(ChunkError::Io)?;
    }
    Ok(len)
}

/// What is wrong with a sealed chunk whose tag does not check.
pub const FORGED: &str = "tag does not check (another key, or forged)";

/// A sealed chunk's tag, with what it binds.
struct Opening<'a> {
    seal: &'a Seal,
    index: u64,
    aad: &'a [u8],
    tag: [u8; crate::seal::TAG_LEN],
}

impl Opening<'_> {
    /// Checks the tag over `payload` (as read) and decrypts it in place.
    fn open(&self, payload: &mut [u8]) -> Result<(), &'static str> {
        self.seal.open(Sealed::Chunk(self.index), self.aad, payload, &self.tag).map_err(|_| FORGED)
    }
}

/// Where a coded chunk is and what its header says.
struct CodedChunk<'p> {
    offset: u64,
    encoding: Encoding,
    pfns: &'p [u64],
    payload_len: u32,
    hash: u64,
    align: u32,
    /// Sealed: opened before it is decoded (its hash is not kept).
    sealed: Option<Opening<'p>>,
}

/// Where a chunk lies in the image: what its failure names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChunkAt {
    /// Its index.
    pub index: u64,
    /// Its byte offset in the partition.
    pub offset: u64,
}

impl ChunkAt {
    /// `what` is wrong with this chunk.
    pub fn failed<E>(self, what: &'static str) -> ReadError<E> {
        ReadError::Chunk { index: self.index, offset: self.offset, what }
    }
}

/// A coded chunk a [`Visitor`] may take whole ([`Visitor::coded_chunk`]):
/// its bytes on disk (header again, payload, padding: whole blocks of the
/// disk) are `bytes` from `at.offset`, of which `payload` is the payload,
/// to be checked against `hash` (or, sealed, opened) and decoded to exactly
/// the pages `pfns` ([`check_and_decode`], [`decode`]).
pub struct CodedChunkAt<'p> {
    /// Where it lies.
    pub at: ChunkAt,
    /// Its codec.
    pub encoding: Encoding,
    /// Its length on disk; at most [`LZ4_OUT`].
    pub bytes: usize,
    /// Its payload, within those bytes.
    pub payload: core::ops::Range<usize>,
    /// The payload's [`payload_hash`].
    pub hash: u64,
    /// Its pages, checked: ascending, in the saved memory.
    pub pfns: &'p [u64],
    /// A sealed image's chunk: opened rather than checked by its hash.
    pub sealed: Option<SealedAt>,
    /// A sealed chunk's header as the reader checked it, whose pages these
    /// are: what its tag binds (the chunk's first `aad_len` bytes).
    pub aad: Option<&'p [u8]>,
}

/// What opens a sealed chunk (under the nonce of its index): its tag over
/// the first `aad_len` bytes of the chunk (its header before the tag) and
/// its payload.
#[derive(Clone, Copy, Debug)]
pub struct SealedAt {
    /// Bytes of the chunk's start the tag binds.
    pub aad_len: usize,
    /// The tag.
    pub tag: [u8; crate::seal::TAG_LEN],
}

/// Checks a plain coded chunk's payload against its `hash` and decodes it
/// into exactly `pages` (its pages, whole), or says what is wrong.
pub fn check_and_decode(encoding: Encoding, payload: &[u8], hash: u64, pages: &mut [u8]) -> Result<(), &'static str> {
    if payload_hash(payload) != hash {
        return Err("payload checksum");
    }
    decode(encoding, payload, pages)
}

/// Decodes a checked (or opened) payload by its encoding's codec.
pub fn decode(encoding: Encoding, payload: &[u8], pages: &mut [u8]) -> Result<(), &'static str> {
    match encoding {
        Encoding::Lz4 => Lz4.decode(payload, pages),
        Encoding::Raw | Encoding::Free => Err("not a coded chunk"),
    }
}

/// A coded chunk: handed whole to the visitor if it takes it,
/// else read whole from its start (header again, payload, padding: whole
/// blocks of the disk), checked (or opened), decoded to exactly its pages,
/// handed out.
fn read_coded_chunk<S: Source>(
    src: &mut S,
    index: u64,
    chunk: &CodedChunk,
    buf: &mut [u8; LZ4_OUT],
    pages_buf: &mut [u8; LZ4_GROUP * PAGE],
    visitor: &mut impl Visitor<S>,
) -> Result<(), ChunkError<S::Error>> {
    let len = chunk.payload_len as usize;
    let head = chunk.encoding.header_len();
    if len == 0 || head + len > LZ4_OUT {
        return Err(ChunkError::Bad("payload length"));
    }
    let total = chunk.encoding.bytes_on_disk(len, chunk.align) as usize;
    let sealed = chunk.sealed.as_ref().map(|o| SealedAt { aad_len: o.aad.len(), tag: o.tag });
    let aad = chunk.sealed.as_ref().map(|o| o.aad);
    let whole = CodedChunkAt { at: ChunkAt { index, offset: chunk.offset }, encoding: chunk.encoding, bytes: total, payload: head..head + len, hash: chunk.hash, pfns: chunk.pfns, sealed, aad };
    if visitor.coded_chunk(src, &whole).map_err(ChunkError::Io)? {
        return Ok(());
    }
    src.read_at(chunk.offset, &mut buf[..total]).map_err(ChunkError::Io)?;
    let payload = &mut buf[head..head + len];
    let out = &mut pages_buf[..chunk.pfns.len() * PAGE];
    match &chunk.sealed {
        Some(o) => {
            o.open(payload).map_err(ChunkError::Bad)?;
            decode(chunk.encoding, payload, out)
        }
        None => check_and_decode(chunk.encoding, payload, chunk.hash, out),
    }
    .map_err(ChunkError::Bad)?;
    for (p, data) in chunk.pfns.iter().zip(out.chunks_exact(PAGE)) {
        visitor.page(*p, data.try_into().unwrap());
    }
    Ok(())
}

/// The chunks walked must add up to what the header committed.
fn check_totals<E>(header: &Header, end_offset: u64, order: &Order, saved_pages: u64, chunks_crc: u32) -> Result<(), ReadError<E>> {
    if end_offset - DATA_OFFSET != header.data_bytes {
        return Err(ReadError::Totals("data length"));
    }
    if order.stored != header.pages_stored {
        return Err(ReadError::Totals("stored page count"));
    }
    if order.free != header.pages_free {
        return Err(ReadError::Totals("free page count"));
    }
    if header.pages_stored.checked_add(header.pages_zero).and_then(|n| n.checked_add(header.pages_free)) != Some(saved_pages) {
        return Err(ReadError::Totals("stored, zero and free pages do not add up to the memory saved"));
    }
    if chunks_crc != header.chunks_crc {
        return Err(ReadError::Totals("chunk set checksum"));
    }
    Ok(())
}
/// A fixed set of ranges for membership tests.
mod heapless_ranges {
    use crate::Range;
    use crate::header::{MAX_NVS_RANGES, MAX_RAM_RANGES};

    const CAPACITY: usize = MAX_RAM_RANGES + MAX_NVS_RANGES;

    pub struct Ranges {
        ranges: [Range; CAPACITY],
        count: usize,
    }

    impl Ranges {
        pub fn contains(&self, addr: u64) -> bool {
            self.ranges[..self.count].iter().any(|r| r.contains(addr))
        }

        /// Whether `[start, end)` lies inside one range.
        pub fn contains_range(&self, start: u64, end: u64) -> bool {
            self.ranges[..self.count].iter().any(|r| r.start <= start && end <= r.end)
        }
    }

    impl FromIterator<Range> for Ranges {
        fn from_iter<I: IntoIterator<Item = Range>>(iter: I) -> Self {
            let mut s = Self { ranges: [Range::default(); CAPACITY], count: 0 };
            for r in iter.into_iter().take(CAPACITY) {
                s.ranges[s.count] = r;
                s.count += 1;
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Range;
    use crate::header::State;

    #[test]
    fn a_free_run_lies_inside_the_ram_outside_ksave_and_after_the_last() {
        let ram: heapless_ranges::Ranges = [Range { start: 0, end: 0x10_0000 }].into_iter().collect();
        let header = Header { image: Range { start: 0x4_0000, end: 0x5_0000 }, ..Header::new(State::Complete, 1) };
        assert!(Order::default().free_run(0x10, 0x10, &ram, &header).is_ok());
        // Past the RAM given (the reader gives the saved RAM alone, not the
        // NVS: tests/mutation.rs a_free_run_in_acpi_nvs_is_refused).
        assert_eq!(Order::default().free_run(0x100, 1, &ram, &header), Err("free run outside the saved RAM"));
        assert!(Order::default().free_run(0xff, 2, &ram, &header).is_err(), "a run across RAM's end");
        assert!(Order::default().free_run(0x3f, 2, &ram, &header).is_err(), "a run into ksave's own range");
        let mut order = Order::default();
        order.free_run(0x20, 4, &ram, &header).unwrap();
        assert!(order.free_run(0x22, 1, &ram, &header).is_err(), "a run overlapping the one before");
    }
}
