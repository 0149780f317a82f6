//! `ksave status`: the image header on the configured partition (or a
//! given partition, disk or image file).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use ksave_tools::imagefile::ImageFile;

use super::show;

pub fn run(path: Option<PathBuf>, json: bool) -> Result<ExitCode> {
    let path = super::path_or_setup(path)?;
    let header = ImageFile::open(&path, false)?.header()?;
    if json {
        println!("{}", show::header_json(&header));
    } else {
        show::print_header(&header);
    }
    Ok(ExitCode::SUCCESS)
}
