//! The encoder ksave drives while saving: pages in, chunks out (layout in
//! [`chunk`](crate::chunk)). Groups of pages go through a
//! [`PageCodec`] when one is given and it pays; the rest are raw chunks,
//! whose payloads are the pages themselves, written by the sink from where
//! they lie.

use crc::{Digest, Table};

use crate::chunk::{self, ChunkHeader, Encoding, LZ4_GROUP, LZ4_HEADER, MAX_FREE_RUNS, MAX_RAW_PAGES, SEALED_RAW_PAGES, SealedChunk};
use crate::codec::PageCodec;
use crate::header::{DATA_OFFSET, FLAG_LZ4, FLAG_SEALED};
use crate::seal::{Seal, Sealed};
use crate::{CRC32C, MAX_ALIGN, PAGE, PayloadHasher, is_zero_page, payload_hash};

/// Pages in a full raw chunk: a sealed image's go through its
/// [`SealedChunk`] buffer, so they are fewer.
pub const fn raw_chunk_pages(sealed: bool) -> usize {
    if sealed { SEALED_RAW_PAGES } else { MAX_RAW_PAGES }
}

/// Worst-case bytes of an image of `pages` pages: every page raw, a raw
/// chunk header per [`MAX_RAW_PAGES`], a free-run chunk per as many (a run
/// every other page at most), and one more header for a raw chunk cut
/// short by an LZ4 group's flush at the end (a coded group is taken only
/// when it costs no more than its pages raw and the header of the raw
/// chunk it cuts short, `flush_group`). A store smaller than this counts
/// what a save needs first ([`bytes_at_most`]).
pub fn worst_case_bytes(pages: u64, sealed: bool) -> u64 {
    DATA_OFFSET + pages * PAGE as u64 + (pages.div_ceil(raw_chunk_pages(sealed) as u64) + pages.div_ceil(MAX_RAW_PAGES as u64) + 1) * PAGE as u64
}

/// The largest image that stores `stored` pages and lists `free_runs`
/// runs of `free_pages` free pages: every stored page raw, a raw chunk
/// header per [`MAX_RAW_PAGES`] and one more, a free-run chunk per
/// [`MAX_FREE_RUNS`] runs and one per [`FREE_AHEAD_PAGES`] sent ahead
/// ([`worst_case_bytes`] with the runs counted, not bounded). A coded
/// group never costs more than its pages raw and the raw chunk header it
/// cuts short (the writer stores it raw otherwise).
pub fn bytes_at_most(stored: u64, free_runs: u64, free_pages: u64, sealed: bool) -> u64 {
    let free_chunks = free_runs.div_ceil(MAX_FREE_RUNS as u64) + free_pages / FREE_AHEAD_PAGES;
    DATA_OFFSET + stored * PAGE as u64 + (stored.div_ceil(raw_chunk_pages(sealed) as u64) + 1 + free_chunks) * PAGE as u64
}

/// Reads the pages being saved.
pub trait Memory {
    /// The page at page frame `pfn`, or `None` if it cannot be reached.
    fn page(&self, pfn: u64) -> Option<&[u8; PAGE]>;
}

/// Where chunks go. Offsets are bytes from the partition start, sector
/// aligned.
pub trait Sink {
    /// The sink's error.
    type Error;
    /// Writes `header` and then the pages `pfns`, contiguously at `offset`.
    fn write_raw(&mut self, offset: u64, header: &[u8], pfns: &[u64]) -> Result<(), Self::Error>;
    /// Writes `bytes` at `offset`.
    fn write_bytes(&mut self, offset: u64, bytes: &[u8]) -> Result<(), Self::Error>;
}

/// Why writing stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum WriteError<E> {
    /// The sink failed.
    Sink(E),
    /// A page could not be read.
    Unreachable(u64),
    /// The partition is full (the worst-case check should prevent this).
    Full,
}

/// Working memory for a [`Writer`]; ksave keeps it in its image.
pub struct Buffers<'b> {
    /// One raw chunk header.
    pub raw_header: &'b mut [u8; PAGE],
    /// Pages of the LZ4 group being gathered.
    pub lz4_in: &'b mut [u8; LZ4_GROUP * PAGE],
    /// The LZ4 chunk being built.
    pub lz4_out: &'b mut [u8; chunk::LZ4_OUT],
    /// A sealed image: its cipher, and the raw chunk being built (every
    /// chunk is encrypted on its way out, so none goes from memory where
    /// its pages lie).
    pub seal: Option<(&'b Seal, &'b mut SealedChunk)>,
}

