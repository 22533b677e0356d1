//! `qvol`: the administration tool (DESIGN.md, "Command-line contract").
//!
//! Each subcommand lives in its own module with a `run` function; this file only parses
//! and reports. Exit status: 0 on success, 1 on a user-facing error (one sentence on
//! stderr), 2 on a usage error (clap's own).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "qvol", version, about = "Manage post-quantum encrypted .qvol volumes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {}
}
