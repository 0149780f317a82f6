//! `ksave export --elf`: the saved memory as an ELF64 core file, one
//! PT_LOAD a RAM or ACPI NVS range at its physical address, so readelf, gdb
//! and crash tools can read the caller's memory.

use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use ksave_format::PAGE;
use ksave_format::header::State;

use crate::elfimage::{elf_headers, headers_len, load_header};
use crate::imagefile::ImageFile;
use crate::inspect;

/// Writes the core file, mode 0600 whatever the umask (it holds all of
/// the saved RAM), refusing an existing one unless `overwrite`; returns
/// (pages written, bytes of the file).
pub fn export(file: &mut ImageFile, out: &Path, overwrite: bool) -> Result<(u64, u64)> {
    let image = inspect::read(file)?;
    ensure!(image.header.state == State::Complete, "the image is {}, not complete: nothing to export", image.header.state.name());
    let ranges = image.saved_ranges();
    let mut offsets = Vec::new();
    let mut at = headers_len(ranges.len()).next_multiple_of(PAGE as u64);
    for r in &ranges {
        offsets.push(at);
        at += r.end - r.start;
    }
    // Read back too: the backup map moves pages within the file.
    let core = create_private(out, overwrite)?;
    core.set_len(at)?; // sparse: zero pages cost nothing
    let loads: Vec<_> = ranges.iter().zip(&offsets).map(|(r, off)| load_header(*off, r.start, r.end - r.start, r.end - r.start)).collect();
    let head = elf_headers(object::elf::ET_CORE, 0, &loads)?;
    core.write_all_at(&head, 0)?;
    let file_offset = |addr: u64| ranges.iter().zip(&offsets).find(|(r, _)| r.contains(addr)).map(|(r, off)| off + addr - r.start);
    let mut pages = 0;
    let mut error = None;
    let page = |pfn: u64, data: &[u8; PAGE]| {
        let at = file_offset(pfn * PAGE as u64).expect("reader checked pages lie in saved ranges");
        if let Err(e) = core.write_all_at(data, at) {
            error.get_or_insert(e);
        }
        pages += 1;
    };
    inspect::walk(file, &image, inspect::Walk::new(page, |_, _| {}, |_| {}))?;
    if let Some(e) = error {
        return Err(e).context("writing the core file");
    }
    // The pages under ksave: the caller's data was in their backup source
    // pages when saved, so show it where the caller had it.
    let mut page = vec![0u8; PAGE];
    for pair in &image.backup {
        let (Some(src), Some(dest)) = (file_offset(pair.src), file_offset(pair.dest)) else {
            continue;
        };
        core.read_exact_at(&mut page, src)?;
        core.write_all_at(&page, dest)?;
    }
    core.sync_all()?;
    Ok((pages, at))
}

/// Creates `path` for the owner alone (0600), or truncates it if it exists
/// and `overwrite`, making it 0600 too.
fn create_private(path: &Path, overwrite: bool) -> Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).mode(0o600);
    if overwrite {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let file = options.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => anyhow::anyhow!("{} exists: give --force to overwrite it", path.display()),
        _ => anyhow::Error::new(e).context(format!("creating {}", path.display())),
    })?;
    // An existing file keeps its mode through open(2).
    file.set_permissions(std::fs::Permissions::from_mode(0o600)).with_context(|| format!("making {} private", path.display()))?;
    Ok(file)
}