/// What a finished save wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Totals {
    /// Chunks written.
    pub chunks: u64,
    /// Bytes after the data offset.
    pub data_bytes: u64,
    /// Pages stored.
    pub pages_stored: u64,
    /// Zero pages left out.
    pub pages_zero: u64,
    /// Free pages left out (listed in free-run chunks).
    pub pages_free: u64,
    /// CRC over all chunk header CRCs.
    pub chunks_crc: u32,
    /// Header flags to record (`FLAG_LZ4` if any chunk is compressed).
    pub flags: u32,
    /// Pages stored in LZ4 chunks.
    pub pages_lz4: u64,
    /// Pages sent raw without an LZ4 attempt (backoff after incompressible data).
    pub pages_lz4_skipped: u64,
}

/// The chunk encoder.
pub struct Writer<'b> {
    nonce: u64,
    /// Tried on every group of [`LZ4_GROUP`] pages; `None`: all raw.
    codec: Option<&'b mut dyn PageCodec>,
    capacity: u64,
    align: u32,
    offset: u64,
    totals: Totals,
    chunks_digest: Digest<'static, u32, Table<1>>,
    raw: [u64; MAX_RAW_PAGES],
    raw_count: usize,
    raw_hasher: PayloadHasher,
    group: [u64; LZ4_GROUP],
    group_count: usize,
    /// Pages still to send raw without trying the codec, and the current
    /// backoff in groups: after a group fails to compress, the next 1, 2,
    /// 4 .. 8 groups skip the attempt (random data costs LZ4 its full time
    /// for nothing); a group that compresses resets it.
    lz4_skip: usize,
    lz4_backoff: usize,
    /// Runs of free pages not yet in a chunk, as the chunk lists them:
    /// first pfn, pages, first pfn, pages ...
    free: [u64; 2 * MAX_FREE_RUNS],
    free_count: usize,
    /// Pages in those runs.
    free_pages: u64,
    bufs: Buffers<'b>,
}

/// Queued free pages that go out in a chunk of their own before the next
/// stored chunk (else they wait for a full chunk of runs). A resume that
/// leaves free pages as found skips those it knows of before it reaches
/// them, and zeroes the rest with the zero pages: one header block buys
/// at least this many pages not zeroed. The worst case stays as counted
/// ([`worst_case_bytes`]): a chunk of runs is then either full (250 runs,
/// each but the last followed by a page not free: 499 pages at least) or
/// holds this many pages, so such chunks stay one per 500 pages.
pub const FREE_AHEAD_PAGES: u64 = 512;

/// Most groups sent raw after incompressible ones before LZ4 is tried again.
pub const LZ4_MAX_BACKOFF: usize = 8;

impl<'b> Writer<'b> {
    /// A writer for attempt `nonce` into a store of `capacity` bytes, of
    /// chunks padded to `align` (512 or 4096, the disk's block size), that
    /// tries `codec` on each group of pages. The codec's payload must fit
    /// [`chunk::LZ4_OUT`] less a header.
    pub fn new(nonce: u64, codec: Option<&'b mut dyn PageCodec>, capacity: u64, align: u32, bufs: Buffers<'b>) -> Self {
        assert!(align == 512 || align == MAX_ALIGN);
        Self {
            nonce,
            codec,
            capacity,
            align,
            offset: DATA_OFFSET,
            totals: Totals::default(),
            chunks_digest: CRC32C.digest(),
            raw: [0; MAX_RAW_PAGES],
            raw_count: 0,
            raw_hasher: PayloadHasher::new(),
            group: [0; LZ4_GROUP],
            group_count: 0,
            lz4_skip: 0,
            lz4_backoff: 0,
            free: [0; 2 * MAX_FREE_RUNS],
            free_count: 0,
            free_pages: 0,
            bufs,
        }
    }

    /// Adds page `pfn`: left out if zero, else queued into a chunk.
    pub fn add_page<S: Sink>(&mut self, pfn: u64, mem: &impl Memory, sink: &mut S) -> Result<(), WriteError<S::Error>> {
        let page = mem.page(pfn).ok_or(WriteError::Unreachable(pfn))?;
        if is_zero_page(page) {
            self.totals.pages_zero += 1;
            return Ok(());
        }
        if self.codec.is_some() && self.lz4_skip > 0 {
            self.lz4_skip -= 1;
            self.totals.pages_lz4_skipped += 1;
            self.push_raw(pfn, page, sink)
        } else if self.codec.is_some() {
            let i = self.group_count;
            self.bufs.lz4_in[i * PAGE..(i + 1) * PAGE].copy_from_slice(page);
            self.group[i] = pfn;
            self.group_count += 1;
            if self.group_count == LZ4_GROUP {
                self.flush_group(sink)?;
            }
            Ok(())
        } else {
            self.push_raw(pfn, page, sink)
        }
    }

