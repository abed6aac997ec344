//! `stagefs`: the stagefs client command.
//!
//! Subcommands: `mount`, `umount`, `status`, `sync`, `uploads`, `bench gateway`. This file is
//! only the command-line shell: parsing, logging setup and the exit code. The work happens in
//! the `client` library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use client::bench::gateway::{self, GatewayBenchArgs};

#[derive(Debug, Parser)]
#[command(
    name = "stagefs",
    version,
    about = "stagefs client: mount a stagefs file system, unmount it, benchmark the gateway",
    long_about = "stagefs client.\n\nstagefs stages file system writes on a gateway's shared block \
                  device and drains them to an object store. This command is the client side: \
                  mount the file system a gateway serves (`stagefs mount GATEWAY DIR`), wait for \
                  files to reach the object store (`stagefs sync PATH`), watch a gateway \
                  (`stagefs status GATEWAY`), and benchmark it (`stagefs bench gateway`)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Mount a stagefs file system served by GATEWAY on MOUNTPOINT.
    Mount(client::mount::MountArgs),
    /// Unmount a stagefs mount (open files must be closed first).
    Umount {
        /// The mount point.
        mountpoint: std::path::PathBuf,
    },
    /// Show a gateway's staging state: space, queue, uploads, failures, quarantine.
    Status {
        /// Gateway address (host:port).
        gateway: String,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Wait until every block of these files (directories: all files below) is in the object
    /// store; shows progress on a terminal.
    Sync {
        /// Files or directories inside a stagefs mount.
        #[arg(required = true)]
        paths: Vec<std::path::PathBuf>,
        /// Give up after this long (e.g. 10m); default: wait as long as it takes.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<std::time::Duration>,
    },
    /// Hold or resume a gateway's uploads to the object store (staging goes on either way).
    Uploads {
        #[arg(value_enum)]
        action: UploadsAction,
        /// Gateway address (host:port).
        gateway: String,
    },
    /// Benchmarks that measure stagefs components against hardware limits.
    Bench {
        #[command(subcommand)]
        target: BenchTarget,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum UploadsAction {
    Pause,
    Resume,
}

#[derive(Debug, Subcommand)]
enum BenchTarget {
    #[command(about = gateway::ABOUT, long_about = gateway::LONG_ABOUT)]
    Gateway(GatewayBenchArgs),
    /// A TCP proxy that adds a round-trip delay (and optional jitter and bandwidth cap), to give a
    /// local S3 server the latency of a cloud object store. Runs until interrupted.
    #[command(about = client::bench::fs::ABOUT, long_about = client::bench::fs::LONG_ABOUT)]
    Fs(client::bench::fs::FsBenchArgs),
    Proxy(client::bench::latency_proxy::ProxyArgs),
    #[command(about = client::bench::meta::ABOUT)]
    Meta(client::bench::meta::MetaBenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Mount(_)) {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .init();
    // These run outside any async runtime: a background mount forks before starting threads.
    let direct = match cli.command {
        Command::Mount(args) => Some(client::mount::mount(args)),
        Command::Umount { mountpoint } => Some(client::mount::umount(&mountpoint)),
        other => {
            return run_async(Cli { command: other });
        }
    };
    match direct {
        Some(Ok(())) | None => ExitCode::SUCCESS,
        Some(Err(e)) => {
            eprintln!("stagefs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_async(cli: Cli) -> ExitCode {
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
        Command::Bench {
            target: BenchTarget::Fs(args),
        } => {
            let (json, chart) = (args.json, args.chart.clone());
            let report = client::bench::fs::run(args).await?;
            if chart.as_os_str() != "none" {
                let title = format!(
                    "stagefs bench fs: store latency {} ms per request",
                    report.store_delay_ms
                );
                match client::bench::chart::render_png(&title, &report.panels(), &chart) {
                    Ok(()) => eprintln!("[bench] chart: {}", chart.display()),
                    Err(e) => eprintln!("[bench] no chart ({}): {e}", chart.display()),
                }
            }
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.table());
            }
        }
        Command::Bench {
            target: BenchTarget::Meta(args),
        } => {
            let json = args.json;
            let report = client::bench::meta::run(args).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.table());
            }
        }
        Command::Bench {
            target: BenchTarget::Proxy(args),
        } => {
            use client::bench::latency_proxy;
            let listener = latency_proxy::bind(&args).await?;
            println!("listening on {}", listener.local_addr()?);
            use std::io::Write;
            std::io::stdout().flush()?;
            latency_proxy::serve(listener, args).await?;
        }
        Command::Uploads { action, gateway } => {
            client::admin::set_uploads_paused(&gateway, matches!(action, UploadsAction::Pause))
                .await?
        }
        Command::Status { gateway, json } => client::admin::status(&gateway, json).await?,
        Command::Sync { paths, timeout } => client::admin::sync(&paths, timeout).await?,
        Command::Mount(_) | Command::Umount { .. } => {
            unreachable!("mount and umount run outside the async runtime (see main)")
        }
    }
    Ok(())
}
