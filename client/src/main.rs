//! `stagefs`: the stagefs client command.
//!
//! Subcommands: `mount`, `umount`, `status`, `sync`, `uploads`, and `bench`, which runs the
//! `stagefs-bench` binary of the benchmarks' own crate. This file is only the command-line shell:
//! parsing, logging setup and the exit code. The work happens in the `client` library.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    #[command(args_override_self = true)]
    Mount(Box<client::mount::MountArgs>),
    /// Unmount a stagefs mount (open files must be closed first).
    Umount {
        /// The mount point.
        mountpoint: std::path::PathBuf,
        /// First wait until every file below the mount point is in the object store (as
        /// `stagefs sync MOUNTPOINT`, which walks the tree), then unmount.
        #[arg(long)]
        sync: bool,
        /// With --sync: give up (and stay mounted) after this long.
        #[arg(long, value_parser = humantime::parse_duration, requires = "sync")]
        timeout: Option<std::time::Duration>,
        #[command(flatten)]
        access: client::cli::AccessArgs,
    },
    /// Show a gateway's staging state: space, queue, uploads, failures, quarantine.
    Status {
        /// Gateway address (host:port).
        gateway: String,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        access: client::cli::AccessArgs,
    },
    /// Upload every block of these files (directories: all files below) now, whatever the
    /// upload delay, and wait until they are in the object store. Shows what is left, the rate,
    /// and what holds the blocks (paused uploads, a failing store, a dead gateway).
    Sync {
        /// Files or directories inside a stagefs mount.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        paths: Vec<std::path::PathBuf>,
        /// Instead of files: upload everything the gateway at this address holds, now (an admin
        /// token's call when the gateway has --tokens).
        #[arg(long, value_name = "GATEWAY")]
        all: Option<String>,
        /// Give up after this long (e.g. 10m); default: wait as long as it takes.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<std::time::Duration>,
        #[command(flatten)]
        access: client::cli::AccessArgs,
    },
    /// Read every uploaded block of these files (directories: all files below) into the read
    /// cache of the mount's gateway, ahead of a job that reads them: the gateway must keep one
    /// (`stagefs-gateway serve --read-cache SIZE`), and mounts of it then read those blocks
    /// from its device instead of the object store. Blocks not uploaded yet stay where they are
    /// staged. Shows progress, and what was fetched, already there, or not kept.
    Warmup {
        /// Files or directories inside a stagefs mount.
        #[arg(required = true)]
        paths: Vec<std::path::PathBuf>,
        /// One JSON array (one object per mount) instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        access: client::cli::AccessArgs,
    },
    /// Bytes, files and directories below each path, at once: read from the statistics every
    /// directory keeps of its own children (a read per directory below, none per file). Bytes
    /// are file sizes (holes count); a file is counted once, in the directory of the name it was
    /// made or last renamed under.
    Du {
        /// Directories (or files) inside a stagefs mount.
        #[arg(required = true)]
        paths: Vec<std::path::PathBuf>,
        /// One JSON array instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        access: client::cli::AccessArgs,
    },
    /// List the block objects in the object store that no file, pending slice or queued
    /// deletion names (leaks), and with --delete remove them (an admin token's call). Objects
    /// that are not blocks are never touched; the store's prefix must belong to this file
    /// system alone.
    Gc {
        /// Gateway address (host:port).
        gateway: String,
        /// Delete what is found.
        #[arg(long)]
        delete: bool,
        /// Objects younger than this are not judged (they may belong to a write in progress
        /// on a clock that differs).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
        min_age: std::time::Duration,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        access: client::cli::AccessArgs,
    },
    /// Check that every block of every file is staged on a live gateway or in the object
    /// store, and name each file that is not (an admin token's call). Walks the whole tree;
    /// exits non-zero when a block is missing.
    Fsck {
        /// Gateway address (host:port).
        gateway: String,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        access: client::cli::AccessArgs,
    },
    /// Set or show the write policy of a directory tree: `through` makes every file made below
    /// it (at any depth, from then on, on any mount) go to the object store before its close
    /// returns; `gateway` stages (the default); `inherit` removes it.
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
    },
    /// Hold or resume a gateway's uploads to the object store (staging goes on either way).
    Uploads {
        #[arg(value_enum)]
        action: UploadsAction,
        /// Gateway address (host:port).
        gateway: String,
        #[command(flatten)]
        access: client::cli::AccessArgs,
    },
    /// Benchmarks that measure stagefs components against hardware limits and against peers
    /// (gateway, fs, meta, proxy; `stagefs bench --help`). Runs `stagefs-bench`, found next to
    /// this program or on PATH.
    #[command(disable_help_flag = true)]
    Bench {
        /// What `stagefs-bench` gets: the benchmark and its options.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<OsString>,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyAction {
    /// Set the policy of PATH and of every directory below it.
    Set {
        /// A directory (or file) inside a stagefs mount.
        path: std::path::PathBuf,
        #[arg(value_enum)]
        policy: client::policy::Policy,
    },
    /// Print the policy of PATH: through, gateway, or inherit (none of its own).
    Get {
        /// A directory or file inside a stagefs mount.
        path: std::path::PathBuf,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum UploadsAction {
    Pause,
    Resume,
}

fn main() -> ExitCode {
    let argv = match shared::config::expand(std::env::args_os().collect(), "mount") {
        Ok(argv) => argv,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(argv);
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
        Command::Bench { args } => return run_bench(args),
        Command::Mount(args) => Some(client::mount::mount(*args)),
        Command::Umount {
            mountpoint,
            sync: false,
            ..
        } => Some(client::mount::umount(&mountpoint)),
        Command::Policy {
            action: PolicyAction::Set { path, policy },
        } => Some(client::policy::set(&path, policy)),
        Command::Policy {
            action: PolicyAction::Get { path },
        } => Some(client::policy::get(&path)),
        other => {
            return client::cli::run_to_exit_code(run(Cli { command: other }));
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

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Uploads {
            action,
            gateway,
            access,
        } => {
            client::admin::set_uploads_paused(
                &gateway,
                &access.access()?,
                matches!(action, UploadsAction::Pause),
            )
            .await?
        }
        Command::Status {
            gateway,
            json,
            access,
        } => client::admin::status(&gateway, &access.access()?, json).await?,
        Command::Sync {
            paths,
            all: None,
            timeout,
            access,
        } => client::admin::sync(&paths, &access.access()?, timeout).await?,
        Command::Sync {
            all: Some(gateway),
            timeout,
            access,
            ..
        } => client::admin::sync_all(&gateway, &access.access()?, timeout).await?,
        Command::Umount {
            mountpoint,
            sync: true,
            timeout,
            access,
        } => {
            client::admin::sync(
                std::slice::from_ref(&mountpoint),
                &access.access()?,
                timeout,
            )
            .await?;
            client::mount::umount(&mountpoint)?;
        }
        Command::Gc {
            gateway,
            delete,
            min_age,
            json,
            access,
        } => client::admin::gc(&gateway, &access.access()?, delete, min_age, json).await?,
        Command::Du {
            paths,
            json,
            access,
        } => client::admin::du(&paths, &access.access()?, json).await?,
        Command::Warmup {
            paths,
            json,
            access,
        } => client::admin::warmup(&paths, &access.access()?, json).await?,
        Command::Fsck {
            gateway,
            json,
            access,
        } => client::admin::fsck(&gateway, &access.access()?, json).await?,
        Command::Mount(_)
        | Command::Umount { .. }
        | Command::Bench { .. }
        | Command::Policy { .. } => {
            unreachable!("mount, umount, policy and bench run outside the async runtime (see main)")
        }
    }
    Ok(())
}

/// The benchmarks' program: next to this one (as cargo builds and installs them), else on PATH.
const BENCH_PROGRAM: &str = "stagefs-bench";

/// `stagefs bench ARGS`: replaces this process with `stagefs-bench ARGS`.
fn run_bench(args: Vec<OsString>) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(BENCH_PROGRAM)))
        .filter(|path| path.is_file());
    let program = beside.map_or_else(|| BENCH_PROGRAM.into(), |path| path.into_os_string());
    let error = std::process::Command::new(&program).args(&args).exec();
    eprintln!(
        "stagefs: cannot run {}: {error} (build it with `cargo build --release --bins`; it is \
         installed next to stagefs)",
        program.to_string_lossy()
    );
    ExitCode::FAILURE
}
