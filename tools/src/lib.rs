//! Host-side logic of the `ksave` CLI, kept apart from argument parsing so it
//! can be tested.

pub mod elfimage;
