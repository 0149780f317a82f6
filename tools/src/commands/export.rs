//! `ksave export --elf`: an image's RAM as an ELF64 core file.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use ksave_tools::export;

pub fn run(elf: &Path, path: &Path, force: bool) -> Result<ExitCode> {
    let mut file = super::open_store(Some(path.to_path_buf()), false)?;
    let (pages, bytes) = export::export(&mut file, elf, force)?;
    println!("ksave: wrote {} ({pages} stored pages, {} MiB of address space)", elf.display(), bytes >> 20);
    Ok(ExitCode::SUCCESS)
}
