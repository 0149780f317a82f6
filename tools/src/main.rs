//! `ksave`: the host side of kexec-jump hibernation.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ksave_tools::elfimage::ImageLayout;

#[derive(Parser)]
#[command(name = "ksave", version, about = "kexec-jump hibernation: prepare, load and inspect ksave images")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a ksave image's load range, footprint and the kexec arguments that load it.
    Image {
        /// Path to ksave.elf.
        elf: PathBuf,
        /// Print only the kexec range arguments, for scripts.
        #[arg(long)]
        kexec_args: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Image { elf, kexec_args } => {
            let data = std::fs::read(&elf).with_context(|| format!("reading {}", elf.display()))?;
            let layout = ImageLayout::parse(&data).with_context(|| format!("{} is not a ksave image", elf.display()))?;
            let [min, max] = layout.kexec_range_args();
            if kexec_args {
                println!("{min} {max}");
            } else {
                println!("load range   {:#x}..{:#x}", layout.start, layout.end);
                println!("footprint    {} KiB ({} KiB from the file)", layout.footprint() / 1024, layout.file_size.div_ceil(1024));
                println!("entry        {:#x}", layout.entry);
                println!("kexec load   kexec -t elf-x86_64 --load-preserve-context --args-none {min} {max} {}", elf.display());
            }
        }
    }
    Ok(())
}
