//! `stagefs`: the stagefs client command.
//!
//! Subcommands: `bench gateway` today; `mount`, `status` and `sync` join them later. This file is
//! only the command-line shell: parsing, logging setup and the exit code. The work happens in
//! the `client` library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use client::bench::gateway::{self, GatewayBenchArgs};

#[derive(Debug, Parser)]
#[command(
    name = "stagefs",
    version,
    about = "stagefs client: benchmarks now; mount, status and sync to come",
    long_about = "stagefs client.\n\nstagefs stages file system writes on a gateway's shared block \
                  device and drains them to an object store. This command runs the client side: \
                  today the benchmarks (`stagefs bench gateway`)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Benchmarks that measure stagefs components against hardware limits.
    Bench {
        #[command(subcommand)]
        target: BenchTarget,
    },
}

#[derive(Debug, Subcommand)]
enum BenchTarget {
    #[command(about = gateway::ABOUT, long_about = gateway::LONG_ABOUT)]
    Gateway(GatewayBenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
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
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Benchmark errors carry their cause in their message already.
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Bench {
            target: BenchTarget::Gateway(args),
        } => {
            let json = args.json;
            let report = gateway::run(args).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.table());
            }
        }
    }
    Ok(())
}
