//! A fake NVMe controller (NVM Express Base 1.4): controller registers,
//! doorbells, admin and I/O queues with phase tags, Identify, PRP lists
//! (chained across list pages), and namespaces backed by [`Disk`]s.
//!
//! Commands run when their submission doorbell is written, as if the
//! controller were infinitely fast; [`NvmeFaults`] makes it fail or hang.

use std::vec;
use std::vec::Vec;

use super::{Disk, touches};

const PAGE: u64 = 4096;

/// What the fake NVMe controller should get wrong.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NvmeFaults {
    /// Fail any write touching this LBA (media error: write fault).
    pub write_error_at: Option<u64>,
    /// Fail any read touching this LBA (media error: unrecovered read).
    pub read_error_at: Option<u64>,
    /// Take I/O commands and never complete them.
    pub hang_io: bool,
}

/// One namespace: a disk and its block size (log2).
pub struct Namespace {
    /// The blocks.
    pub disk: Disk,
    /// log2 of the block size (9: 512 bytes, 12: 4 KiB).
    pub lbads: u8,
}

/// What the fake saw, for tests to check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NvmeStats {
    /// Read and write commands completed.
    pub io_commands: u64,
    /// The most pages one read or write moved.
    pub max_pages: u64,
    /// The most PRP list pages one command used.
    pub max_list_pages: u64,
    /// FLUSH commands.
    pub flushes: u64,
    /// Times the controller went from disabled to enabled.
    pub enables: u64,
    /// The most completions posted that the host had not yet taken.
    pub max_unreaped: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Queue {
    base: u64,
    entries: u16,
    /// Submission: next entry to fetch. Completion: next entry to post.
    position: u16,
    /// Completion queues: the phase tag being posted.
    phase: bool,
    /// Completion queues: the host's head, from the doorbell.
    head: u16,
    /// Submission queues: the completion queue they post to.
    cq: u16,
}

/// A fake NVMe controller; its registers start at [`super::Machine::NVME_BAR`].
pub struct NvmeController {
    /// CAP as reported.
    pub cap: u64,
    /// CC as last written.
    pub cc: u32,
    csts: u32,
    /// AQA as last written.
    pub aqa: u32,
    /// ASQ as last written.
    pub asq: u64,
    /// ACQ as last written.
    pub acq: u64,
    /// The interrupt mask (INTMS reads).
    pub intms: u32,
    /// Identify controller's MDTS (0: no limit).
    pub mdts: u8,
    /// The namespaces, NSID 1 first.
    pub namespaces: Vec<Namespace>,
    /// Faults to inject.
    pub faults: NvmeFaults,
    /// What happened.
    pub stats: NvmeStats,
    sq: [Option<Queue>; 2],
    cq: [Option<Queue>; 2],
}

impl NvmeController {
    /// A controller with these namespaces; the registers hold what a
    /// kernel's driver would have left in them (enabled, some admin queue).
    pub fn new(namespaces: Vec<Namespace>) -> Self {
        Self {
            // MQES 63, TO 2 (1 s), DSTRD 0, CSS bit 0 (NVM), MPSMIN 0.
            cap: 63 | 2 << 24 | 1 << 37,
            cc: 0x0046_0001,
            csts: 1,
            aqa: 0x001F_001F,
            asq: 0x1234_5000,
            acq: 0x1234_6000,
            intms: 0,
            mdts: 5,
            namespaces,
            faults: NvmeFaults::default(),
            stats: NvmeStats::default(),
            sq: [None; 2],
            cq: [None; 2],
        }
    }

    /// Whether CC.EN is set.
    pub fn enabled(&self) -> bool {
        self.cc & 1 != 0
    }

    /// Register read at `offset` from the BAR.
    pub fn read(&self, offset: u64) -> u32 {
        match offset {
            0x00 => self.cap as u32,
            0x04 => (self.cap >> 32) as u32,
            0x08 => 0x0001_0400, // VS 1.4
            0x0C | 0x10 => self.intms,
            0x14 => self.cc,
            0x1C => self.csts,
            0x24 => self.aqa,
            0x28 => self.asq as u32,
            0x2C => (self.asq >> 32) as u32,
            0x30 => self.acq as u32,
            0x34 => (self.acq >> 32) as u32,
            _ => 0,
        }
    }

