//! The `sifuse` binary: parse the command line, run, and turn an error into one clear line
//! on stderr and a non-zero exit.

mod cli;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    if let Err(e) = cli::run(cli) {
        eprintln!("sifuse: {e}");
        std::process::exit(1);
    }
}
