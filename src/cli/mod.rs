//! The `easel` command line: the clap types of every subcommand, and [`run`], which
//! dispatches each to its file: `serve` ([`serve`]), `token` ([`token`]), `snapshot`
//! ([`snapshot`]), `sessions` and the admin client both it and `snapshot` use
//! ([`sessions`]), `store check | recover` ([`store`]), `cluster import | export`
//! ([`cluster`]). Errors are said for the person
//! reading them: no Rust type names, no doubled OS errors, the way out named.
//!
//! Part of the binary, not the library: `anyhow` stops here. Must not hold server logic:
//! everything it does goes through the `easel` library.

mod cluster;
mod config_words;
mod dev_secret;
mod serve;
mod sessions;
mod snapshot;
mod store;
mod token;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::{Parser, Subcommand};

use easel::auth::Role;
use easel::config::{Config, ConfigError};

#[derive(Parser)]
#[command(
    name = "easel",
    version,
    about = "A CRDT document-sync relay for live tutoring sessions"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Args)]
pub struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Where `snapshot` and `sessions` act: the data directory, or a running server.
#[derive(clap::Args)]
pub struct TargetArgs {
    /// Data directory (default ./snapshots, or the config's data_dir).
    #[arg(long, global = true, conflicts_with = "server")]
    pub data_dir: Option<PathBuf>,
    /// A cluster's Redis, redis://host:port (default: EASEL_REDIS_URL or the config's
    /// [cluster], unless --data-dir is given).
    #[arg(long, global = true, value_name = "URL", conflicts_with_all = ["server", "data_dir"])]
    pub redis: Option<String>,
    /// A running server's base URL, e.g. http://127.0.0.1:8080 (needs --token).
    #[arg(long, global = true, requires = "token")]
    pub server: Option<String>,
    /// A JWT for --server (tutor or admin to restore; admin with sid "*" for `sessions`).
    #[arg(long, global = true)]
    pub token: Option<String>,
    /// TOML configuration file.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Versions of a session: number, time, size, update count.
    List {
        /// Session id.
        session: String,
    },
    /// The whiteboard as a Yjs v1 update (what Y.applyUpdate loads).
    Export {
        /// Session id.
        session: String,
        /// A snapshot version (default: the current state).
        #[arg(long)]
        version: Option<u64>,
        /// Output file (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The document's content as JSON, from an update file or a session.
    Inspect {
        /// An update file, or a session id.
        source: String,
        /// A snapshot version of the session (default: the current state).
        #[arg(long)]
        version: Option<u64>,
    },
    /// Roll the whiteboard back to version N (recorded as a new version).
    Restore {
        /// Session id.
        session: String,
        /// The version to roll back to (see `easel snapshot list SESSION`).
        #[arg(long)]
        version: u64,
    },
    /// Merge a Yjs v1 update file into the session.
    Import {
        /// Session id (created if it does not exist yet).
        session: String,
        /// A Yjs v1 update file, e.g. from `easel snapshot export`.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the relay.
    Serve {
        /// Address to listen on (default 127.0.0.1:8080).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Data directory (default ./snapshots). In cluster mode only the development
        /// secret is kept there.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Cluster mode: keep everything in this Redis (redis://host:port), shared with
        /// the other nodes, instead of a sled data directory (or EASEL_REDIS_URL).
        #[arg(long, value_name = "URL")]
        redis: Option<String>,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Mint an HS256 token with the configured secret (for development and scripts).
    Token {
        /// User id (`sub`).
        #[arg(long)]
        sub: String,
        /// Session id the token covers (repeat for several, `*` for all).
        #[arg(long = "session", required = true)]
        sessions: Vec<String>,
        /// tutor, student, viewer or admin.
        #[arg(long, default_value = "student")]
        role: Role,
        /// Display name.
        #[arg(long)]
        name: Option<String>,
        /// Lifetime, e.g. 1h, 30m, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Data directory whose development secret to use when no secret is configured
        /// (default ./snapshots, or the config's data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Snapshot tool: list, export, inspect, restore, import.
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCommand,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Sessions in the store: id, size, last activity, snapshot count.
    Sessions {
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Cluster mode: move sessions between a sled data directory and Redis.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
        /// The sled data directory to import from or export into (required).
        #[arg(long, global = true)]
        data_dir: Option<PathBuf>,
        /// The cluster's Redis, redis://host:port (default: EASEL_REDIS_URL or the
        /// config's [cluster]).
        #[arg(long, global = true, value_name = "URL")]
        redis: Option<String>,
        /// TOML configuration file.
        #[arg(long, global = true)]
        config: Option<PathBuf>,
    },
    /// The data directory itself: check for damage, or recover from it.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
        /// Data directory (default ./snapshots, or the config's data_dir).
        #[arg(long, global = true)]
        data_dir: Option<PathBuf>,
        /// TOML configuration file.
        #[arg(long, global = true)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Copy every session of a sled data directory (not in use by a server) into Redis:
    /// versions with their numbers, the log, chat with seqs, edits, moderation. Sessions
    /// already in Redis are skipped. Nodes may serve meanwhile.
    Import,
    /// Write every session in Redis into a new sled data directory (new or empty), which
    /// `easel serve --data-dir` then serves.
    Export,
}

#[derive(Subcommand)]
pub enum StoreCommand {
    /// Report damage without changing anything (exit status 1 when damaged).
    Check,
    /// Move a damaged database aside and rebuild it from what still reads and from the
    /// versions/ files; prints what could not be brought back.
    Recover,
    /// Rebuild the database into a fresh one and swap it in (offline), so that deleted
    /// chat messages' text is gone from disk.
    Compact,
}

pub(crate) fn load_config(args: &ConfigArgs) -> anyhow::Result<Config> {
    if let Some(path) = &args.config {
        if !path.exists() {
            bail!("no such file: {}", path.display());
        }
    }
    let mut config = Config::from_file(args.config.as_deref()).map_err(|e| match e {
        ConfigError::Parse { path, message } => {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            anyhow::anyhow!(
                "config file {}: {}",
                path.display(),
                config_words::describe(&text, &message)
            )
        }
        other => other.into(),
    })?;
    config.apply_env(&|k| std::env::var(k).ok())?;
    Ok(config)
}

/// Runs one command; `Ok` carries the exit status (`store check` fails with 1 on damage).
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let ok = |()| ExitCode::SUCCESS;
    match cli.command {
        Command::Serve {
            listen,
            data_dir,
            redis,
            config,
        } => serve::serve(load_config(&config)?, listen, data_dir, redis)
            .await
            .map(ok),
        Command::Token {
            sub,
            sessions,
            role,
            name,
            ttl,
            data_dir,
            config,
        } => {
            let mut config = load_config(&config)?;
            if let Some(d) = data_dir {
                config.data_dir = d;
            }
            token::token(config, sub, sessions, role, name, ttl).map(ok)
        }
        Command::Snapshot { command, target } => {
            snapshot::snapshot(command, snapshot::admin(target)?).map(ok)
        }
        Command::Sessions { target } => sessions::sessions(snapshot::admin(target)?).map(ok),
        Command::Store {
            command,
            data_dir,
            config,
        } => store::store_command(command, data_dir, config),
        Command::Cluster {
            command,
            data_dir,
            redis,
            config,
        } => cluster::cluster_command(command, data_dir, redis, config).map(ok),
    }
}
