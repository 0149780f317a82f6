//! `ksave invalidate`: mark an image as never to be restored.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use ksave_tools::imagefile::ImageFile;

pub fn run(path: Option<PathBuf>) -> Result<ExitCode> {
    let path = super::path_or_setup(path)?;
    let mut file = ImageFile::open(&path, true)?;
    let was = file.invalidate(None)?;
    println!("ksave: {}: image {} -> invalidated", file.description, was.name());
    Ok(ExitCode::SUCCESS)
}
