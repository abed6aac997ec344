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

/// How a command reaches gateways started with `--tls-cert` and proves who it is to gateways
/// started with `--tokens`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AccessArgs {
    /// File holding this client's token (the `secret` of one `[[token]]` of the gateway's
    /// `--tokens` file). Default: the STAGEFS_TOKEN environment variable; without either, no
    /// token is sent (enough for a gateway without `--tokens`).
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<std::path::PathBuf>,
    /// Connect over TLS, trusting gateway certificates signed by this CA (PEM); for gateways
    /// started with --tls-cert.
    #[arg(long, value_name = "PEM")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// This client's certificate (PEM), for gateways started with --tls-client-ca (mutual TLS).
    #[arg(long, value_name = "PEM", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
}

impl AccessArgs {
    /// The token from `--token-file`, else from `STAGEFS_TOKEN`, else none; TLS from `--tls-*`.
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
        let mut access = match secret {
            Some(secret) => crate::fs::GatewayAccess::default()
                .with_token(&secret)
                .context("the token (--token-file or STAGEFS_TOKEN)")?,
            None => crate::fs::GatewayAccess::default(),
        };
        if let Some(ca) = &self.tls_ca {
            let read = |what: &str, path: &std::path::PathBuf| {
                std::fs::read(path)
                    .with_context(|| format!("cannot read {what} {}", path.display()))
            };
            let ca = read("--tls-ca", ca)?;
            let identity = match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => {
                    Some((read("--tls-cert", cert)?, read("--tls-key", key)?))
                }
                _ => None,
            };
            access = access.with_tls(
                &ca,
                identity
                    .as_ref()
                    .map(|(cert, key)| (cert.as_slice(), key.as_slice())),
            );
        }
        Ok(access)
    }
}
