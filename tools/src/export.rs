//! `ksave export --elf`: the saved RAM as an ELF64 core file, one PT_LOAD a
//! RAM range at its physical address, so readelf, gdb and crash tools can
//! read the caller's memory.

use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use ksave_format::PAGE;
use ksave_format::header::State;

use crate::imagefile::ImageFile;
use crate::inspect;

const EHDR: u64 = 64;
const PHDR: u64 = 56;

/// Writes the core file; returns (pages written, bytes of the file).
pub fn export(file: &mut ImageFile, out: &Path) -> Result<(u64, u64)> {
    let image = inspect::read(file)?;
    ensure!(image.header.state == State::Complete, "the image is {}, not complete: nothing to export", image.header.state.name());
    let n = image.ram.len() as u64;
    let mut offsets = Vec::new();
    let mut at = (EHDR + PHDR * n).next_multiple_of(PAGE as u64);
    for r in &image.ram {
        offsets.push(at);
        at += r.end - r.start;
    }
    // Read back too: the backup map moves pages within the file.
    let core = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(out).with_context(|| format!("creating {}", out.display()))?;
    core.set_len(at)?; // sparse: zero pages cost nothing
    let mut head = vec![0u8; (EHDR + PHDR * n) as usize];
    head[0..4].copy_from_slice(b"\x7fELF");
    head[4] = 2; // ELFCLASS64
    head[5] = 1; // little endian
    head[6] = 1; // EV_CURRENT
    head[16..18].copy_from_slice(&4u16.to_le_bytes()); // ET_CORE
    head[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    head[20..24].copy_from_slice(&1u32.to_le_bytes());
    head[32..40].copy_from_slice(&EHDR.to_le_bytes()); // e_phoff
    head[52..54].copy_from_slice(&(EHDR as u16).to_le_bytes());
    head[54..56].copy_from_slice(&(PHDR as u16).to_le_bytes());
    head[56..58].copy_from_slice(&(n as u16).to_le_bytes());
    for (i, (r, off)) in image.ram.iter().zip(&offsets).enumerate() {
        let p = &mut head[(EHDR + PHDR * i as u64) as usize..(EHDR + PHDR * (i as u64 + 1)) as usize];
        p[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        p[4..8].copy_from_slice(&6u32.to_le_bytes()); // RW
        p[8..16].copy_from_slice(&off.to_le_bytes());
        p[16..24].copy_from_slice(&r.start.to_le_bytes()); // vaddr = paddr
        p[24..32].copy_from_slice(&r.start.to_le_bytes());
        p[32..40].copy_from_slice(&(r.end - r.start).to_le_bytes());
        p[40..48].copy_from_slice(&(r.end - r.start).to_le_bytes());
        p[48..56].copy_from_slice(&(PAGE as u64).to_le_bytes());
    }
    core.write_all_at(&head, 0)?;
    let file_offset = |addr: u64| image.ram.iter().zip(&offsets).find(|(r, _)| r.contains(addr)).map(|(r, off)| off + addr - r.start);
    let mut pages = 0;
    let mut error = None;
    inspect::walk(
        file,
        &image,
        |pfn, data| {
            let at = file_offset(pfn * PAGE as u64).expect("reader checked pages lie in RAM ranges");
            if let Err(e) = core.write_all_at(data, at) {
                error.get_or_insert(e);
            }
            pages += 1;
        },
        |_| {},
    )?;
    if let Some(e) = error {
        return Err(e).context("writing the core file");
    }
    // The pages under ksave: the caller's data was in their backup source
    // pages when saved, so show it where the caller had it.
    let mut page = vec![0u8; PAGE];
    for pair in &image.backup {
        let (Some(src), Some(dest)) = (file_offset(pair.src), file_offset(pair.dest)) else { continue };
        core.read_exact_at(&mut page, src)?;
        core.write_all_at(&page, dest)?;
    }
    core.sync_all()?;
    Ok((pages, at))
}
