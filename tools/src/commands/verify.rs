//! `ksave verify`: check every checksum of an image; the exit code tells.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use ksave_format::header::State;
use ksave_tools::inspect;

pub fn run(path: &Path) -> Result<ExitCode> {
    let mut file = super::open_store(Some(path.to_path_buf()), false)?;
    let image = inspect::read(&mut file)?;
    if image.header.state != State::Complete {
        println!("ksave: {}: image is {}, not restorable: {}", file.description, image.header.state.name(), image.header.message());
        return Ok(ExitCode::FAILURE);
    }
    let mut pages = 0u64;
    let mut chunks = 0u64;
    let mut free = 0u64;
    match inspect::walk(&mut file, &image, inspect::Walk::new(|_, _| pages += 1, |_, n| free += n, |_| chunks += 1)) {
        Ok(()) => {
            println!("ksave: {}: OK: {pages} pages in {chunks} chunks, {free} free pages listed, every checksum right", file.description);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("ksave: BAD: {e:#}");
            Ok(ExitCode::FAILURE)
        }
    }
}