    /// Leaves out page `pfn`, which the saved kernel holds free: it is
    /// listed in a free-run chunk and reads back as zeros. Pages come in
    /// ascending order, so adjacent ones extend the last run.
    pub fn add_free<S: Sink>(&mut self, pfn: u64, sink: &mut S) -> Result<(), WriteError<S::Error>> {
        self.totals.pages_free += 1;
        self.free_pages += 1;
        let n = self.free_count;
        if n > 0 && self.free[2 * n - 2] + self.free[2 * n - 1] == pfn {
            self.free[2 * n - 1] += 1;
            return Ok(());
        }
        if n == MAX_FREE_RUNS {
            self.flush_free(sink)?;
        }
        let n = self.free_count;
        self.free[2 * n..2 * n + 2].copy_from_slice(&[pfn, 1]);
        self.free_count += 1;
        Ok(())
    }

    /// Bytes written so far (for progress).
    pub fn bytes_written(&self) -> u64 {
        self.offset - DATA_OFFSET
    }

    fn push_raw<S: Sink>(&mut self, pfn: u64, page: &[u8], sink: &mut S) -> Result<(), WriteError<S::Error>> {
        let i = self.raw_count;
        self.raw[i] = pfn;
        self.raw_count += 1;
        match &mut self.bufs.seal {
            Some((_, chunk)) => chunk[PAGE * (1 + i)..PAGE * (2 + i)].copy_from_slice(page),
            None => self.raw_hasher.update(page),
        }
        if self.raw_count == raw_chunk_pages(self.bufs.seal.is_some()) {
            self.flush_raw(sink)?;
        }
        Ok(())
    }

    fn flush_group<S: Sink>(&mut self, sink: &mut S) -> Result<(), WriteError<S::Error>> {
        let n = core::mem::take(&mut self.group_count);
        if n == 0 {
            return Ok(());
        }
        let input = &self.bufs.lz4_in[..n * PAGE];
        let out = &mut self.bufs.lz4_out;
        let codec = self.codec.as_mut().expect("groups are gathered only with a codec");
        let encoding = codec.encoding();
        // A group is stored coded only when that costs no more than its
        // pages raw, counting the header of the raw chunk it cuts short:
        // then no image is larger than all its pages raw
        // ([`worst_case_bytes`], [`bytes_at_most`]), whatever the alignment.
        let cut = if self.raw_count > 0 { PAGE } else { 0 };
        let align = self.align;
        let coded = codec.encode(input, &mut out[LZ4_HEADER..]).filter(|&len| encoding.bytes_on_disk(len, align) as usize + cut <= n * PAGE);
        match coded {
            Some(len) => {
                // Stored pages go out in ascending order (restore relies on
                // it): raw pages queued before this group go first.
                self.flush_free_ahead(sink)?;
                self.flush_raw(sink)?;
                let out = &mut self.bufs.lz4_out;
                let total = encoding.bytes_on_disk(len, self.align) as usize;
                out[LZ4_HEADER + len..total].fill(0);
                let sealed = self.bufs.seal.as_ref().map(|(seal, _)| *seal);
                let fields = ChunkHeader {
                    index: self.totals.chunks,
                    nonce: self.nonce,
                    encoding,
                    payload_len: len as u32,
                    payload_hash: if sealed.is_some() { 0 } else { payload_hash(&out[LZ4_HEADER..LZ4_HEADER + len]) },
                };
                let header_crc = chunk::encode(&mut out[..LZ4_HEADER], &fields, &self.group[..n]);
                let (head, payload) = out.split_at_mut(LZ4_HEADER);
                let header_crc = seal_chunk(sealed, fields.index, head, &mut payload[..len]).unwrap_or(header_crc);
                self.check_room(total as u64)?;
                sink.write_bytes(self.offset, &self.bufs.lz4_out[..total]).map_err(WriteError::Sink)?;
                self.chunk_written(total as u64, header_crc);
                self.totals.pages_stored += n as u64;
                if encoding == Encoding::Lz4 {
                    self.totals.pages_lz4 += n as u64;
                    self.totals.flags |= FLAG_LZ4;
                }
                self.lz4_backoff = 0;
                Ok(())
            }
            // Incompressible: these pages go raw, from memory where they lie,
            // and the next groups skip the attempt.
            _ => {
                self.lz4_backoff = (self.lz4_backoff * 2).clamp(1, LZ4_MAX_BACKOFF);
                self.lz4_skip = self.lz4_backoff * LZ4_GROUP;
                for i in 0..n {
                    let pfn = self.group[i];
                    let page: [u8; PAGE] = self.bufs.lz4_in[i * PAGE..(i + 1) * PAGE].try_into().unwrap();
                    self.push_raw(pfn, &page, sink)?;
                }
                Ok(())
            }
        }
    }

