//! The encoder ksave drives while saving: pages in, chunks out (layout in
//! [`chunk`](crate::chunk)). Groups of pages go through a [`GroupCoder`]
//! when one is given and coding pays; the rest are raw chunks, whose
//! payloads are the pages themselves, written by the sink from where they
//! lie.
//!
//! Coding is pipelined: up to [`GROUPS_IN_FLIGHT`] groups are being coded
//! (on other CPUs, with ksave's queue) while the writer gathers the next
//! and writes what is finished, always in the order gathered. So is a
//! sealed image's sealing of raw chunks ([`ChunkSealer`]). Every decision
//! depends on the order of pages only, never on timing: a coder and a
//! sealer that run each job at once ([`Inline`], [`InlineSealer`]) write
//! the same image, byte for byte, as those on every CPU.

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
/// chunk it cuts short, `write_group`). A store smaller than this counts
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
    /// A group's coding was lost (a CPU coding it took an exception).
    Coder(&'static str),
}

/// Groups started and not yet finished, at most: with the one being
/// gathered, a coder holds this many and one more.
pub const GROUPS_IN_FLIGHT: usize = 3;

/// A group of pages on its way through a [`GroupCoder`]: gathered by the
/// writer, coded by the coder, written by the writer.
pub struct Group<'a> {
    /// The pages, as gathered.
    pub pages: &'a mut [u8; LZ4_GROUP * PAGE],
    /// Their frames.
    pub pfns: &'a mut [u64; LZ4_GROUP],
    /// The chunk: room for its header ([`LZ4_HEADER`] bytes), then the
    /// payload the coder made.
    pub out: &'a mut [u8; chunk::LZ4_OUT],
}

/// A group's coding, as [`GroupCoder::finished`] gives it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Coded {
    /// Pages in the group.
    pub pages: usize,
    /// The payload's length after the header, and its hash
    /// ([`payload_hash`]); `None` when coding does not pay.
    pub payload: Option<(usize, u64)>,
}

/// Codes groups of pages, maybe on other CPUs, and gives them back in the
/// order they were started. It holds [`GROUPS_IN_FLIGHT`] groups and one
/// more: the one the writer is gathering.
pub trait GroupCoder {
    /// The encoding its payloads have.
    fn encoding(&self) -> Encoding;
    /// The group being gathered: the same one until [`Self::start`]. A
    /// new group may wait for a free slot of ksave's queue: the writer
    /// calls it with no raw chunk sealing ([`ChunkSealer`]), whose slots
    /// only the writer frees.
    fn gathering(&mut self) -> Group<'_>;
    /// Starts coding the group gathered, its first `pages` pages. Never
    /// called with [`GROUPS_IN_FLIGHT`] groups in flight.
    fn start(&mut self, pages: usize);
    /// Waits for the oldest group started and gives it back, with its
    /// coding; or says why it never will be (a CPU coding it was lost).
    fn finished(&mut self) -> Result<(Group<'_>, Coded), &'static str>;
    /// Lets the oldest group go (after [`Self::finished`]).
    fn release(&mut self);
}

/// One group's memory, for [`Inline`].
#[repr(C)]
pub struct GroupBuffers {
    /// [`Group::out`].
    pub out: [u8; chunk::LZ4_OUT],
    /// [`Group::pages`].
    pub pages: [u8; LZ4_GROUP * PAGE],
    /// [`Group::pfns`].
    pub pfns: [u64; LZ4_GROUP],
    coded: Option<Coded>,
}

impl GroupBuffers {
    /// Empty buffers.
    pub const EMPTY: Self = Self { out: [0; chunk::LZ4_OUT], pages: [0; LZ4_GROUP * PAGE], pfns: [0; LZ4_GROUP], coded: None };
}

/// A [`GroupCoder`] that codes each group on this CPU as it starts.
pub struct Inline<'b> {
    codec: &'b mut dyn PageCodec,
    groups: &'b mut [GroupBuffers; GROUPS_IN_FLIGHT + 1],
    /// The oldest group in flight, and how many are.
    oldest: usize,
    in_flight: usize,
}

impl<'b> Inline<'b> {
    /// Codes with `codec` in `groups`.
    pub fn new(codec: &'b mut dyn PageCodec, groups: &'b mut [GroupBuffers; GROUPS_IN_FLIGHT + 1]) -> Self {
        Self { codec, groups, oldest: 0, in_flight: 0 }
    }

