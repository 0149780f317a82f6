//! `elf2efi KSAVE_ELF KSAVE_EFI`: writes ksave.efi, ksave.elf in a PE32+
//! file for UEFI firmware (ksave_tools::efiimage).
use anyhow::{Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [elf, efi] = args.as_slice() else { anyhow::bail!("usage: elf2efi KSAVE_ELF KSAVE_EFI") };
    let data = std::fs::read(elf).with_context(|| format!("reading {elf}"))?;
    let out = ksave_tools::efiimage::from_elf(&data).with_context(|| elf.clone())?;
    std::fs::write(efi, out).with_context(|| format!("writing {efi}"))
}
