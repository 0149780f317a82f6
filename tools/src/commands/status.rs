//! `ksave status`: the image header on the configured partition (or a
//! given partition, disk or image file).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;

use super::show;

pub fn run(path: Option<PathBuf>, json: bool) -> Result<ExitCode> {
    let header = super::open_store(path, false)?.header()?;
    if json {
        println!("{}", show::header_json(&header));
    } else {
        show::print_header(&header);
    }
    Ok(ExitCode::SUCCESS)
}
