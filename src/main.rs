//! The `breakglass` binary: parse the command line, start logging, dispatch.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = breakglass::cli::Cli::parse();
    let _logging = match cli.log_format() {
        Ok(format) => breakglass::logging::init(format),
        Err(err) => {
            eprintln!("breakglass: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    match breakglass::cli::dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("breakglass: {err:#}");
            ExitCode::FAILURE
        }
    }
}
