//! `ksave`: the host side of kexec-jump hibernation. The arguments are in
//! [`cli`], one module a command in [`commands`], the logic they share in
//! the `ksave_tools` library.

use std::process::ExitCode;

use clap::Parser;

mod cli;
mod commands;

fn main() -> ExitCode {
    match commands::run(cli::Cli::parse().command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ksave: {e:#}");
            ExitCode::FAILURE
        }
    }
}
