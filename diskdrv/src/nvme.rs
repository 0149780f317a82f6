//! A polling NVMe driver (NVM Express Base 1.4) for one namespace of one
//! controller.
//!
//! One admin queue pair and one I/O queue pair, one command in flight,
//! polled to completion with a deadline. Data moves by PRP entries straight
//! between the disk and the caller's pages, through PRP lists (chained
//! across list pages) when a command spans more than two pages.
//!
//! What ksave relies on when it gives the controller back: a kexec jump
//! runs the PCI driver's freeze callback, which for Linux's nvme driver is
//! `nvme_simple_suspend` (drivers/nvme/host/pci.c): the controller is shut
//! down and bus mastering turned off. The way back runs `restore`,
//! `nvme_simple_resume`, which schedules a full reset: the driver disables
//! the controller and sets up its admin queue again from scratch
//! (`nvme_pci_configure_admin_queue`). So ksave leaves the controller
//! disabled (CC.EN = 0, nothing fetched or written by DMA), with the admin
//! queue registers and interrupt mask as it found them.

use core::sync::atomic::{Ordering, fence};

use zerocopy::IntoBytes;

use crate::hal::{mmio_read64 as read64, mmio_write64 as write64, poll};
use crate::{BlockDevice, Direction, DiskError, DiskInfo, Hal, Pieces, Segment, check_request};

// Controller registers (section 3.1).
const CAP: u64 = 0x00;
const INTMS: u64 = 0x0C;
const INTMC: u64 = 0x10;
const CC: u64 = 0x14;
const CSTS: u64 = 0x1C;
const AQA: u64 = 0x24;
const ASQ: u64 = 0x28;
const ACQ: u64 = 0x30;
const DOORBELLS: u64 = 0x1000;

const CC_EN: u32 = 1 << 0;
const CC_SHN_MASK: u32 = 3 << 14;
/// I/O queue entry sizes: 2^6 = 64-byte submissions, 2^4 = 16-byte
/// completions (section 3.1.5); MPS 0 (4 KiB pages), NVM command set.
const CC_QUEUE_SIZES: u32 = 6 << 16 | 4 << 20;
const CSTS_RDY: u32 = 1 << 0;
const CSTS_CFS: u32 = 1 << 1;

/// Bytes of a memory page as the controller sees it (CC.MPS = 0).
pub const PAGE: u64 = 4096;
/// Entries of each queue ksave uses (within any CAP.MQES: the minimum a
/// controller may report is 2, and one command is in flight at a time).
const QUEUE_ENTRIES: usize = 64;
/// PRP list pages: one per command in flight when a command's list fits a
/// page (MDTS up to 2 MiB, as on the controllers seen; QEMU 512 KiB), else
/// one command chaining through all of them, `1 + 8 * 511` pages. Eight in
/// flight: measured in `make bench` under QEMU, writes at 0.78x `dd` with
/// one, 0.93x with four, 1.0x with eight.
pub const PRP_LIST_PAGES: usize = 8;
const PRP_PER_PAGE: usize = (PAGE / 8) as usize;
/// Most pages one command carries (PRP1 and chained lists).
pub const MAX_COMMAND_PAGES: u64 = 1 + (PRP_LIST_PAGES * (PRP_PER_PAGE - 1)) as u64;
/// Namespaces searched on one controller.
pub const MAX_NAMESPACES: usize = 16;

/// Microseconds to wait for a command.
const COMMAND_US: u64 = 30_000_000;

// Admin commands (section 5) and NVM commands (NVM command set 1.0).
/// Admin: Create I/O Submission Queue.
pub const ADMIN_CREATE_SQ: u8 = 0x01;
/// Admin: Create I/O Completion Queue.
pub const ADMIN_CREATE_CQ: u8 = 0x05;
/// Admin: Identify.
pub const ADMIN_IDENTIFY: u8 = 0x06;
/// NVM: Flush.
pub const NVM_FLUSH: u8 = 0x00;
/// NVM: Write.
pub const NVM_WRITE: u8 = 0x01;
/// NVM: Read.
pub const NVM_READ: u8 = 0x02;
/// Identify CNS values: a namespace, the controller, the active namespace list.
const CNS_NAMESPACE: u32 = 0;
const CNS_CONTROLLER: u32 = 1;
const CNS_ACTIVE_NAMESPACES: u32 = 2;

