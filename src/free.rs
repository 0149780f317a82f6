//! The caller's free pages, which a save leaves out: the kernel's own
//! description of itself (its VMCOREINFO note, located by the host tool)
//! read by `freepages` through the caller's page tables, as the caller
//! sees its memory. Any doubt saves the page.

use bootinfo::PhysRead;
use bootinfo::kexec::{CR4_LA57, CallerContext};
use freepages::buddy::Scanner;
use freepages::vmcoreinfo::{self, Info};
use ksave_core::Message;
use ksave_format::commit::FreePages;
use ksave_format::config::{Config, MAX_VMCOREINFO};
use ksave_format::{PAGE, Range};

use crate::jump::{BackupMap, KernelView};

/// Reads the note and checks it describes the caller; the reason if not.
#[inline(never)] // its 8 KiB note buffer must not stay in the caller's frame during the save
pub fn kernel_info(config: &Config, ctx: &CallerContext, view: &KernelView) -> Result<Info, Message> {
    let note = config.vmcoreinfo;
    if note.start == note.end {
        return Err(Message::format(format_args!("the kernel has no vmcoreinfo note (/sys/kernel/vmcoreinfo)")));
    }
    let mut bytes = [0u8; MAX_VMCOREINFO as usize];
    let len = (note.end - note.start) as usize;
    for (i, word) in bytes[..len.next_multiple_of(8)].chunks_exact_mut(8).enumerate() {
        let at = note.start + 8 * i as u64;
        let w = at.is_multiple_of(8).then(|| view.read_u64(at)).flatten();
        word.copy_from_slice(&w.ok_or_else(|| Message::format(format_args!("vmcoreinfo note at {:#x} unreadable", note.start)))?.to_le_bytes());
    }
    let doubt = |d| Message::format(format_args!("{d}"));
    let info = Info::parse(vmcoreinfo::note_text(&bytes[..len]).map_err(doubt)?).map_err(doubt)?;
    if info.la57 != (ctx.saved_cr4 & CR4_LA57 != 0) {
        return Err(Message::format(format_args!("vmcoreinfo's paging mode is not the caller's")));
    }
    Ok(info)
}

/// A block is left out only if the kernel marks it free, it lies wholly in
/// one RAM range, and no page of it is one the jump itself uses.
pub struct CallerFree<'a> {
    scanner: Scanner<'a, KernelView<'a>>,
    ram: &'a [Range],
    backup: &'a BackupMap,
}

impl<'a> CallerFree<'a> {
    /// Free pages of the kernel `info` describes, read through `view`.
    pub fn new(info: &Info, view: &'a KernelView<'a>, ram: &'a [Range], backup: &'a BackupMap) -> Result<Self, Message> {
        let scanner = Scanner::new(info, view, info.la57).map_err(|d| Message::format(format_args!("{d}")))?;
        Ok(Self { scanner, ram, backup })
    }
}

impl FreePages for CallerFree<'_> {
    fn free_block(&mut self, pfn: u64) -> Option<u64> {
        let pages = 1u64 << self.scanner.free_order(pfn)?;
        let (start, end) = (pfn * PAGE as u64, (pfn + pages) * PAGE as u64);
        let in_ram = self.ram.iter().any(|r| r.start <= start && end <= r.end);
        (in_ram && !self.backup.has_source_in(start, end)).then_some(pages)
    }
}
