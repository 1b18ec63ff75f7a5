//! The `sifuse` binary: parse the command line, run, and turn an error into one clear line
//! on stderr and a non-zero exit.

mod cli;

use clap::Parser;

fn main() {
    let mut args = std::env::args_os();
    if let Some(name) = args.next().as_deref().and_then(cli::compat::compat_name) {
        let rest: Vec<_> = args.collect();
        std::process::exit(cli::compat::main(name, &rest));
    }
    let cli = cli::Cli::parse();
    if let Err(e) = cli::run(cli) {
        eprintln!("sifuse: {e}");
        std::process::exit(1);
    }
}
