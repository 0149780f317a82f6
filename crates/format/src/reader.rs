//! The decoder: checks an image and hands its pages out, used by the host
//! tool (verify, inspect, export) and by restore.

use crate::header::{DATA_OFFSET, Header, HeaderError, META_BLOCKS, META_OFFSET, Meta};
use crate::writer::{CHUNK_MAGIC, ENCODING_LZ4, ENCODING_RAW, LZ4_GROUP, LZ4_HEADER, LZ4_OUT, MAX_RAW_PAGES};
use crate::{CRC32C, PAGE, PayloadHasher, SECTOR, le16, le32, le64, payload_hash};

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

/// What a chunk held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Its index.
    pub index: u64,
    /// Its offset.
    pub offset: u64,
    /// Pages in it.
    pub pages: u16,
    /// Raw or LZ4.
    pub encoding: u8,
    /// Bytes on disk, header included.
    pub bytes: u64,
}

/// Walks every chunk, checking each fully, and calls `page(pfn, bytes)` for
/// every stored page and `chunk` after each chunk has passed its checks.
/// Pages of a chunk are handed out before its payload CRC is known to be
/// right: callers that must not act on bad data walk twice (restore checks
/// everything first).
pub fn visit_chunks<S: Source>(
    src: &mut S,
    header: &Header,
    meta: &Meta,
    bufs: Buffers,
    mut page: impl FnMut(u64, &[u8; PAGE]),
    mut chunk: impl FnMut(&ChunkInfo),
) -> Result<(), ReadError<S::Error>> {
    let ranges: heapless_ranges::Ranges = meta.ram_ranges().collect();
    let mut offset = DATA_OFFSET;
    let end = DATA_OFFSET + header.data_bytes;
    let mut chunks_digest = CRC32C.digest();
    let mut pages_seen = 0u64;
    for index in 0..header.chunks {
        let bad = |what| ReadError::Chunk { index, offset, what };
        if offset + SECTOR > end {
            return Err(bad("beyond the data the header records"));
        }
        let h = &mut bufs.header[..];
        src.read_at(offset, &mut h[..SECTOR as usize]).map_err(ReadError::Io)?;
        if h[0..8] != CHUNK_MAGIC {
            return Err(bad("no chunk magic"));
        }
        let header_len = h[27] as usize * SECTOR as usize;
        if header_len != SECTOR as usize && header_len != PAGE {
            return Err(bad("header length"));
        }
        if header_len > SECTOR as usize {
            src.read_at(offset + SECTOR, &mut h[SECTOR as usize..header_len]).map_err(ReadError::Io)?;
        }
        let h = &h[..header_len];
        if CRC32C.checksum(&h[..header_len - 4]) != le32(h, header_len - 4) {
            return Err(bad("header checksum"));
        }
        chunks_digest.update(&h[header_len - 4..]);
        if le64(h, 8) != index {
            return Err(bad("out of order"));
        }
        if le64(h, 16) != header.nonce {
            return Err(bad("from another save attempt"));
        }
        let (count, encoding, payload_len, want_hash) = (le16(h, 24) as usize, h[26], le32(h, 28) as usize, le64(h, 32));
        let (max_pages, want_header) = match encoding {
            ENCODING_RAW => (MAX_RAW_PAGES, PAGE),
            ENCODING_LZ4 => (LZ4_GROUP, LZ4_HEADER),
            _ => return Err(bad("unknown encoding")),
        };
        if count == 0 || count > max_pages || header_len != want_header {
            return Err(bad("page count"));
        }
        let pfn = |i: usize| le64(h, 40 + 8 * i);
        for i in 0..count {
            let addr = pfn(i).checked_mul(PAGE as u64).ok_or(bad("page address"))?;
            if !ranges.contains(addr) || header.image.contains(addr) {
                return Err(bad("page outside the saved RAM"));
            }
        }
        let payload_at = offset + header_len as u64;
        let mut pfns = [0u64; MAX_RAW_PAGES];
        for (i, p) in pfns[..count].iter_mut().enumerate() {
            *p = pfn(i);
        }
        match encoding {
            ENCODING_RAW => {
                if payload_len != count * PAGE {
                    return Err(bad("payload length"));
                }
                // Raw pages come in runs of LZ4_GROUP: one read for sixteen.
                let mut hasher = PayloadHasher::new();
                for (run, run_pfns) in pfns[..count].chunks(LZ4_GROUP).enumerate() {
                    let buf = &mut bufs.lz4_out[..run_pfns.len() * PAGE];
                    src.read_at(payload_at + (run * LZ4_GROUP * PAGE) as u64, buf).map_err(ReadError::Io)?;
                    hasher.update(buf);
                    for (p, data) in run_pfns.iter().zip(buf.chunks_exact(PAGE)) {
                        page(*p, data.try_into().unwrap());
                    }
                }
                if hasher.digest() != want_hash {
                    return Err(bad("payload checksum"));
                }
            }
            _ => {
                if payload_len == 0 || LZ4_HEADER + payload_len > LZ4_OUT {
                    return Err(bad("payload length"));
                }
                let stored = payload_len.next_multiple_of(SECTOR as usize);
                src.read_at(payload_at, &mut bufs.lz4_in[..stored]).map_err(ReadError::Io)?;
                if payload_hash(&bufs.lz4_in[..payload_len]) != want_hash {
                    return Err(bad("payload checksum"));
                }
                let out = &mut bufs.lz4_out[..count * PAGE];
                match lz4_flex::block::decompress_into(&bufs.lz4_in[..payload_len], out) {
                    Ok(n) if n == count * PAGE => {}
                    _ => return Err(bad("LZ4 payload does not decompress to its pages")),
                }
                for (i, p) in pfns[..count].iter().enumerate() {
                    page(*p, (&bufs.lz4_out[i * PAGE..(i + 1) * PAGE]).try_into().unwrap());
                }
            }
        }
        let on_disk = (header_len + payload_len).next_multiple_of(SECTOR as usize) as u64;
        let on_disk = if encoding == ENCODING_RAW { (header_len + payload_len) as u64 } else { on_disk };
        chunk(&ChunkInfo { index, offset, pages: count as u16, encoding, bytes: on_disk });
        pages_seen += count as u64;
        offset += on_disk;
    }
    if offset != end {
        return Err(ReadError::Totals("data length"));
    }
    if pages_seen != header.pages_stored {
        return Err(ReadError::Totals("stored page count"));
    }
    if chunks_digest.finalize() != header.chunks_crc {
        return Err(ReadError::Totals("chunk set checksum"));
    }
    Ok(())
}

/// A fixed set of ranges for membership tests.
mod heapless_ranges {
    use crate::Range;
    use crate::header::MAX_RAM_RANGES;

    pub struct Ranges {
        ranges: [Range; MAX_RAM_RANGES],
        count: usize,
    }

    impl Ranges {
        pub fn contains(&self, addr: u64) -> bool {
            self.ranges[..self.count].iter().any(|r| r.contains(addr))
        }
    }

    impl FromIterator<Range> for Ranges {
        fn from_iter<I: IntoIterator<Item = Range>>(iter: I) -> Self {
            let mut s = Self { ranges: [Range::default(); MAX_RAM_RANGES], count: 0 };
            for r in iter.into_iter().take(MAX_RAM_RANGES) {
                s.ranges[s.count] = r;
                s.count += 1;
            }
            s
        }
    }
}