/// A submission queue entry (section 4.2).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Command {
    /// Opcode (bits 7:0), fused/PSDT (15:8, zero: PRPs), command id (31:16).
    pub cdw0: u32,
    /// Namespace.
    pub nsid: u32,
    /// Reserved (CDW2-3).
    pub reserved: [u32; 2],
    /// Metadata pointer (unused).
    pub mptr: u64,
    /// PRP entry 1.
    pub prp1: u64,
    /// PRP entry 2, or the PRP list.
    pub prp2: u64,
    /// Command dwords 10-15.
    pub cdw: [u32; 6],
}

impl Command {
    /// The opcode.
    pub fn opcode(&self) -> u8 {
        self.cdw0 as u8
    }

    /// The command identifier.
    pub fn id(&self) -> u16 {
        (self.cdw0 >> 16) as u16
    }
}

/// A completion queue entry (section 4.6).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    /// Command specific.
    pub dw0: u32,
    /// Reserved.
    pub dw1: u32,
    /// Submission queue head (15:0) and id (31:16).
    pub dw2: u32,
    /// Command id (15:0), phase tag (16), status field (31:17).
    pub dw3: u32,
}

const _: () = assert!(size_of::<Command>() == 64 && size_of::<Completion>() == 16);

/// Memory the controller reads and writes by DMA: the two queue pairs and
/// the PRP list pages (the first also takes Identify data), each page
/// aligned. It must stay
/// put while a disk is open.
#[repr(C, align(4096))]
pub struct NvmeMemory {
    admin_sq: [Command; QUEUE_ENTRIES],
    admin_cq: [Completion; 256],
    io_sq: [Command; QUEUE_ENTRIES],
    io_cq: [Completion; 256],
    prp_lists: [[u64; PRP_PER_PAGE]; PRP_LIST_PAGES],
}

impl NvmeMemory {
    /// Zeroed memory, for statics.
    pub const fn new() -> Self {
        const C: Command = Command { cdw0: 0, nsid: 0, reserved: [0; 2], mptr: 0, prp1: 0, prp2: 0, cdw: [0; 6] };
        const E: Completion = Completion { dw0: 0, dw1: 0, dw2: 0, dw3: 0 };
        Self {
            admin_sq: [C; QUEUE_ENTRIES],
            admin_cq: [E; 256],
            io_sq: [C; QUEUE_ENTRIES],
            io_cq: [E; 256],
            prp_lists: [[0; PRP_PER_PAGE]; PRP_LIST_PAGES],
        }
    }
}

impl Default for NvmeMemory {
    fn default() -> Self {
        Self::new()
    }
}

/// Where a queue pair stands: the next submission slot, the next
/// completion slot and the phase that marks a new completion there.
#[derive(Clone, Copy, Debug)]
struct QueueState {
    id: u16,
    entries: u16,
    tail: u16,
    head: u16,
    phase: bool,
}

impl QueueState {
    const fn new(id: u16, entries: u16) -> Self {
        Self { id, entries, tail: 0, head: 0, phase: true }
    }
}

/// Registers as found, put back on close.
#[derive(Clone, Copy, Debug)]
struct Saved {
    cc: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    intms: u32,
}

pub use crate::NvmeStatus as Status;

/// One namespace of an NVMe controller, open.
pub struct NvmeDisk<'m, H: Hal> {
    hal: H,
    bar: u64,
    doorbell_stride: u64,
    timeout_us: u64,
    mem: &'m mut NvmeMemory,
    admin: QueueState,
    io: QueueState,
    next_id: u16,
    nsid: u32,
    /// Pages one command may carry (MDTS and the PRP lists).
    max_pages: u64,
    info: DiskInfo,
    saved: Saved,
    /// A reset is under way: a command that fails inside it does not reset
    /// again.
    recovering: bool,
}

