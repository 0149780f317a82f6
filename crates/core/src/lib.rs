//! What ksave does with an image, apart from the machine it runs on: the
//! stages of a [`save`] and the checks, load and invalidation of a
//! [`resume`], generic over small traits (the image store, physical memory,
//! a clock), so that host tests drive a whole save and a whole resume
//! against in-memory fakes; and the [`store`] over a disk, generic over the
//! disk driver, which host tests drive through the drivers' register-level
//! fakes. The bare-metal image (src/) supplies the disk, the
//! identity-mapped memory and the TSC clock, and prints what happened.
//!
//! Nothing here prints: every function returns what it did (counts,
//! timings, a [`save::Failure`] or a [`resume::Refused`]).
#![no_std]
#![deny(missing_docs)]
// No heap to box into: a reason is a fixed-capacity Message, returned by value.
#![allow(clippy::result_large_err)]

#[cfg(test)]
extern crate std;

pub mod helpers;
pub mod message;
pub mod resume;
pub mod save;
pub mod store;

pub use message::Message;
