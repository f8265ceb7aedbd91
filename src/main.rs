//! The `breakglass` binary: parse the command line, start logging, dispatch.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = breakglass::cli::Cli::parse();
    let _logging = breakglass::logging::init();
    match breakglass::cli::dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("breakglass: {err:#}");
            ExitCode::FAILURE
        }
    }
}
