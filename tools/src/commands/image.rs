//! `ksave image`: a ksave.elf's load range, footprint and the kexec
//! arguments that load it.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use ksave_tools::elfimage::ImageLayout;

pub fn run(elf: &Path, kexec_args: bool) -> Result<ExitCode> {
    let data = std::fs::read(elf).with_context(|| format!("reading {}", elf.display()))?;
    let layout = ImageLayout::parse(&data).with_context(|| format!("{} is not a ksave image", elf.display()))?;
    let [min, max] = layout.kexec_range_args();
    if kexec_args {
        println!("{min} {max}");
    } else {
        println!("load range   {:#x}..{:#x}", layout.start, layout.end);
        println!("footprint    {} KiB ({} KiB from the file)", layout.footprint() / 1024, layout.file_size.div_ceil(1024));
        println!("entry        {:#x}", layout.entry);
        println!("kexec load   kexec -t elf-x86_64 --load-preserve-context --args-none {min} {max} {}", elf.display());
        println!("ksave-metric footprint_kib={}", layout.footprint() / 1024);
    }
    Ok(ExitCode::SUCCESS)
}
