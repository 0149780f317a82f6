//! `ksave invalidate`: mark an image as never to be restored.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use diskdrv::part::Guid;
use ksave_format::header::State;
use ksave_tools::imagefile::ImageFile;
use ksave_tools::sys;

pub fn run(path: Option<PathBuf>, partuuid: Option<String>, reason: Option<String>) -> Result<ExitCode> {
    println!("{}", invalidate(path, partuuid, reason)?);
    Ok(ExitCode::SUCCESS)
}

/// Invalidates the image, if there is one to invalidate; returns what was
/// done, as a line to show. By PARTUUID, every partition that has it: a
/// boot that carries on must leave no image behind on a clone either
/// (only a ksave header is ever rewritten).
pub fn invalidate(path: Option<PathBuf>, partuuid: Option<String>, reason: Option<String>) -> Result<String> {
    let paths = match partuuid {
        Some(text) => {
            let guid = Guid::try_parse(&text).ok().with_context(|| format!("{text} is not a GUID"))?;
            let found: Vec<PathBuf> = sys::partitions_by_guid(guid)?.into_iter().map(|p| p.device).collect();
            anyhow::ensure!(!found.is_empty(), "no partition with PARTUUID {guid} on this machine");
            found
        }
        None => vec![super::path_or_setup(path)?],
    };
    let lines: Result<Vec<String>> = paths.into_iter().map(|p| invalidate_one(&p, reason.as_deref())).collect();
    Ok(lines?.join("\n"))
}

/// [`invalidate`] of the store at `path`.
fn invalidate_one(path: &std::path::Path, reason: Option<&str>) -> Result<String> {
    let mut file = ImageFile::open(path, true)?;
    // Invalidating what cannot be resumed anyway changes nothing: say so.
    Ok(match file.header() {
        Err(e) => format!("ksave: {}: no image to invalidate ({e:#})", file.description),
        Ok(h) if h.state == State::Invalidated => format!("ksave: {}: image already invalidated ({})", file.description, h.message()),
        Ok(_) => {
            let was = file.invalidate(reason)?;
            let why = reason.map(|r| format!(": {r}")).unwrap_or_default();
            format!("ksave: {}: image {} -> invalidated{why}", file.description, was.name())
        }
    })
}