impl<'m, H: Hal> NvmeDisk<'m, H> {
    /// Resets the controller at `bar` (BAR0), points it at `mem`, creates
    /// an I/O queue pair and opens the `index`th active namespace (from 0).
    /// `NoDevice` when there is no such namespace.
    ///
    /// # Safety
    /// `bar` must be the register block of an NVMe controller that nothing
    /// else drives until this disk is closed, with memory decoding and bus
    /// mastering enabled and at least 0x2000 bytes mapped uncached; `mem`
    /// must be reachable by the controller's DMA.
    pub unsafe fn open(hal: H, bar: u64, index: usize, mem: &'m mut NvmeMemory) -> Result<Self, DiskError> {
        let cap = read64(&hal, bar + CAP);
        // The NVM command set and 4 KiB memory pages (CAP.CSS bit 0, MPSMIN).
        if cap >> 37 & 1 == 0 || cap >> 48 & 0xF != 0 {
            return Err(DiskError::Unsupported("NVMe controller without the NVM command set or 4 KiB pages"));
        }
        let saved = Saved {
            cc: hal.mmio_read32(bar + CC),
            aqa: hal.mmio_read32(bar + AQA),
            asq: read64(&hal, bar + ASQ),
            acq: read64(&hal, bar + ACQ),
            intms: hal.mmio_read32(bar + INTMS),
        };
        let mqes = (cap & 0xFFFF) as usize + 1;
        let entries = QUEUE_ENTRIES.min(mqes) as u16;
        let blank = DiskInfo { model: Default::default(), serial: Default::default(), blocks: 0, block_size: 512, lba48: true, dma: true };
        let mut disk = Self {
            hal,
            bar,
            doorbell_stride: 4 << (cap >> 32 & 0xF),
            // CAP.TO: worst-case time to become ready, in 500 ms units.
            timeout_us: ((cap >> 24 & 0xFF).max(1)) * 500_000,
            mem,
            admin: QueueState::new(0, entries),
            io: QueueState::new(1, entries),
            next_id: 0,
            nsid: 0,
            max_pages: MAX_COMMAND_PAGES,
            info: blank,
            saved,
            recovering: false,
        };
        // On error, dropping `disk` gives the controller back.
        disk.start()?;
        disk.identify(index)?;
        Ok(disk)
    }

    /// Disable, set up the admin queue, enable, create the I/O queue pair.
    fn start(&mut self) -> Result<(), DiskError> {
        self.disable()?;
        self.mem.admin_cq.fill(Completion::default());
        self.mem.io_cq.fill(Completion::default());
        self.admin = QueueState::new(0, self.admin.entries);
        self.io = QueueState::new(1, self.io.entries);
        let entries = self.admin.entries as u32 - 1;
        let asq = self.hal.virt_to_phys(self.mem.admin_sq.as_ptr().cast());
        let acq = self.hal.virt_to_phys(self.mem.admin_cq.as_ptr().cast());
        // Interrupts masked (polled; INTMS covers pin and MSI, section 3.1.3).
        self.hal.mmio_write32(self.bar + INTMS, !0);
        self.hal.mmio_write32(self.bar + AQA, entries << 16 | entries);
        write64(&self.hal, self.bar + ASQ, asq);
        write64(&self.hal, self.bar + ACQ, acq);
        fence(Ordering::SeqCst);
        let cc = self.saved.cc & !(CC_EN | CC_SHN_MASK | 0x00FF_FFF0) | CC_QUEUE_SIZES;
        self.hal.mmio_write32(self.bar + CC, cc);
        self.hal.mmio_write32(self.bar + CC, cc | CC_EN);
        let hal = &self.hal;
        let ready = poll(hal, self.timeout_us, || hal.mmio_read32(self.bar + CSTS) & (CSTS_RDY | CSTS_CFS) != 0);
        let csts = hal.mmio_read32(self.bar + CSTS);
        if !ready || csts & CSTS_CFS != 0 {
            return Err(DiskError::Timeout { command: 0, lba: 0, waiting_for: "NVMe controller ready (CSTS.RDY)" });
        }
        let cq = self.hal.virt_to_phys(self.mem.io_cq.as_ptr().cast());
        let sq = self.hal.virt_to_phys(self.mem.io_sq.as_ptr().cast());
        let size = (self.io.entries as u32 - 1) << 16 | 1;
        // Physically contiguous, interrupts off (CDW11 PC = 1, IEN = 0).
        self.admin_command(ADMIN_CREATE_CQ, 0, cq, 0, [size, 1, 0, 0, 0, 0])?;
        self.admin_command(ADMIN_CREATE_SQ, 0, sq, 0, [size, 1 << 16 | 1, 0, 0, 0, 0])?;
        Ok(())
    }

    /// CC.EN = 0, and wait for the controller to say it stopped.
    fn disable(&self) -> Result<(), DiskError> {
        let cc = self.hal.mmio_read32(self.bar + CC);
        if cc & CC_EN != 0 {
            self.hal.mmio_write32(self.bar + CC, cc & !CC_EN);
        }
        let hal = &self.hal;
        if !poll(hal, self.timeout_us, || hal.mmio_read32(self.bar + CSTS) & CSTS_RDY == 0) {
            return Err(DiskError::Timeout { command: 0, lba: 0, waiting_for: "NVMe controller disabled (CSTS.RDY = 0)" });
        }
        Ok(())
    }

