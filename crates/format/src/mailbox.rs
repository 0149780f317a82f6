//! The mailbox: one page of the host tool's memory where ksave leaves its
//! reason when it cannot write one on the partition (no disk it drives, no
//! partition, a failing disk). The tool locks the page, stamps it with the
//! attempt's nonce and puts its physical address in the config; ksave
//! writes only into a page that still carries that stamp.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// "KSAVEMBX".
pub const MAGIC: [u8; 8] = *b"KSAVEMBX";
/// Bytes of the message.
pub const MESSAGE_LEN: usize = 240;
const STATE_EMPTY: u32 = 0;
const STATE_POSTED: u32 = 1;

/// The start of the mailbox page, little-endian.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Mailbox {
    magic: [u8; 8],
    nonce: U64,
    state: U32,
    code: U32,
    message: [u8; MESSAGE_LEN],
}

impl Mailbox {
    /// An empty mailbox for attempt `nonce`.
    pub fn new(nonce: u64) -> Self {
        Self { magic: MAGIC, nonce: nonce.into(), state: STATE_EMPTY.into(), code: 0.into(), message: [0; MESSAGE_LEN] }
    }

    /// Whether this is the mailbox of attempt `nonce`.
    pub fn is_for(&self, nonce: u64) -> bool {
        self.magic == MAGIC && self.nonce.get() == nonce
    }

    /// Leaves `code` and `text` (cut on a char boundary).
    pub fn post(&mut self, code: u32, text: &str) {
        let mut n = text.len().min(MESSAGE_LEN);
        while !text.is_char_boundary(n) {
            n -= 1;
        }
        self.message = [0; MESSAGE_LEN];
        self.message[..n].copy_from_slice(&text.as_bytes()[..n]);
        self.code = code.into();
        self.state = STATE_POSTED.into();
    }

    /// The code and message ksave left, if any.
    pub fn posted(&self) -> Option<(u32, &str)> {
        if self.state.get() != STATE_POSTED {
            return None;
        }
        let end = self.message.iter().position(|&b| b == 0).unwrap_or(MESSAGE_LEN);
        Some((self.code.get(), core::str::from_utf8(&self.message[..end]).unwrap_or("(not UTF-8)")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_posted_message_is_read_back_only_for_its_attempt() {
        let mut page = [0u8; 4096];
        let (mb, _) = Mailbox::mut_from_prefix(&mut page).unwrap();
        *mb = Mailbox::new(42);
        assert!(mb.is_for(42) && !mb.is_for(43));
        assert_eq!(mb.posted(), None);
        mb.post(7, "no AHCI or IDE disk found");
        let (mb, _) = Mailbox::ref_from_prefix(&page).unwrap();
        assert_eq!(mb.posted(), Some((7, "no AHCI or IDE disk found")));
    }
}
