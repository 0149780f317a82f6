//! How an image header is shown: as text, or as JSON for scripts and the
//! test harness.

use ksave_format::header::{CR4_NEEDED, DATA_OFFSET, FLAG_FREE_AS_FOUND, FLAG_LZ4, FLAG_RESUME_ATTEMPTED, Header, State};
use serde_json::json;

/// The header as JSON.
pub fn header_json(h: &Header) -> serde_json::Value {
    json!({
        "state": h.state.name(),
        "nonce": format!("{:#018x}", h.nonce),
        "created_unix": h.created_unix,
        "pages_stored": h.pages_stored,
        "pages_zero": h.pages_zero,
        "pages_free": h.pages_free,
        "free_rule": h.free_rule,
        "free_as_found": h.flags & FLAG_FREE_AS_FOUND != 0,
        "chunks": h.chunks,
        "bytes": h.data_bytes.saturating_add(DATA_OFFSET),
        "save_us": h.save_us,
        "lz4": h.flags & FLAG_LZ4 != 0,
        "sealed": h.sealed(),
        "ksave_range": [h.image.start, h.image.end],
        "reentry": format!("{:#x}", h.reentry),
        "cpu_vendor": String::from_utf8_lossy(&h.cpu_vendor).trim_end_matches('\0').to_string(),
        "fail_code": h.fail_code,
        "message": h.message(),
        "needs_la57": h.cr4_needed & CR4_NEEDED != 0,
        "return_gdt": format!("{:#x}", h.return_gdt.0),
        "acpi_hardware_signature": h.facs_signature.map(|s| format!("{s:#x}")),
        "resume_attempted": h.flags & FLAG_RESUME_ATTEMPTED != 0,
    })
}

/// The header as text, a field a line.
pub fn print_header(h: &Header) {
    println!("state        {}", h.state.name());
    println!("nonce        {:#018x}", h.nonce);
    println!("created      {} (unix)", h.created_unix);
    println!("message      {}", h.message());
    if h.state == State::Complete || h.state == State::Invalidated {
        println!("pages        {} stored, {} left out as zero, {} left out as free", h.pages_stored, h.pages_zero, h.pages_free);
        println!("free pages   {}", freepages::vmcoreinfo::Rule::describe(h.free_rule));
        if h.pages_free > 0 {
            println!(
                "             {}",
                if h.flags & FLAG_FREE_AS_FOUND != 0 { "left as found by a resume (the kernel relies on nothing in them)" } else { "zeroed by a resume" }
            );
        }
        println!("size         {} MiB in {} chunks{}", (h.data_bytes.saturating_add(DATA_OFFSET)) >> 20, h.chunks, if h.flags & FLAG_LZ4 != 0 { ", some LZ4" } else { "" });
        println!("sealed       {}", if h.sealed() { "yes: encrypted and authenticated (AES-256-GCM) under the key in the store's key block" } else { "no (plaintext)" });
        println!("saved in     {} ms", h.save_us / 1000);
        println!("ksave range  {:#x}-{:#x}, re-entry {:#x}", h.image.start, h.image.end, h.reentry);
        println!("CPU          {}", String::from_utf8_lossy(&h.cpu_vendor).trim_end_matches('\0'));
        println!("paging       {}", if h.cr4_needed & CR4_NEEDED != 0 { "5-level (needs LA57)" } else { "4-level" });
        match h.return_gdt.0 {
            0 => println!("return GDT   none (the kernel reloads its own)"),
            va => println!("return GDT   {va:#x} (the kernel's own, loaded before going back)"),
        }
        match h.facs_signature {
            Some(s) => println!("ACPI hw sig  {s:#x} (a boot with another is refused)"),
            None => println!("ACPI hw sig  not known when saved"),
        }
        for fs in h.filesystems() {
            println!("file system  ext4 {}: {} mounts, last at {} (mounted since: refused)", fs.id(), fs.mounts, fs.mounted_at);
        }
    }
}