    /// Identify controller, the active namespaces, and the `index`th one.
    fn identify(&mut self, index: usize) -> Result<(), DiskError> {
        // Identify data lands in the first PRP list page, free until I/O.
        let buf = self.hal.virt_to_phys(self.mem.prp_lists[0].as_ptr().cast());
        self.admin_command(ADMIN_IDENTIFY, 0, buf, 0, [CNS_CONTROLLER, 0, 0, 0, 0, 0])?;
        let id = self.mem.prp_lists[0].as_bytes();
        self.info.serial = crate::heapless_str::Str40::from_ascii_trimmed(&id[4..24]);
        self.info.model = crate::heapless_str::Str40::from_ascii_trimmed(&id[24..64]);
        // MDTS: a power of two of minimum pages, 0 for no limit (5.15.2.1).
        let mdts = id[77];
        if mdts != 0 && mdts < 20 {
            self.max_pages = self.max_pages.min(1 << mdts);
        }
        self.admin_command(ADMIN_IDENTIFY, 0, buf, 0, [CNS_ACTIVE_NAMESPACES, 0, 0, 0, 0, 0])?;
        let list = self.mem.prp_lists[0].as_bytes();
        let nsid = list.chunks(4).take(MAX_NAMESPACES).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).take_while(|&n| n != 0).nth(index);
        let Some(nsid) = nsid else { return Err(DiskError::NoDevice) };
        self.admin_command(ADMIN_IDENTIFY, nsid, buf, 0, [CNS_NAMESPACE, 0, 0, 0, 0, 0])?;
        let ns = self.mem.prp_lists[0].as_bytes();
        let size = u64::from_le_bytes(ns[0..8].try_into().unwrap());
        let format = ns[26] & 0xF; // FLBAS: the LBA format in use
        let lbads = ns[128 + 4 * format as usize + 2]; // LBAF: log2 of the block size
        if lbads != 9 && lbads != 12 {
            return Err(DiskError::Unsupported("NVMe namespace with blocks of other than 512 or 4096 bytes"));
        }
        self.nsid = nsid;
        self.info.blocks = size;
        self.info.block_size = 1 << lbads;
        Ok(())
    }

    /// The namespace this disk reads and writes.
    pub fn nsid(&self) -> u32 {
        self.nsid
    }

    fn doorbell(&self, queue: u16, completion: bool) -> u64 {
        self.bar + DOORBELLS + (2 * queue as u64 + completion as u64) * self.doorbell_stride
    }

    fn admin_command(&mut self, opcode: u8, nsid: u32, prp1: u64, prp2: u64, cdw: [u32; 6]) -> Result<Completion, DiskError> {
        self.submit(false, Command { cdw0: opcode as u32, nsid, reserved: [0; 2], mptr: 0, prp1, prp2, cdw }, 0)
    }

    /// Submits `cmd` on the admin or the I/O queue, rings the doorbell and
    /// polls for its completion.
    fn submit(&mut self, io: bool, cmd: Command, lba: u64) -> Result<Completion, DiskError> {
        let id = self.push(io, cmd);
        let cqe = self.reap(io, cmd.opcode(), lba)?;
        if cqe.dw3 as u16 != id {
            self.recover();
            return Err(DiskError::Interface { command: cmd.opcode(), lba, detail: cqe.dw3 });
        }
        check_status(&cqe, cmd.opcode(), lba)?;
        Ok(cqe)
    }

    /// Puts `cmd` in the next submission slot under a fresh command id and
    /// rings the doorbell; returns the id.
    fn push(&mut self, io: bool, mut cmd: Command) -> u16 {
        self.next_id = self.next_id.wrapping_add(1);
        cmd.cdw0 = cmd.cdw0 & 0xFFFF | (self.next_id as u32) << 16;
        let q = if io { &mut self.io } else { &mut self.admin };
        let sq = if io { &mut self.mem.io_sq } else { &mut self.mem.admin_sq };
        sq[q.tail as usize] = cmd;
        q.tail = (q.tail + 1) % q.entries;
        let (id, tail) = (q.id, q.tail);
        // The controller must see the entry (and any PRP list) before the
        // doorbell that tells it to fetch.
        fence(Ordering::SeqCst);
        self.hal.mmio_write32(self.doorbell(id, false), tail as u32);
        self.next_id
    }

    /// Waits for the next completion on a queue and hands its slot back; a
    /// timeout resets the controller (`opcode` and `lba` name what was
    /// waited for).
    fn reap(&mut self, io: bool, opcode: u8, lba: u64) -> Result<Completion, DiskError> {
        let q = if io { self.io } else { self.admin };
        let cqe_ptr: *const Completion = if io { &raw const self.mem.io_cq[q.head as usize] } else { &raw const self.mem.admin_cq[q.head as usize] };
        // SAFETY: a slot of our completion queue; the controller writes it by
        // DMA, so it is read volatile, and only from this thread.
        let phase_of = || unsafe { core::ptr::read_volatile(&raw const (*cqe_ptr).dw3) } >> 16 & 1 == 1;
        let arrived = poll(&self.hal, COMMAND_US, || phase_of() == q.phase);
        fence(Ordering::SeqCst);
        if !arrived {
            self.recover();
            return Err(DiskError::Timeout { command: opcode, lba, waiting_for: "NVMe completion" });
        }
        // SAFETY: as above; the phase says the controller finished writing it.
        let cqe = unsafe { core::ptr::read_volatile(cqe_ptr) };
        let q = if io { &mut self.io } else { &mut self.admin };
        q.head = (q.head + 1) % q.entries;
        if q.head == 0 {
            q.phase = !q.phase;
        }
        let (id, head) = (q.id, q.head);
        self.hal.mmio_write32(self.doorbell(id, true), head as u32);
        Ok(cqe)
    }

    /// After a timeout or a confused completion: reset and set up again,
    /// so that the caller can still write its failure record.
    fn recover(&mut self) {
        if !self.recovering {
            self.recovering = true;
            let _ = self.start();
            self.recovering = false;
        }
    }

    /// Commands one transfer keeps in flight, each with its own PRP list
    /// page: as many as there are pages when one page holds any command's
    /// list (MDTS at most 513 pages), else one, whose list may chain.
    fn depth(&self) -> usize {
        if self.max_pages <= PRP_PER_PAGE as u64 + 1 { PRP_LIST_PAGES } else { 1 }
    }

    /// Fills the PRP entries for the next `bytes` of `data` (already sized
    /// by [`fit_bytes`]), a list (when one is needed) from list page `list`
    /// on, and returns (PRP1, PRP2).
    fn build_prps(&mut self, data: &mut Pieces, bytes: u64, list: usize) -> (u64, u64) {
        let mut left = bytes;
        let first = data.next_piece(left, Some(PAGE)).expect("fit_bytes sized the command");
        left -= first.len;
        if left == 0 {
            return (first.addr, 0);
        }
        let second = data.next_piece(left.min(PAGE), Some(PAGE)).expect("fit_bytes sized the command");
        left -= second.len;
        if left == 0 {
            return (first.addr, second.addr);
        }
        // A list: entries in list pages, the last entry of a full page
        // pointing at the next page (section 4.3).
        let list_phys = |mem: &NvmeMemory, hal: &H, page: usize| hal.virt_to_phys(mem.prp_lists[page].as_ptr().cast());
        let (mut page, mut slot) = (list, 0);
        self.mem.prp_lists[page][0] = second.addr;
        slot += 1;
        while left > 0 {
            let piece = data.next_piece(left.min(PAGE), Some(PAGE)).expect("fit_bytes sized the command");
            left -= piece.len;
            if slot == PRP_PER_PAGE - 1 && left > 0 {
                self.mem.prp_lists[page][slot] = list_phys(self.mem, &self.hal, page + 1);
                page += 1;
                slot = 0;
            }
            self.mem.prp_lists[page][slot] = piece.addr;
            slot += 1;
        }
        (first.addr, list_phys(self.mem, &self.hal, list))
    }

    /// Stops the controller for good: for when the memory the caller's
    /// queues were in now belongs to someone else (after a restore). The
    /// same as [`Self::close`]: a disabled controller fetches nothing.
    pub fn stop(self) {}

    /// Disables the controller, which deletes the I/O queues (section
    /// 7.6.2), and puts back the admin queue registers and the interrupt
    /// mask as found (see the `Drop` impl, which does it on every path).
    pub fn close(self) {}

    fn give_back(&self) {
        let _ = self.disable();
        let hal = &self.hal;
        hal.mmio_write32(self.bar + CC, self.saved.cc & !CC_EN);
        hal.mmio_write32(self.bar + AQA, self.saved.aqa);
        write64(hal, self.bar + ASQ, self.saved.asq);
        write64(hal, self.bar + ACQ, self.saved.acq);
        // INTMS/INTMC are write-one-to-set/clear views of one mask.
        hal.mmio_write32(self.bar + INTMC, !self.saved.intms);
        hal.mmio_write32(self.bar + INTMS, self.saved.intms);
    }
}

