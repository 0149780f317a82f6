//! Which pages a stopped Linux kernel holds free, so that an image can leave
//! them out, found the way makedumpfile finds them:
//!
//! - [`vmcoreinfo`]: the kernel's own description of itself (the note
//!   `/sys/kernel/vmcoreinfo` locates): struct sizes and offsets, where
//!   `mem_section` and the page tables are, and how a free block is marked.
//! - [`buddy`]: for a page frame, its `struct page` through `mem_section`
//!   and the kernel's page tables, and whether it heads a free buddy block.
//!
//! Leaving out a page the kernel uses corrupts it silently; saving a free
//! one only costs space. So every step answers "free" only on proof: any
//! value out of range, any translation that does not resolve, any kernel
//! whose marker is not known here, answers "not free" (save it).
#![no_std]
#![deny(missing_docs)]

#[cfg(test)]
extern crate std;

pub mod buddy;
pub mod vmcoreinfo;

/// Why free pages cannot be told apart: the whole RAM is saved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Doubt {
    /// The note is not a VMCOREINFO ELF note.
    Note(&'static str),
    /// A needed key is missing.
    Missing(&'static str),
    /// A key's value does not parse or is out of range.
    Value(&'static str),
    /// A key appears twice with different values.
    Twice(&'static str),
    /// A kernel version whose buddy marker is not known here.
    Kernel(u32, u32),
    /// The buddy marker's value is not what this kernel version uses.
    Marker(u64),
    /// The kernel's page tables do not map what they must.
    Tables(&'static str),
}

impl core::fmt::Display for Doubt {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Note(what) => write!(f, "vmcoreinfo note: {what}"),
            Self::Missing(key) => write!(f, "vmcoreinfo lacks {key}"),
            Self::Value(key) => write!(f, "vmcoreinfo {key} out of range"),
            Self::Twice(key) => write!(f, "vmcoreinfo gives {key} twice"),
            Self::Kernel(major, minor) => write!(f, "kernel {major}.{minor}: its free-page marker is not known to this ksave"),
            Self::Marker(v) => write!(f, "buddy marker {v:#x} is not this kernel version's"),
            Self::Tables(what) => write!(f, "kernel page tables: {what}"),
        }
    }
}