    fn group(&mut self, i: usize) -> Group<'_> {
        let g = &mut self.groups[i % (GROUPS_IN_FLIGHT + 1)];
        Group { pages: &mut g.pages, pfns: &mut g.pfns, out: &mut g.out }
    }
}

impl GroupCoder for Inline<'_> {
    fn encoding(&self) -> Encoding {
        self.codec.encoding()
    }

    fn gathering(&mut self) -> Group<'_> {
        self.group(self.oldest + self.in_flight)
    }

    fn start(&mut self, pages: usize) {
        assert!(self.in_flight < GROUPS_IN_FLIGHT);
        let g = &mut self.groups[(self.oldest + self.in_flight) % (GROUPS_IN_FLIGHT + 1)];
        g.coded = Some(code_group(self.codec, &g.pages[..pages * PAGE], &mut g.out, pages));
        self.in_flight += 1;
    }

    fn finished(&mut self) -> Result<(Group<'_>, Coded), &'static str> {
        assert!(self.in_flight > 0);
        let coded = self.groups[self.oldest].coded.ok_or("a group never started")?;
        Ok((self.group(self.oldest), coded))
    }

    fn release(&mut self) {
        self.groups[self.oldest].coded = None;
        self.oldest = (self.oldest + 1) % (GROUPS_IN_FLIGHT + 1);
        self.in_flight -= 1;
    }
}

/// Codes `pages` pages (`input`) with `codec` into `out` after the chunk
/// header: what every [`GroupCoder`] runs, on whichever CPU.
pub fn code_group(codec: &mut dyn PageCodec, input: &[u8], out: &mut [u8; chunk::LZ4_OUT], pages: usize) -> Coded {
    let payload = codec.encode(input, &mut out[LZ4_HEADER..]).map(|len| (len, payload_hash(&out[LZ4_HEADER..LZ4_HEADER + len])));
    Coded { pages, payload }
}

/// Seals a sealed image's raw chunks, maybe on other CPUs, and gives them
/// back in the order they were started. Every decision about a chunk is
/// made before it starts (its index is its nonce), so who seals it changes
/// no byte of the image.
pub trait ChunkSealer {
    /// How many chunks it holds: once this many are started, the writer
    /// writes the oldest before it fills another.
    fn chunks(&self) -> usize;
    /// The chunk being filled (header block, then pages): the same one
    /// until [`Self::start`].
    fn filling(&mut self) -> &mut SealedChunk;
    /// Starts sealing the chunk filled, whose header is encoded: chunk
    /// `index`, `pages` pages.
    fn start(&mut self, index: u64, pages: usize);
    /// Waits for the oldest chunk started and gives it back sealed, as it
    /// goes on disk; or says why it never will be (a CPU sealing it was
    /// lost).
    fn finished(&mut self) -> Result<&[u8], &'static str>;
    /// Lets the oldest chunk go (after [`Self::finished`]).
    fn release(&mut self);
}

/// A [`ChunkSealer`] that seals each chunk on this CPU as it starts.
pub struct InlineSealer<'b> {
    seal: &'b Seal,
    chunk: &'b mut SealedChunk,
    /// Pages of the chunk sealed and not yet released.
    sealed: Option<usize>,
}

impl<'b> InlineSealer<'b> {
    /// Seals with `seal` in `chunk`.
    pub fn new(seal: &'b Seal, chunk: &'b mut SealedChunk) -> Self {
        Self { seal, chunk, sealed: None }
    }
}

impl ChunkSealer for InlineSealer<'_> {
    fn chunks(&self) -> usize {
        1
    }

    fn filling(&mut self) -> &mut SealedChunk {
        assert!(self.sealed.is_none());
        self.chunk
    }

    fn start(&mut self, index: u64, pages: usize) {
        seal_raw_chunk(self.seal, index, self.chunk, pages);
        self.sealed = Some(pages);
    }

    fn finished(&mut self) -> Result<&[u8], &'static str> {
        let pages = self.sealed.ok_or("no chunk started")?;
        Ok(&self.chunk[..PAGE * (1 + pages)])
    }

    fn release(&mut self) {
        self.sealed = None;
    }
}

/// Seals raw chunk `index` in `chunk`: its header (encoded) and `pages`
/// pages after it. What every [`ChunkSealer`] runs, on whichever CPU.
pub fn seal_raw_chunk(seal: &Seal, index: u64, chunk: &mut SealedChunk, pages: usize) {
    let (head, payload) = chunk.split_at_mut(PAGE);
    seal_chunk(Some(seal), index, head, &mut payload[..pages * PAGE]);
}