impl<H: Hal> Drop for NvmeDisk<'_, H> {
    fn drop(&mut self) {
        self.give_back();
    }
}

/// The error a completion's status field reports, if any.
fn check_status(cqe: &Completion, opcode: u8, lba: u64) -> Result<(), DiskError> {
    let status = (cqe.dw3 >> 17) as u16 & 0x7FF;
    if status != 0 {
        return Err(DiskError::Nvme { opcode, lba, status });
    }
    Ok(())
}

/// How many bytes from `data` one command can carry in PRPs: pieces split
/// at page boundaries, every piece but the first starting a page and every
/// one but the last ending one (section 4.3), at most `max_pages` pages and
/// `want` bytes. The caller rounds down to whole blocks: a block spans at
/// most two pages, and MDTS allows at least two.
fn fit_bytes(data: &Pieces, want: u64, max_pages: u64) -> u64 {
    let mut probe = *data;
    let mut bytes = 0;
    let mut pages = 0;
    let mut ended_on_page = true;
    while bytes < want && pages < max_pages {
        let Some(piece) = probe.next_piece((want - bytes).min(PAGE), Some(PAGE)) else { break };
        if pages > 0 && (!ended_on_page || piece.addr % PAGE != 0) {
            break;
        }
        bytes += piece.len;
        pages += 1;
        ended_on_page = (piece.addr + piece.len) % PAGE == 0;
    }
    bytes
}

