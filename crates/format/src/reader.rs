//! The decoder: checks an image and hands its pages out, used by the host
//! tool (verify, inspect, export) and by restore.

use crate::chunk::{self, ChunkInfo, ENCODING_LZ4, ENCODING_RAW, LZ4_GROUP, LZ4_HEADER, LZ4_OUT, MAX_RAW_PAGES};
use crate::header::{DATA_OFFSET, Header, HeaderError, META_BLOCKS, META_OFFSET, Meta};
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
}

impl<E: core::fmt::Debug> core::fmt::Display for ReadError<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "read error: {e:?}"),
            Self::Header(e) => write!(f, "{e}"),
            Self::Chunk { index, offset, what } => write!(f, "chunk {index} at byte {offset}: {what}"),
            Self::Totals(what) => write!(f, "chunks do not match the header: {what}"),
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

/// Working memory for [`visit_chunks`].
pub struct Buffers<'b> {
    /// A chunk header.
    pub header: &'b mut [u8; PAGE],
    /// A compressed payload.
    pub lz4_in: &'b mut [u8; LZ4_OUT],
    /// A decompressed group, or a run of raw pages being read.
    pub lz4_out: &'b mut [u8; LZ4_GROUP * PAGE],
}

/// Walks every chunk, checking each fully, and calls `page(pfn, bytes)` for
/// every stored page and `chunk` after each chunk has passed its checks.
/// Pages of a chunk are handed out before its payload checksum is known to
/// be right: callers that must not act on bad data walk twice (restore
/// checks everything first).
pub fn visit_chunks<S: Source>(
    src: &mut S,
    header: &Header,
    meta: &Meta,
    bufs: Buffers,
    mut page: impl FnMut(u64, &[u8; PAGE]),
    mut chunk: impl FnMut(&ChunkInfo),
) -> Result<(), ReadError<S::Error>> {
    let saved: heapless_ranges::Ranges = meta.saved_ranges().collect();
    let end = DATA_OFFSET + header.data_bytes;
    let mut offset = DATA_OFFSET;
    let mut chunks_digest = CRC32C.digest();
    let mut pages_seen = 0u64;
    for index in 0..header.chunks {
        let bad = |what| ReadError::Chunk { index, offset, what };
        if offset + header.align as u64 > end {
            return Err(bad("beyond the data the header records"));
        }
        let header_len = read_chunk_header(src, offset, header.align, bufs.header).map_err(|e| e.at(index, offset))?;
        let decoded = chunk::decode(&bufs.header[..header_len]).map_err(bad)?;
        chunks_digest.update(&bufs.header[header_len - 4..header_len]);
        let fields = decoded.fields;
        if fields.index != index {
            return Err(bad("out of order"));
        }
        if fields.nonce != header.nonce {
            return Err(bad("from another save attempt"));
        }
        let mut pfns = [0u64; MAX_RAW_PAGES];
        let count = decoded.count();
        for (slot, pfn) in pfns.iter_mut().zip(decoded.pfns()) {
            *slot = check_page(pfn, &saved, header).map_err(bad)?;
        }
        let pfns = &pfns[..count];
        let payload_at = offset + header_len as u64;
        let payload_len = fields.payload_len as usize;
        if fields.encoding == ENCODING_RAW {
            read_raw_payload(src, payload_at, pfns, fields.payload_len, fields.payload_hash, bufs.lz4_out, &mut page).map_err(|e| e.at(index, offset))?;
        } else {
            let chunk = LzChunk { offset, pfns, payload_len: fields.payload_len, hash: fields.payload_hash, align: header.align };
            read_lz4_chunk(src, &chunk, bufs.lz4_in, bufs.lz4_out, &mut page).map_err(|e| e.at(index, offset))?;
        }
        let bytes = chunk::bytes_on_disk(fields.encoding, payload_len, header.align);
        chunk(&ChunkInfo { index, offset, pages: count as u16, encoding: fields.encoding, bytes });
        pages_seen += count as u64;
        offset += bytes;
    }
    check_totals(header, offset, pages_seen, chunks_digest.finalize())
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

/// A stored page must lie in the saved RAM and outside ksave's own range.
fn check_page(pfn: u64, saved: &heapless_ranges::Ranges, header: &Header) -> Result<u64, &'static str> {
    let addr = pfn.checked_mul(PAGE as u64).ok_or("page address")?;
    if !saved.contains(addr) || header.image.contains(addr) {
        return Err("page outside the saved RAM and NVS");
    }
    Ok(pfn)
}