/// Working memory for a [`Writer`]; ksave keeps it in its image.
pub struct Buffers<'b> {
    /// One raw chunk header.
    pub raw_header: &'b mut [u8; PAGE],
    /// Codes groups of pages; `None`: every page raw.
    pub coder: Option<&'b mut dyn GroupCoder>,
    /// Where consecutive chunks built in buffers (coded, free runs,
    /// sealed) gather to reach the sink in one write of up to its size: a
    /// disk command costs about as much as coding a group. `None`: each
    /// its own write.
    pub write_behind: Option<&'b mut [u8]>,
    /// A sealed image: its cipher, and what seals its raw chunks with it
    /// (every chunk is encrypted on its way out, so none goes from memory
    /// where its pages lie; coded and free-run chunks are sealed here as
    /// they are written). Raw chunks sealing and groups coding share
    /// ksave's queue, so no group is gathered while a raw chunk seals.
    pub seal: Option<(&'b Seal, &'b mut dyn ChunkSealer)>,
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
    capacity: u64,
    align: u32,
    offset: u64,
    totals: Totals,
    chunks_digest: Digest<'static, u32, Table<1>>,
    raw: [u64; MAX_RAW_PAGES],
    raw_count: usize,
    raw_hasher: PayloadHasher,
    /// Groups go through the coder (the plan says LZ4).
    code_groups: bool,
    /// Pages in the group being gathered, and groups started and not yet
    /// written.
    gathered: usize,
    in_flight: usize,
    /// Pages still to send raw without trying the codec, and the current
    /// backoff in groups: after a group fails to compress, the next 1, 2,
    /// 4 .. 8 groups' worth of pages skip the attempt (random data costs
    /// LZ4 its full time for nothing); a group that compresses resets
    /// both. Groups already in flight when a failure is written count
    /// against the skip.
    lz4_skip: usize,
    lz4_backoff: usize,
    /// Runs of free pages not yet in a chunk, as the chunk lists them:
    /// first pfn, pages, first pfn, pages ...
    free: [u64; 2 * MAX_FREE_RUNS],
    free_count: usize,
    /// Pages in those runs.
    free_pages: u64,
    /// Raw chunks started sealing and not yet written, and the offset of
    /// the oldest (they follow each other: any other chunk waits for them).
    sealing: usize,
    sealing_at: u64,
    /// Chunks written, not yet handed to the sink.
    behind: WriteBehind<'b>,
    bufs: Buffers<'b>,
}

/// Consecutive chunks gathered for one write to the sink.
struct WriteBehind<'b> {
    buf: Option<&'b mut [u8]>,
    /// Their offset, and bytes so far.
    at: u64,
    len: usize,
}