    /// Register write at `offset` from the BAR.
    pub fn write(&mut self, offset: u64, value: u32) {
        match offset {
            0x0C => self.intms |= value,
            0x10 => self.intms &= !value,
            0x14 => self.set_cc(value),
            0x24 => self.aqa = value,
            0x28 => self.asq = self.asq & !0xFFFF_FFFF | value as u64,
            0x2C => self.asq = self.asq & 0xFFFF_FFFF | (value as u64) << 32,
            0x30 => self.acq = self.acq & !0xFFFF_FFFF | value as u64,
            0x34 => self.acq = self.acq & 0xFFFF_FFFF | (value as u64) << 32,
            0x1000.. => {
                let index = (offset - 0x1000) / 4;
                let (qid, completion) = ((index / 2) as usize, index % 2 == 1);
                assert!(qid < 2, "doorbell of queue {qid}, which the fake does not have");
                if completion {
                    let cq = self.cq[qid].as_mut().expect("completion doorbell of a queue never created");
                    assert!(value < cq.entries as u32, "CQ head {value} beyond the queue");
                    cq.head = value as u16;
                } else {
                    self.ring(qid, value as u16);
                }
            }
            _ => {}
        }
    }

    fn set_cc(&mut self, value: u32) {
        let was = self.enabled();
        self.cc = value;
        match (was, self.enabled()) {
            (false, true) => {
                self.stats.enables += 1;
                assert_eq!(value >> 16 & 0xF, 6, "IOSQES must be 6 (64 bytes)");
                assert_eq!(value >> 20 & 0xF, 4, "IOCQES must be 4 (16 bytes)");
                let (sq_entries, cq_entries) = ((self.aqa & 0xFFF) as u16 + 1, (self.aqa >> 16 & 0xFFF) as u16 + 1);
                self.sq = [Some(Queue { base: self.asq, entries: sq_entries, ..Queue::default() }), None];
                self.cq = [Some(Queue { base: self.acq, entries: cq_entries, phase: true, ..Queue::default() }), None];
                self.csts = 1;
            }
            (true, false) => {
                self.sq = [None; 2];
                self.cq = [None; 2];
                self.csts = 0;
            }
            _ => {}
        }
        if value >> 14 & 3 != 0 {
            self.csts = self.csts & !0xC | 2 << 2; // shutdown complete
        }
    }

    /// Runs the submissions up to the new tail.
    fn ring(&mut self, qid: usize, tail: u16) {
        assert!(self.enabled(), "doorbell written while the controller is disabled");
        loop {
            let sq = self.sq[qid].expect("submission doorbell of a queue never created");
            assert!(tail < sq.entries, "SQ tail {tail} beyond the queue");
            if sq.position == tail {
                return;
            }
            // SAFETY: test-only; the driver gave the queue's address and
            // keeps it alive while the controller is enabled.
            let cmd: [u32; 16] = unsafe { core::ptr::read_volatile((sq.base + 64 * sq.position as u64) as *const [u32; 16]) };
            self.sq[qid].as_mut().unwrap().position = (sq.position + 1) % sq.entries;
            let status = if qid == 0 { self.admin(&cmd) } else { self.io(&cmd) };
            if let Some(status) = status {
                self.complete(sq.cq as usize, qid as u16, cmd[0] >> 16, status);
            }
        }
    }

    /// Posts a completion with the current phase.
    fn complete(&mut self, cqid: usize, sqid: u16, id: u32, status: u16) {
        let sq_head = self.sq[sqid as usize].map_or(0, |q| q.position);
        let cq = self.cq[cqid].as_mut().expect("completion queue missing");
        assert_ne!((cq.position + 1) % cq.entries, cq.head, "completion queue full: the host never advanced its head");
        let entry = [0u32, 0, (sqid as u32) << 16 | sq_head as u32, id | (cq.phase as u32) << 16 | (status as u32) << 17];
        // SAFETY: test-only; a slot of the queue the driver gave.
        unsafe { core::ptr::write_volatile((cq.base + 16 * cq.position as u64) as *mut [u32; 4], entry) };
        cq.position = (cq.position + 1) % cq.entries;
        if cq.position == 0 {
            cq.phase = !cq.phase;
        }
        let unreaped = (cq.position + cq.entries - cq.head) % cq.entries;
        self.stats.max_unreaped = self.stats.max_unreaped.max(unreaped as u64);
    }