/// Raw pages, read in runs of [`LZ4_GROUP`] (one read for sixteen) into
/// `run_buf`, handed out, and hashed.
fn read_raw_payload<S: Source>(
    src: &mut S,
    at: u64,
    pfns: &[u64],
    payload_len: u32,
    want_hash: u64,
    run_buf: &mut [u8; LZ4_GROUP * PAGE],
    page: &mut impl FnMut(u64, &[u8; PAGE]),
) -> Result<(), ChunkError<S::Error>> {
    if payload_len as usize != pfns.len() * PAGE {
        return Err(ChunkError::Bad("payload length"));
    }
    let mut hasher = PayloadHasher::new();
    for (run, run_pfns) in pfns.chunks(LZ4_GROUP).enumerate() {
        let buf = &mut run_buf[..run_pfns.len() * PAGE];
        src.read_at(at + (run * LZ4_GROUP * PAGE) as u64, buf).map_err(ChunkError::Io)?;
        hasher.update(buf);
        for (p, data) in run_pfns.iter().zip(buf.chunks_exact(PAGE)) {
            page(*p, data.try_into().unwrap());
        }
    }
    if hasher.digest() != want_hash {
        return Err(ChunkError::Bad("payload checksum"));
    }
    Ok(())
}

/// Where an LZ4 chunk is and what its header says.
struct LzChunk<'p> {
    offset: u64,
    pfns: &'p [u64],
    payload_len: u32,
    hash: u64,
    align: u32,
}

/// An LZ4 chunk: read whole from its start (header again, payload, padding:
/// whole blocks of the disk), hashed, decompressed to exactly its pages,
/// handed out.
fn read_lz4_chunk<S: Source>(
    src: &mut S,
    chunk: &LzChunk,
    buf: &mut [u8; LZ4_OUT],
    pages_buf: &mut [u8; LZ4_GROUP * PAGE],
    page: &mut impl FnMut(u64, &[u8; PAGE]),
) -> Result<(), ChunkError<S::Error>> {
    let len = chunk.payload_len as usize;
    if len == 0 || LZ4_HEADER + len > LZ4_OUT {
        return Err(ChunkError::Bad("payload length"));
    }
    let total = chunk::bytes_on_disk(ENCODING_LZ4, len, chunk.align) as usize;
    src.read_at(chunk.offset, &mut buf[..total]).map_err(ChunkError::Io)?;
    let compressed = &buf[LZ4_HEADER..LZ4_HEADER + len];
    if payload_hash(compressed) != chunk.hash {
        return Err(ChunkError::Bad("payload checksum"));
    }
    let out = &mut pages_buf[..chunk.pfns.len() * PAGE];
    match lz4_flex::block::decompress_into(compressed, out) {
        Ok(n) if n == out.len() => {}
        _ => return Err(ChunkError::Bad("LZ4 payload does not decompress to its pages")),
    }
    for (p, data) in chunk.pfns.iter().zip(out.chunks_exact(PAGE)) {
        page(*p, data.try_into().unwrap());
    }
    Ok(())
}

/// The chunks walked must add up to what the header committed.
fn check_totals<E>(header: &Header, end_offset: u64, pages_seen: u64, chunks_crc: u32) -> Result<(), ReadError<E>> {
    if end_offset != DATA_OFFSET + header.data_bytes {
        return Err(ReadError::Totals("data length"));
    }
    if pages_seen != header.pages_stored {
        return Err(ReadError::Totals("stored page count"));
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