impl WriteBehind<'_> {
    /// Writes `bytes` at `offset`: gathered after the chunks before if it
    /// follows them and fits, else those first.
    fn put<S: Sink>(&mut self, sink: &mut S, offset: u64, bytes: &[u8]) -> Result<(), S::Error> {
        let room = self.buf.as_ref().map_or(0, |b| b.len());
        if self.len > 0 && (self.at + self.len as u64 != offset || self.len + bytes.len() > room) {
            self.flush(sink)?;
        }
        match self.buf.as_deref_mut() {
            Some(buf) if bytes.len() <= buf.len() => {
                if self.len == 0 {
                    self.at = offset;
                }
                buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
                self.len += bytes.len();
                Ok(())
            }
            _ => sink.write_bytes(offset, bytes),
        }
    }

    /// Hands what is gathered to the sink.
    fn flush<S: Sink>(&mut self, sink: &mut S) -> Result<(), S::Error> {
        let len = core::mem::take(&mut self.len);
        match self.buf.as_deref() {
            Some(buf) if len > 0 => sink.write_bytes(self.at, &buf[..len]),
            _ => Ok(()),
        }
    }
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
    /// tries the buffers' coder on each group of pages if `code_groups`.
    pub fn new(nonce: u64, capacity: u64, align: u32, code_groups: bool, mut bufs: Buffers<'b>) -> Self {
        assert!(align == 512 || align == MAX_ALIGN);
        Self {
            code_groups: code_groups && bufs.coder.is_some(),
            nonce,
            capacity,
            align,
            offset: DATA_OFFSET,
            totals: Totals::default(),
            chunks_digest: CRC32C.digest(),
            raw: [0; MAX_RAW_PAGES],
            raw_count: 0,
            raw_hasher: PayloadHasher::new(),
            gathered: 0,
            in_flight: 0,
            lz4_skip: 0,
            lz4_backoff: 0,
            free: [0; 2 * MAX_FREE_RUNS],
            free_count: 0,
            free_pages: 0,
            sealing: 0,
            sealing_at: 0,
            behind: WriteBehind { buf: bufs.write_behind.take(), at: 0, len: 0 },
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
        if !self.code_groups {
            return self.push_raw(pfn, page, sink);
        }
        if self.lz4_skip > 0 {
            // Raw pages go after every group gathered before them (which
            // may end the skip: one of them compressed).
            self.drain(sink)?;
        }
        if self.lz4_skip > 0 {
            self.lz4_skip -= 1;
            self.totals.pages_lz4_skipped += 1;
            return self.push_raw(pfn, page, sink);
        }
        if self.gathered == 0 {
            // A new group may need a slot of ksave's queue, where raw
            // chunks sealing hold theirs until written: they go first.
            self.drain_sealing(sink)?;
        }
        let group = self.bufs.coder.as_deref_mut().expect("checked above").gathering();
        group.pages[self.gathered * PAGE..(self.gathered + 1) * PAGE].copy_from_slice(page);
        group.pfns[self.gathered] = pfn;
        self.gathered += 1;
        if self.gathered == LZ4_GROUP {
            self.start_group(sink)?;
        }
        Ok(())
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
            Some((_, sealer)) => sealer.filling()[PAGE * (1 + i)..PAGE * (2 + i)].copy_from_slice(page),
            None => self.raw_hasher.update(page),
        }
        if self.raw_count == raw_chunk_pages(self.bufs.seal.is_some()) {
            self.flush_raw(sink)?;
        }
        Ok(())
    }

    /// Starts coding the group gathered, first writing the oldest in
    /// flight if the coder holds no more.
    fn start_group<S: Sink>(&mut self, sink: &mut S) -> Result<(), WriteError<S::Error>> {
        if self.gathered == 0 {
            return Ok(());
        }
        if self.in_flight == GROUPS_IN_FLIGHT {
            self.write_oldest(sink)?;
        }
        let pages = core::mem::take(&mut self.gathered);
        self.bufs.coder.as_deref_mut().expect("groups are gathered only with a coder").start(pages);
        self.in_flight += 1;
        Ok(())
    }

    /// Writes every group gathered, in order.
    fn drain<S: Sink>(&mut self, sink: &mut S) -> Result<(), WriteError<S::Error>> {
        self.start_group(sink)?;
        while self.in_flight > 0 {
            self.write_oldest(sink)?;
        }
        Ok(())
    }

    /// Writes the oldest group in flight once coded: a coded chunk if that
    /// pays, else its pages raw.
    fn write_oldest<S: Sink>(&mut self, sink: &mut S) -> Result<(), WriteError<S::Error>> {
        let written = self.write_group(sink);
        self.coder().release();
        self.in_flight -= 1;
        written
    }

    fn coder(&mut self) -> &mut dyn GroupCoder {
        self.bufs.coder.as_deref_mut().expect("groups are in flight only with a coder")
    }

    fn write_group<S: Sink>(&mut self, sink: &mut S) -> Result<(), WriteError<S::Error>> {
        let encoding = self.coder().encoding();
        let (_, Coded { pages: n, payload }) = self.coder().finished().map_err(WriteError::Coder)?;
        // A group is stored coded only when that costs no more than its
        // pages raw, counting the header of the raw chunk it cuts short:
        // then no image is larger than all its pages raw
        // ([`worst_case_bytes`], [`bytes_at_most`]), whatever the alignment.
        let cut = if self.raw_count > 0 { PAGE } else { 0 };
        let align = self.align;
        match payload.filter(|&(len, _)| encoding.bytes_on_disk(len, align) as usize + cut <= n * PAGE) {
            Some((len, hash)) => {
                // Stored pages go out in ascending order (restore relies on
                // it): raw pages queued before this group go first.
                self.flush_free_ahead(sink)?;
                self.flush_raw(sink)?;
                self.drain_sealing(sink)?;
                let total = encoding.bytes_on_disk(len, self.align) as usize;
                self.check_room(total as u64)?;
                let sealed = self.bufs.seal.as_ref().map(|(seal, _)| *seal);
                let fields = ChunkHeader { index: self.totals.chunks, nonce: self.nonce, encoding, payload_len: len as u32, payload_hash: if sealed.is_some() { 0 } else { hash } };
                // The group's buffers are the coder's: borrowed apart from
                // the writer's own state.
                let coder = self.bufs.coder.as_deref_mut().expect("groups are in flight only with a coder");
                let (group, _) = coder.finished().map_err(WriteError::Coder)?;
                let out = group.out;
                out[LZ4_HEADER + len..total].fill(0);
                let header_crc = chunk::encode(&mut out[..LZ4_HEADER], &fields, &group.pfns[..n]);
                let (head, payload) = out.split_at_mut(LZ4_HEADER);
                let header_crc = seal_chunk(sealed, fields.index, head, &mut payload[..len]).unwrap_or(header_crc);
                self.behind.put(sink, self.offset, &out[..total]).map_err(WriteError::Sink)?;
                self.chunk_written(total as u64, header_crc);
                self.totals.pages_stored += n as u64;
                if encoding == Encoding::Lz4 {
                    self.totals.pages_lz4 += n as u64;
                    self.totals.flags |= FLAG_LZ4;
                }
                self.lz4_backoff = 0;
                self.lz4_skip = 0;
                Ok(())
            }
            // Incompressible: these pages go raw, from memory where they lie,
            // and the next pages skip the attempt: those gathered since
            // (in flight, tried already) count as skipped ones.
            None => {
                self.lz4_backoff = (self.lz4_backoff * 2).clamp(1, LZ4_MAX_BACKOFF);
                let gathered_since = (self.in_flight - 1) * LZ4_GROUP + self.gathered;
                self.lz4_skip = (self.lz4_backoff * LZ4_GROUP).saturating_sub(gathered_since);
                for i in 0..n {
                    // Each page copied out of the group, whose buffers are
                    // the coder's: queuing it may write a raw chunk.
                    let (group, _) = self.coder().finished().map_err(WriteError::Coder)?;
                    let (pfn, page): (u64, [u8; PAGE]) = (group.pfns[i], group.pages[i * PAGE..(i + 1) * PAGE].try_into().expect("a page"));
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
        self.totals.pages_stored += n as u64;
        let Some((_, sealer)) = &mut self.bufs.seal else {
            let crc = chunk::encode(&mut self.bufs.raw_header[..], &fields, &self.raw[..n]);
            self.behind.flush(sink).map_err(WriteError::Sink)?;
            sink.write_raw(self.offset, &self.bufs.raw_header[..], &self.raw[..n]).map_err(WriteError::Sink)?;
            self.chunk_written(total, crc);
            return Ok(());
        };
        // Sealed: the header and encrypted pages go from the chunk buffer
        // once sealed; its place and index are taken now, its header's CRC
        // (over the tag) counted when it is written.
        // What `write_sealed` counts the chunk as: its header block and pages.
        assert_eq!(total, (PAGE * (1 + n)) as u64);
        chunk::encode(&mut sealer.filling()[..PAGE], &fields, &self.raw[..n]);
        sealer.start(fields.index, n);
        if self.sealing == 0 {
            self.sealing_at = self.offset;
        }
        self.sealing += 1;
        self.offset += total;
        self.totals.chunks += 1;
        if self.sealing == sealer.chunks() {
            self.write_sealed(sink)?;
        }
        Ok(())
    }

    /// Writes the oldest raw chunk sealing, once sealed.
    fn write_sealed<S: Sink>(&mut self, sink: &mut S) -> Result<(), WriteError<S::Error>> {
        let (_, sealer) = self.bufs.seal.as_mut().expect("chunks seal only with a sealer");
        let chunk = sealer.finished().map_err(WriteError::Coder)?;
        self.behind.put(sink, self.sealing_at, chunk).map_err(WriteError::Sink)?;
        self.chunks_digest.update(&chunk::header_crc(&chunk[..PAGE]));
        self.sealing_at += chunk.len() as u64;
        sealer.release();
        self.sealing -= 1;
        Ok(())
    }

    /// Writes every raw chunk sealing, in order: before any other chunk.
    fn drain_sealing<S: Sink>(&mut self, sink: &mut S) -> Result<(), WriteError<S::Error>> {
        while self.sealing > 0 {
            self.write_sealed(sink)?;
        }
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
        self.drain_sealing(sink)?;
        self.behind.put(sink, self.offset, &self.bufs.raw_header[..total as usize]).map_err(WriteError::Sink)?;
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
        self.drain(sink)?;
        self.flush_raw(sink)?;
        self.flush_free(sink)?;
        self.drain_sealing(sink)?;
        self.behind.flush(sink).map_err(WriteError::Sink)?;
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
