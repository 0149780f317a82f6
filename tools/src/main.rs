//! `ksave`: the host side of kexec-jump hibernation. The arguments are in
//! [`cli`], one module a command in [`commands`], the logic they share in
//! the `ksave_tools` library.

use std::process::ExitCode;

use clap::Parser;

mod cli;
mod commands;

fn main() -> ExitCode {
    // A closed pipe (`ksave inspect DEV | head -1`) ends the program
    // quietly, as it does any Unix filter, instead of a panic in println!.
    // SAFETY: signal(2) with SIG_DFL installs no handler; nothing else in
    // the process has set one for SIGPIPE (Rust's runtime sets SIG_IGN).
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    match commands::run(cli::Cli::parse().command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ksave: {e:#}");
            if denied(&e) {
                eprintln!("ksave: (it reads and writes disks, kernel memory maps and kexec: run it as root)");
            }
            ExitCode::FAILURE
        }
    }
}

/// The error is a permission denied to a user who is not root.
fn denied(e: &anyhow::Error) -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    !root && e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied))
}
