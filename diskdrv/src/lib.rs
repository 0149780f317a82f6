//! Polling disk drivers for ksave: PCI discovery, AHCI, legacy IDE and
//! partition lookup, behind a hardware-access trait so they run unchanged on
//! QEMU and against register-level fakes on the host.
//!
//! Empty until the disk-driver issue lands; the crate exists now so the
//! workspace layout is settled.
#![no_std]
