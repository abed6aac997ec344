//! `stagefs-bench`: the benchmarks' command line (`stagefs bench …` runs this binary with the
//! same arguments). This file is only the shell: parsing, logging setup and the exit code.

use std::io::Write;
use std::process::ExitCode;

use bench::gateway::{self, GatewayBenchArgs};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "stagefs bench",
    bin_name = "stagefs bench",
    version,
    about = "Benchmarks that measure stagefs components against hardware limits and against peers"
)]
enum BenchTarget {
    #[command(about = gateway::ABOUT, long_about = gateway::LONG_ABOUT)]
    Gateway(GatewayBenchArgs),
    #[command(about = bench::fs::ABOUT, long_about = bench::fs::LONG_ABOUT)]
    Fs(bench::fs::FsBenchArgs),
    /// A TCP proxy that adds a round-trip delay (and optional jitter and bandwidth cap), to give a
    /// local S3 server the latency of a cloud object store. Runs until interrupted.
    Proxy(bench::latency_proxy::ProxyArgs),
    #[command(about = bench::meta::ABOUT)]
    Meta(bench::meta::MetaBenchArgs),
    #[command(about = bench::cluster::ABOUT, long_about = bench::cluster::LONG_ABOUT)]
    Cluster(bench::cluster::ClusterBenchArgs),
    #[command(about = bench::mirror::ABOUT, long_about = bench::mirror::LONG_ABOUT)]
    Mirror(bench::mirror::MirrorBenchArgs),
}

fn main() -> ExitCode {
    let target = BenchTarget::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    client::cli::run_to_exit_code(run(target))
}

async fn run(target: BenchTarget) -> anyhow::Result<()> {
    match target {
        BenchTarget::Gateway(args) => {
            let json = args.json;
            let report = gateway::run(args).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.table());
            }
        }
        BenchTarget::Fs(args) => {
            let (json, chart) = (args.json, args.chart.clone());
            let report = bench::fs::run(args).await?;
            if chart.as_os_str() != "none" {
                let title = format!(
                    "stagefs bench fs: store latency {} ms per request",
                    report.store_delay_ms
                );
                match bench::chart::render_png(&title, &report.panels(), &chart) {
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
        BenchTarget::Meta(args) => {
            let json = args.json;
            let report = bench::meta::run(args).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.table());
            }
        }
        BenchTarget::Cluster(args) => {
            let json = args.json;
            let report = bench::cluster::run(args).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.table());
            }
        }
        BenchTarget::Mirror(args) => {
            let json = args.json;
            let report = bench::mirror::run(args).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.table());
            }
        }
        BenchTarget::Proxy(args) => {
            use bench::latency_proxy;
            let listener = latency_proxy::bind(&args).await?;
            println!("listening on {}", listener.local_addr()?);
            std::io::stdout().flush()?;
            latency_proxy::serve(listener, args).await?;
        }
    }
    Ok(())
}