    fn admin(&mut self, cmd: &[u32; 16]) -> Option<u16> {
        let prp1 = cmd[6] as u64 | (cmd[7] as u64) << 32;
        let (nsid, cdw10, cdw11) = (cmd[1], cmd[10], cmd[11]);
        Some(match cmd[0] as u8 {
            0x06 => {
                let mut page = [0u8; PAGE as usize];
                match cdw10 & 0xFF {
                    1 => {
                        page[4..12].copy_from_slice(b"FAKE0001");
                        page[24..38].copy_from_slice(b"ksave fake SSD");
                        page[77] = self.mdts;
                        page[516..520].copy_from_slice(&(self.namespaces.len() as u32).to_le_bytes());
                        page[525] = 1; // volatile write cache
                    }
                    2 => {
                        // Active NSIDs above `nsid`, in increasing order.
                        let ids = (1..=self.namespaces.len() as u32).filter(|&id| id > nsid);
                        for (slot, id) in page.chunks_mut(4).zip(ids) {
                            slot.copy_from_slice(&id.to_le_bytes());
                        }
                    }
                    0 => {
                        let Some(ns) = self.namespace(nsid) else { return Some(0x0B) };
                        let blocks = (ns.disk.borrow().sectors * 512) >> ns.lbads;
                        page[0..8].copy_from_slice(&blocks.to_le_bytes());
                        page[8..16].copy_from_slice(&blocks.to_le_bytes());
                        page[26] = 0; // FLBAS: format 0
                        page[128 + 2] = ns.lbads;
                    }
                    _ => return Some(0x02),
                }
                // SAFETY: test-only; PRP1 is the driver's page-aligned buffer.
                unsafe { core::ptr::copy_nonoverlapping(page.as_ptr(), prp1 as *mut u8, PAGE as usize) };
                0
            }
            0x05 => {
                assert_eq!(cdw11 & 3, 1, "I/O CQ must be physically contiguous with interrupts off");
                self.cq[1] = Some(Queue { base: prp1, entries: (cdw10 >> 16) as u16 + 1, phase: true, ..Queue::default() });
                0
            }
            0x01 => {
                assert_eq!(cdw11 & 1, 1, "I/O SQ must be physically contiguous");
                assert!(self.cq[(cdw11 >> 16) as usize].is_some(), "SQ created before its CQ");
                self.sq[1] = Some(Queue { base: prp1, entries: (cdw10 >> 16) as u16 + 1, cq: (cdw11 >> 16) as u16, ..Queue::default() });
                0
            }
            0x00 => {
                self.sq[1] = None;
                0
            }
            0x04 => {
                self.cq[1] = None;
                0
            }
            _ => 0x01, // invalid opcode
        })
    }

    fn namespace(&self, nsid: u32) -> Option<&Namespace> {
        self.namespaces.get((nsid as usize).checked_sub(1)?)
    }

    fn io(&mut self, cmd: &[u32; 16]) -> Option<u16> {
        if self.faults.hang_io {
            return None;
        }
        let Some(ns) = self.namespace(cmd[1]) else { return Some(0x0B) };
        let opcode = cmd[0] as u8;
        if opcode == 0x00 {
            self.stats.flushes += 1;
            return Some(0);
        }
        let lba = cmd[10] as u64 | (cmd[11] as u64) << 32;
        let blocks = (cmd[12] & 0xFFFF) as u64 + 1;
        let shift = ns.lbads - 9;
        let (sector, sectors) = (lba << shift, blocks << shift);
        if sector + sectors > ns.disk.borrow().sectors {
            return Some(0x80); // LBA out of range
        }
        let prp = (cmd[6] as u64 | (cmd[7] as u64) << 32, cmd[8] as u64 | (cmd[9] as u64) << 32);
        let Some((regions, list_pages)) = walk_prps(prp, sectors * 512) else { return Some(0x02) };
        let write = match opcode {
            0x01 => true,
            0x02 => false,
            _ => return Some(0x01),
        };
        if write && touches(self.faults.write_error_at, lba, blocks) {
            return Some(2 << 8 | 0x80);
        }
        if !write && touches(self.faults.read_error_at, lba, blocks) {
            return Some(2 << 8 | 0x81);
        }
        super::dma(&ns.disk, sector, &regions, !write);
        self.stats.io_commands += 1;
        self.stats.max_pages = self.stats.max_pages.max(regions.len() as u64);
        self.stats.max_list_pages = self.stats.max_list_pages.max(list_pages);
        Some(0)
    }
}

/// The memory regions of a PRP pair for `bytes` (section 4.3), and how
/// many list pages it used; `None` if an entry breaks the rules.
fn walk_prps((prp1, prp2): (u64, u64), bytes: u64) -> Option<(Vec<(u64, u64)>, u64)> {
    if prp1 % 4 != 0 {
        return None;
    }
    let first = (PAGE - prp1 % PAGE).min(bytes);
    let mut regions = vec![(prp1, first)];
    let mut left = bytes - first;
    if left == 0 {
        return Some((regions, 0));
    }
    if left <= PAGE {
        if prp2 % PAGE != 0 {
            return None;
        }
        regions.push((prp2, left));
        return Some((regions, 0));
    }
    let (mut list, mut slot, mut pages) = (prp2, 0u64, 1u64);
    if list % 8 != 0 {
        return None;
    }
    while left > 0 {
        // SAFETY: test-only; the list page the driver handed over.
        let entry = unsafe { core::ptr::read_volatile((list + 8 * slot) as *const u64) };
        if slot == PAGE / 8 - 1 && left > PAGE {
            // The last entry of a list page points at the next page.
            (list, slot, pages) = (entry, 0, pages + 1);
            continue;
        }
        if entry % PAGE != 0 {
            return None;
        }
        let n = left.min(PAGE);
        regions.push((entry, n));
        left -= n;
        slot += 1;
    }
    Some((regions, pages))
}
