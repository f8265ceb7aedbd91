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
            // The terminal client's commands say how they failed (README "The terminal client").
            err.downcast_ref::<breakglass::client::ClientError>()
                .map_or(ExitCode::FAILURE, |err| ExitCode::from(err.exit_code()))
        }
    }
}