    fn flush_raw<S: Sink>(&mut self, sink: &mut S) -> Result<(), WriteError<S::Error>> {
        let n = core::mem::take(&mut self.raw_count);
        if n == 0 {
            return Ok(());
        }
        self.flush_free_ahead(sink)?;
        let fields = ChunkHeader {
            index: self.totals.chunks,
            nonce: self.nonce,
            encoding: Encoding::Raw,
            payload_len: (n * PAGE) as u32,
            payload_hash: if self.bufs.seal.is_some() { 0 } else { self.raw_hasher.digest() },
        };
        self.raw_hasher.reset();
        let total = Encoding::Raw.bytes_on_disk(n * PAGE, self.align);
        self.check_room(total)?;
        let header_crc = match &mut self.bufs.seal {
            // Sealed: header and encrypted pages from the chunk buffer.
            Some((seal, chunk)) => {
                let (head, payload) = chunk.split_at_mut(PAGE);
                chunk::encode(head, &fields, &self.raw[..n]);
                let crc = seal_chunk(Some(seal), fields.index, head, &mut payload[..n * PAGE]).expect("sealed");
                sink.write_bytes(self.offset, &chunk[..PAGE * (1 + n)]).map_err(WriteError::Sink)?;
                crc
            }
            None => {
                let crc = chunk::encode(&mut self.bufs.raw_header[..], &fields, &self.raw[..n]);
                sink.write_raw(self.offset, &self.bufs.raw_header[..], &self.raw[..n]).map_err(WriteError::Sink)?;
                crc
            }
        };
        self.chunk_written(total, header_crc);
        self.totals.pages_stored += n as u64;
        Ok(())
    }

    /// Before a stored chunk: the queued free runs, if they hold
    /// [`FREE_AHEAD_PAGES`].
    fn flush_free_ahead<S: Sink>(&mut self, sink: &mut S) -> Result<(), WriteError<S::Error>> {
        if self.free_pages >= FREE_AHEAD_PAGES { self.flush_free(sink) } else { Ok(()) }
    }

    fn flush_free<S: Sink>(&mut self, sink: &mut S) -> Result<(), WriteError<S::Error>> {
        let n = core::mem::take(&mut self.free_count);
        self.free_pages = 0;
        if n == 0 {
            return Ok(());
        }
        let fields = ChunkHeader { index: self.totals.chunks, nonce: self.nonce, encoding: Encoding::Free, payload_len: 0, payload_hash: payload_hash(&[]) };
        let header_crc = chunk::encode(&mut self.bufs.raw_header[..], &fields, &self.free[..2 * n]);
        let sealed = self.bufs.seal.as_ref().map(|(seal, _)| *seal);
        let header_crc = seal_chunk(sealed, fields.index, &mut self.bufs.raw_header[..], &mut []).unwrap_or(header_crc);
        let total = Encoding::Free.bytes_on_disk(0, self.align);
        self.check_room(total)?;
        sink.write_bytes(self.offset, &self.bufs.raw_header[..]).map_err(WriteError::Sink)?;
        self.chunk_written(total, header_crc);
        Ok(())
    }

    fn check_room<E>(&self, bytes: u64) -> Result<(), WriteError<E>> {
        if self.offset + bytes > self.capacity { Err(WriteError::Full) } else { Ok(()) }
    }

    fn chunk_written(&mut self, bytes: u64, header_crc: [u8; 4]) {
        self.chunks_digest.update(&header_crc);
        self.offset += bytes;
        self.totals.chunks += 1;
    }

    /// Writes what is still queued and returns the totals for the header.
    pub fn finish<S: Sink>(mut self, sink: &mut S) -> Result<Totals, WriteError<S::Error>> {
        self.flush_group(sink)?;
        self.flush_raw(sink)?;
        self.flush_free(sink)?;
        self.totals.data_bytes = self.offset - DATA_OFFSET;
        self.totals.chunks_crc = self.chunks_digest.finalize();
        if self.bufs.seal.is_some() {
            self.totals.flags |= FLAG_SEALED;
        }
        Ok(self.totals)
    }
}

/// In a sealed image: encrypts `payload` in place and puts the tag in
/// `header` (already encoded: everything before the tag is its associated
/// data), returning the header's new CRC. `None` when not sealed.
fn seal_chunk(seal: Option<&Seal>, index: u64, header: &mut [u8], payload: &mut [u8]) -> Option<[u8; 4]> {
    let seal = seal?;
    let at = crate::seal::chunk_tag_at(header.len());
    let tag = seal.seal(Sealed::Chunk(index), &header[..at], payload);
    Some(chunk::set_tag(header, &tag))
}
