//! The QEMU harness: boots real kernels and ksave under QEMU (TCG), watches
//! the serial console line by line with host timestamps, and checks what
//! they print in order, each step with a deadline.
//!
//! The scenarios in [`scenarios`] are shared by `make qemu` (the demo, which
//! echoes the console) and the e2e tests.

pub mod bench;
pub mod disk;
pub mod memdata;
pub mod scenarios;
mod vm;

pub use vm::{Line, Metrics, Vm, VmConfig};

use std::path::PathBuf;

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Where `make` leaves the VM inputs: ksave.elf, bzImage, initramfs.cpio.gz.
pub fn build_dir() -> PathBuf {
    std::env::var_os("KSAVE_BUILD").map(PathBuf::from).unwrap_or_else(|| repo_root().join("build"))
}

/// A file from [`build_dir`], or an error that says how to make it.
pub fn build_input(name: &str) -> anyhow::Result<PathBuf> {
    let path = build_dir().join(name);
    anyhow::ensure!(path.exists(), "{} is missing: run `make test` (or `make vm-inputs`) first", path.display());
    Ok(path)
}
