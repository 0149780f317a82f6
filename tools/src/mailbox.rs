//! The host side of the mailbox (ksave_format::mailbox): one locked page of
//! this process that ksave writes its reason into when the partition is
//! what failed.

use std::fs::File;
use std::os::unix::fs::FileExt;

use anyhow::{Context, Result, ensure};
use ksave_format::PAGE;
use ksave_format::mailbox::Mailbox;
use zerocopy::FromBytes;

/// A page of this process, locked in RAM, stamped for one attempt.
pub struct MailboxPage {
    page: *mut u8,
    phys: u64,
}

impl MailboxPage {
    /// Maps, locks and stamps a page for attempt `nonce`, and finds its
    /// physical address (root only: /proc/self/pagemap hides frames from
    /// others).
    pub fn new(nonce: u64) -> Result<Self> {
        // SAFETY: an anonymous private mapping of one page; checked below.
        let page = unsafe {
            libc::mmap(std::ptr::null_mut(), PAGE, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        ensure!(page != libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        let mut me = Self { page: page.cast(), phys: 0 };
        // SAFETY: the page is ours and mapped; mlock faults it in and keeps
        // it resident (it may still move: ksave checks the stamp).
        ensure!(unsafe { libc::mlock(page, PAGE) } == 0, "mlock: {}", std::io::Error::last_os_error());
        let (mailbox, _) = Mailbox::mut_from_prefix(me.bytes_mut()).expect("a page holds a mailbox");
        *mailbox = Mailbox::new(nonce);
        me.phys = physical_address(me.page as u64)?;
        Ok(me)
    }

    /// Its physical address, for the config.
    pub fn phys(&self) -> u64 {
        self.phys
    }

    /// What ksave left in it, if anything.
    pub fn posted(&self) -> Option<(u32, String)> {
        let (mailbox, _) = Mailbox::ref_from_prefix(self.bytes()).ok()?;
        mailbox.posted().map(|(code, text)| (code, text.to_string()))
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: one mapped page, ours for as long as self lives. ksave
        // wrote it while this process was frozen, never concurrently.
        unsafe { std::slice::from_raw_parts(self.page, PAGE) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for bytes, exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.page, PAGE) }
    }
}

impl Drop for MailboxPage {
    fn drop(&mut self) {
        // SAFETY: unmapping the page mapped in new (which also unlocks it).
        unsafe { libc::munmap(self.page.cast(), PAGE) };
    }
}

/// The physical address of the resident page at `va`, from /proc/self/pagemap
/// (Documentation/admin-guide/mm/pagemap.rst: one u64 a page, bit 63
/// present, bits 0-54 the frame).
fn physical_address(va: u64) -> Result<u64> {
    let pagemap = File::open("/proc/self/pagemap").context("opening /proc/self/pagemap")?;
    let mut entry = [0u8; 8];
    pagemap.read_exact_at(&mut entry, va / PAGE as u64 * 8).context("reading /proc/self/pagemap")?;
    let entry = u64::from_le_bytes(entry);
    let frame = entry & ((1 << 55) - 1);
    ensure!(entry >> 63 == 1 && frame != 0, "the mailbox page has no frame we can see (needs root)");
    Ok(frame * PAGE as u64 + va % PAGE as u64)
}
