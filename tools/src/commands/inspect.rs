//! `ksave inspect`: an image's header, RAM ranges and chunks.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use ksave_format::PAGE;
use ksave_format::chunk::Encoding;
use ksave_format::header::State;
use ksave_tools::inspect;
use serde_json::json;

use super::show;

pub fn run(path: &Path, json: bool, free_runs: Option<&Path>) -> Result<ExitCode> {
    let mut file = super::open_store(Some(path.to_path_buf()), false)?;
    let image = inspect::read(&mut file)?;
    let (mut raw, mut lz4, mut raw_bytes, mut lz4_bytes, mut lz4_pages, mut free_chunks) = (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut runs = Vec::new();
    let complete = image.header.state == State::Complete;
    let walked = if complete {
        let chunk = |c: &ksave_format::chunk::ChunkInfo| match c.encoding {
            Encoding::Raw => {
                raw += 1;
                raw_bytes += c.bytes;
            }
            Encoding::Lz4 => {
                lz4 += 1;
                lz4_bytes += c.bytes;
                lz4_pages += c.pages as u64;
            }
            Encoding::Free => free_chunks += 1,
        };
        inspect::walk(&mut file, &image, inspect::Walk::new(|_, _| {}, |first, n| runs.push((first, n)), chunk)).map_err(|e| format!("{e:#}"))
    } else {
        Err(format!("image is {}", image.header.state.name()))
    };
    // Whether this machine would resume it, by the resume's own verdict.
    let here = image.verdict_here();
    if let Some(out) = free_runs {
        // One run a line: first page frame and pages, in hex and decimal.
        let text: String = runs.iter().map(|(first, n)| format!("{first:#x} {n}\n")).collect();
        std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))?;
    }
    if json {
        let mut v = show::header_json(&image.header);
        v["ram_ranges"] = json!(image.ram.iter().map(|r| [r.start, r.end]).collect::<Vec<_>>());
        v["backup_pairs"] = json!(image.backup.len());
        v["nvs_ranges"] = json!(image.nvs.iter().map(|r| [r.start, r.end]).collect::<Vec<_>>());
        v["chunks_raw"] = json!(raw);
        v["chunks_lz4"] = json!(lz4);
        v["lz4_pages"] = json!(lz4_pages);
        v["lz4_bytes"] = json!(lz4_bytes);
        v["raw_bytes"] = json!(raw_bytes);
        v["chunks_free"] = json!(free_chunks);
        v["free_runs"] = json!(runs.len());
        v["checks"] = json!(walked.as_ref().err().cloned().unwrap_or_else(|| "ok".into()));
        v["encryption"] = json!(image.sealed_note());
        v["refusal_here"] = match here {
            Ok(verdict) => json!(verdict.err().map_or(0, |r| r.code())),
            Err(_) => json!(null),
        };
        println!("{v}");
    } else {
        println!("image        {}", file.description);
        show::print_header(&image.header);
        if let Some(note) = image.sealed_note() {
            println!("encryption   {note}");
        }
        for r in &image.ram {
            println!("RAM          {:#014x}-{:#014x} ({} MiB)", r.start, r.end, (r.end - r.start) >> 20);
        }
        for r in &image.nvs {
            println!("ACPI NVS     {:#014x}-{:#014x} ({} KiB)", r.start, r.end, (r.end - r.start) >> 10);
        }
        println!("backup map   {} pages under ksave, held in source pages", image.backup.len());
        println!(
            "chunks       {raw} raw ({} MiB), {lz4} LZ4 ({} MiB holding {} MiB), {free_chunks} listing {} free runs",
            raw_bytes >> 20,
            lz4_bytes >> 20,
            (lz4_pages * PAGE as u64) >> 20,
            runs.len()
        );
        println!("checks       {}", walked.as_ref().err().cloned().unwrap_or_else(|| "every checksum right".into()));
        match here {
            Ok(Ok(())) => println!("here         resumable (ksave checks again at the resume)"),
            Ok(Err(r)) => println!("here         not resumable: {r} (refusal {})", r.code()),
            Err(e) => println!("here         cannot tell: {e:#}"),
        }
    }
    // A complete image whose checks fail is damaged: say so in the status.
    Ok(if complete && walked.is_err() { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