impl<H: Hal> BlockDevice for NvmeDisk<'_, H> {
    fn info(&self) -> &DiskInfo {
        &self.info
    }

    /// Splits the request into commands (PRP rules, MDTS, 16-bit NLB) and
    /// keeps up to `depth()` of them in flight: one at a time leaves the
    /// device idle between commands (measured under QEMU: 0.78x `dd` on
    /// writes, where Linux queues several).
    fn transfer(&mut self, dir: Direction, lba: u64, segments: &[Segment]) -> Result<(), DiskError> {
        let total = check_request(&self.info, lba, segments)?;
        let opcode = if dir == Direction::Write { NVM_WRITE } else { NVM_READ };
        let depth = self.depth();
        let mut data = Pieces::new(segments);
        // Per command in flight: its id and first LBA; its index is its list page.
        let mut flight: [Option<(u16, u64)>; PRP_LIST_PAGES] = [None; PRP_LIST_PAGES];
        let mut queued = 0;
        let mut first_error = None;
        loop {
            while first_error.is_none() && queued < total {
                let Some(list) = flight[..depth].iter().position(Option::is_none) else { break };
                // NLB is 16 bits, 0-based; whole blocks a command.
                let block = self.info.block_size as u64;
                let want = (total - queued).min(1 << 16) * block;
                let count = (fit_bytes(&data, want, self.max_pages) / block).max(1);
                let at = lba + queued;
                let (prp1, prp2) = self.build_prps(&mut data, count * block, list);
                // CDW10-11 starting LBA, CDW12 blocks - 1.
                let cdw = [at as u32, (at >> 32) as u32, (count - 1) as u32, 0, 0, 0];
                let id = self.push(true, Command { cdw0: opcode as u32, nsid: self.nsid, reserved: [0; 2], mptr: 0, prp1, prp2, cdw });
                flight[list] = Some((id, at));
                queued += count;
            }
            let Some(oldest) = flight.iter().flatten().map(|f| f.1).min() else { break };
            // A timeout resets the controller, which drops every command.
            let cqe = self.reap(true, opcode, oldest)?;
            let Some(slot) = flight.iter().position(|f| f.is_some_and(|(id, _)| id == cqe.dw3 as u16)) else {
                self.recover();
                return Err(DiskError::Interface { command: opcode, lba: oldest, detail: cqe.dw3 });
            };
            let (_, at) = flight[slot].take().expect("found above");
            // After an error the others in flight are still reaped, so that
            // the queues stay in step for what comes next.
            if let Err(e) = check_status(&cqe, opcode, at) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        let cmd = Command { cdw0: NVM_FLUSH as u32, nsid: self.nsid, ..Default::default() };
        self.submit(true, cmd, 0).map(|_| ())
    }
}
