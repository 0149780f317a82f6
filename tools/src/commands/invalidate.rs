//! `ksave invalidate`: mark an image as never to be restored.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use diskdrv::part::Guid;
use ksave_format::header::State;
use ksave_tools::imagefile::ImageFile;
use ksave_tools::setup::Setup;
use ksave_tools::sys;

pub fn run(path: Option<PathBuf>, partuuid: Option<String>, reason: Option<String>) -> Result<ExitCode> {
    println!("{}", invalidate(path, partuuid, None, None, reason)?);
    Ok(ExitCode::SUCCESS)
}

/// Invalidates the image, if there is one to invalidate; returns what was
/// done, as a line to show. By PARTUUID, every partition that has it: a
/// boot that carries on must leave no image behind on a clone either
/// (only a ksave header is ever rewritten).
pub fn invalidate(path: Option<PathBuf>, partuuid: Option<String>, file_at: Option<u64>, key: Option<ksave_tools::setup::KeyVolume>, reason: Option<String>) -> Result<String> {
    let stores = match partuuid {
        Some(text) => {
            let guid = Guid::try_parse(&text).ok().with_context(|| format!("{text} is not a GUID"))?;
            let found: Vec<PathBuf> = sys::partitions_by_guid(guid)?.into_iter().map(|p| p.device).collect();
            anyhow::ensure!(!found.is_empty(), "no partition with PARTUUID {guid} on this machine");
            // A file store in that partition is found by the setup's map.
            // (or by the offset given, with no setup).
            let file = Setup::load(&ksave_tools::setup::path()).ok().filter(|s| s.guid == guid).and_then(|s| s.file);
            let open = |dev: &PathBuf| match (file_at, &file) {
                (Some(offset), _) => ImageFile::open_file_map(dev, offset, true).map(|(f, _)| f),
                (None, Some(store)) => ImageFile::open_file_store(dev, store, true),
                (None, None) => ImageFile::open(dev, true),
            };
            found.iter().map(|dev| open(dev).with_context(|| format!("{}", dev.display()))).collect()
        }
        None => vec![super::open_store(path, true)],
    };
    // Every store that opens is invalidated, whatever another one does;
    // then the first failure is the answer.
    let mut lines = Vec::new();
    let mut failed = None;
    let mut claims = Vec::new();
    for store in stores {
        match store.and_then(|mut f| {
            claims.extend(f.header().ok().map(|h| h.claim.id));
            invalidate_one(f, reason.as_deref())
        }) {
            Ok(line) => lines.push(line),
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    // An encrypted store's key block goes too, when its volume is unlocked
    // and it holds that store's key: not even the passphrase opens the
    // image afterwards.
    let key = key.or_else(|| Setup::load(&ksave_tools::setup::path()).ok().and_then(|s| s.file?.key));
    if let (Some(volume), Some(claim)) = (&key, claims.first()) {
        lines.push(super::forget_key(volume, *claim));
    }
    match failed {
        Some(e) if lines.is_empty() => Err(e),
        Some(e) => Err(e.context(lines.join("\n"))),
        None => Ok(lines.join("\n")),
    }
}

/// [`invalidate`] of the store open in `file`.
fn invalidate_one(mut file: ImageFile, reason: Option<&str>) -> Result<String> {
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
