//! The `causeway` binary: parses the command line and runs one command.

use std::process::ExitCode;

fn main() -> ExitCode {
    causeway::cli::main()
}
