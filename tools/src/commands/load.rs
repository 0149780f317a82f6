//! `ksave load`: configure ksave.elf for one attempt and load it for a jump.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ksave_format::config::Config;
use ksave_format::seal::{DataKey, KEY_LEN, KeyBlock};
use zeroize::Zeroizing;
use ksave_tools::freeze::say;
use ksave_tools::elfimage::ImageLayout;
use ksave_tools::load;
use ksave_tools::mailbox::MailboxPage;
use ksave_tools::setup::{self, Setup};

pub fn run(kexec_tools: bool) -> Result<ExitCode> {
    if let Some(why) = ksave_tools::sys::lockdown() {
        anyhow::bail!("{why}");
    }
    let setup = Setup::load(&setup::path())?;
    // A `kexec -e` by hand would save: a file store must still be where its
    // map says (ksave cannot tell a moved file's old blocks from its own).
    if setup.file.is_some() {
        super::check_store(&setup)?;
    }
    // A kernel that poisons free pages gets them saved (as hibernate does).
    let loaded = load_ksave(&setup, kexec_tools, false, ksave_tools::sys::page_poisoning(), false)?;
    println!("ksave: loaded for nonce {:#018x}; the kernel holds about {} KiB for it until it is unloaded", loaded.config.nonce, loaded.held_kib);
    Ok(ExitCode::SUCCESS)
}

/// A ksave loaded for one attempt.
pub struct Loaded {
    /// Where ksave leaves its reason if the partition fails (None if the
    /// page could not be set up: the partition record still tells).
    pub mailbox: Option<MailboxPage>,
    /// Its config (the attempt's nonce).
    pub config: Config,
    /// How long configuring and loading took.
    pub took: Duration,
    /// KiB of memory the kernel holds for it.
    pub held_kib: u64,
}

/// Configures and loads ksave for one attempt.
pub fn load_ksave(setup: &Setup, kexec_tools: bool, selftest_fault_in_save: bool, all_pages: bool, one_cpu: bool) -> Result<Loaded> {
    let t = Instant::now();
    let mut config = load::attempt_config(setup)?;
    config.selftest_fault_in_save = selftest_fault_in_save;
    config.one_cpu = one_cpu;
    if all_pages {
        config.vmcoreinfo = ksave_format::Range::default();
    }
    let mailbox = match MailboxPage::new(config.nonce) {
        Ok(m) => Some(m),
        Err(e) => {
            say(&format!("ksave: no mailbox for ksave's reasons ({e:#}); the partition's record still tells"));
            None
        }
    };
    config.mailbox = mailbox.as_ref().map_or(0, MailboxPage::phys);
    // An encrypted store: a fresh key for this image, kept on disk only in
    // the key block, through the volume's own encryption; ksave gets it in
    // its config (RAM only) and wipes it there when done.
    if let Some(volume) = setup.file.as_ref().and_then(|f| f.key.as_ref()) {
        // The key in this process's memory never goes to swap, nor into a
        // core dump.
        // SAFETY: mlockall and prctl take no memory arguments.
        unsafe {
            libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE);
            libc::prctl(libc::PR_SET_DUMPABLE, 0);
        }
        let key = ksave_tools::keyblock::fresh_key()?;
        ksave_tools::keyblock::write(volume, &KeyBlock { claim_id: setup.claim.id, nonce: config.nonce, key: key.clone() })?;
        config.data_key = Some(key);
    }
    let elf = std::fs::read(&setup.elf).with_context(|| format!("reading {}", setup.elf.display()))?;
    // The configured image is wiped when dropped (it holds the key); the
    // config keeps only that there is one.
    let configured = Zeroizing::new(load::configure(&elf, &config)?);
    config.data_key = config.data_key.take().map(|_| DataKey([0; KEY_LEN]));
    let prepared = t.elapsed();
    let layout = ImageLayout::parse(&configured)?;
    if kexec_tools {
        let path = Path::new("/run/ksave/ksave.elf");
        std::fs::create_dir_all(path.parent().unwrap())?;
        std::fs::write(path, &configured[..])?;
        let cmd = load::kexec_tools_command(path, &layout);
        say(&format!("ksave: {}", cmd.join(" ")));
        let loaded = load::run_kexec_tools(&cmd);
        // The file holds the configured ksave, a sealed image's key too:
        // overwritten where it lies (not truncated: its pages would go back
        // to tmpfs as they are), then removed.
        if let Ok(file) = std::fs::OpenOptions::new().write(true).open(path) {
            use std::os::unix::fs::FileExt;
            let _ = file.write_all_at(&vec![0u8; configured.len()], 0);
            let _ = file.sync_all();
        }
        let _ = std::fs::remove_file(path);
        loaded?;
    } else {
        load::load_with_syscall(&configured[..])?;
    }
    let ram: u64 = config.ram().iter().map(|r| r.end - r.start).sum();
    let held_kib = load::held_bytes(&layout, ram) / 1024;
    say(&format!("ksave: prepared the image in {} ms, kexec load took {} ms", prepared.as_millis(), (t.elapsed() - prepared).as_millis()));
    Ok(Loaded { mailbox, config, took: t.elapsed(), held_kib })
}
