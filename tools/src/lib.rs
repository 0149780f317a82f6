//! Host-side logic of the `ksave` CLI, kept apart from argument parsing so it
//! can be tested.

pub mod btrfs;
pub mod efiimage;
pub mod elfimage;
pub mod export;
pub mod filestore;
pub mod freeze;
pub mod fs;
pub mod imagefile;
pub mod inspect;
pub mod keyblock;
pub mod load;
pub mod mailbox;
pub mod mounts;
pub mod ready;
pub mod setup;
pub mod store;
pub mod sys;
pub mod uefi;
