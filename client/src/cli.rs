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

/// How a command proves who it is to gateways started with `--tokens`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AccessArgs {
    /// File holding this client's token (the `secret` of one `[[token]]` of the gateway's
    /// `--tokens` file). Default: the STAGEFS_TOKEN environment variable; without either, no
    /// token is sent (enough for a gateway without `--tokens`).
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<std::path::PathBuf>,
}

impl AccessArgs {
    /// The token from `--token-file`, else from `STAGEFS_TOKEN`, else none.
    pub fn access(&self) -> anyhow::Result<crate::fs::GatewayAccess> {
        use anyhow::Context;
        let secret = match &self.token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --token-file {}", path.display()))?,
            ),
            None => std::env::var("STAGEFS_TOKEN")
                .ok()
                .filter(|token| !token.trim().is_empty()),
        };
        match secret {
            Some(secret) => Ok(crate::fs::GatewayAccess::with_token(&secret)
                .context("the token (--token-file or STAGEFS_TOKEN)")?),
            None => Ok(crate::fs::GatewayAccess::default()),
        }
    }
}
