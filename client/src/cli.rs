//! What the command-line shells (`stagefs`, `stagefs-bench`) share: running a command's future to
//! an exit code.

use std::future::Future;
use std::process::ExitCode;

/// Runs `command` on a multi-threaded runtime; an error is printed (its message carries its
/// cause) and becomes a failing exit code.
pub fn run_to_exit_code(command: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
