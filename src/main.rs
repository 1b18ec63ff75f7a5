//! The `sifuse` binary: parse the command line, carry it out, and turn how it ended into
//! the exit status (and a failure into one clear line on stderr). The only place the
//! process exits.

#![deny(clippy::undocumented_unsafe_blocks)]

mod cli;

use clap::Parser;

use cli::Exit;

/// The exit status for `exit`, printing a failure after `program`'s name.
fn exit_status(program: &str, exit: Exit) -> i32 {
    match exit {
        Exit::Done => 0,
        Exit::Served(ending) if ending.is_success() => 0,
        // The launcher, or the log, was told why.
        Exit::Served(_) => 1,
        Exit::Status(status) => status,
        Exit::Failed { message, status } => {
            eprintln!("{program}: {message}");
            status
        }
    }
}

fn main() {
    let mut args = std::env::args_os();
    let status = match args.next().as_deref().and_then(cli::compat::compat_name) {
        Some(name) => {
            let rest: Vec<_> = args.collect();
            exit_status(name, cli::compat::main(name, &rest))
        }
        None => exit_status("sifuse", cli::dispatch(cli::Cli::parse())),
    };
    std::process::exit(status);
}
