//! The `easel` command line: `serve` runs the relay, `token` mints a development token,
//! `snapshot` and `sessions` work on the store, `store check | recover` find and repair a
//! damaged data directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use std::io::Write;

use easel::admin::{inspect, read_update_file, Admin, Target};
use easel::auth::{claims_for, Role, Verifier};
use easel::config::{Config, LogFormat};
use easel::store::{is_locked_error, repair, SledSettings, SledStore, Store};

#[derive(Parser)]
#[command(
    name = "easel",
    version,
    about = "A CRDT document-sync relay for live tutoring sessions"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// Where `snapshot` and `sessions` act: the data directory, or a running server.
#[derive(clap::Args)]
struct TargetArgs {
    /// Data directory (default ./snapshots, or the config's data_dir).
    #[arg(long, global = true, conflicts_with = "server")]
    data_dir: Option<PathBuf>,
    /// A running server's base URL, e.g. http://127.0.0.1:8080 (needs --token).
    #[arg(long, global = true, requires = "token")]
    server: Option<String>,
    /// A JWT for --server (tutor or admin to restore; admin with sid "*" for `sessions`).
    #[arg(long, global = true)]
    token: Option<String>,
    /// TOML configuration file.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Versions of a session: number, time, size, update count.
    List { session: String },
    /// The whiteboard as a Yjs v1 update (what Y.applyUpdate loads).
    Export {
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
        #[arg(long)]
        version: Option<u64>,
    },
    /// Roll the whiteboard back to version N (recorded as a new version).
    Restore {
        session: String,
        #[arg(long)]
        version: u64,
    },
    /// Merge a Yjs v1 update file into the session.
    Import { session: String, file: PathBuf },
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay.
    Serve {
        /// Address to listen on (default 127.0.0.1:8080).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Data directory (default ./snapshots).
        #[arg(long)]
        data_dir: Option<PathBuf>,
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
enum StoreCommand {
    /// Report damage without changing anything (exit status 1 when damaged).
    Check,
    /// Move a damaged database aside and rebuild it from what still reads and from the
    /// versions/ files; prints what could not be brought back.
    Recover,
}

fn store_command(
    command: StoreCommand,
    data_dir: Option<PathBuf>,
    config: Option<PathBuf>,
) -> anyhow::Result<std::process::ExitCode> {
    let mut config = load_config(&ConfigArgs { config })?;
    if let Some(d) = data_dir {
        config.data_dir = d;
    }
    let dir = config.data_dir.clone();
    match command {
        StoreCommand::Check => {
            let report = repair::check(&dir)?;
            for problem in &report.problems {
                println!("damaged: {problem}");
            }
            if report.problems.is_empty() {
                println!(
                    "{}: no damage found ({} sessions, {} records)",
                    dir.display(),
                    report.sessions,
                    report.records
                );
                Ok(std::process::ExitCode::SUCCESS)
            } else {
                println!(
                    "{}: {} problems; `easel store recover --data-dir {}` rebuilds the database",
                    dir.display(),
                    report.problems.len(),
                    dir.display()
                );
                Ok(std::process::ExitCode::FAILURE)
            }
        }
        StoreCommand::Recover => {
            let report = repair::recover(&dir, &SledSettings::from_config(&config))?;
            if let Some(aside) = &report.moved_to {
                println!("moved the damaged database to {}", aside.display());
            }
            println!(
                "rebuilt {}: {} records kept, {} versions restored from versions/ files",
                dir.display(),
                report.records_kept,
                report.versions_from_files
            );
            if report.lost.is_empty() {
                println!("nothing was lost");
            } else {
                println!("could not bring back:");
                for lost in &report.lost {
                    println!("  {lost}");
                }
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

fn admin(target: TargetArgs) -> anyhow::Result<Admin> {
    let mut config = load_config(&ConfigArgs {
        config: target.config,
    })?;
    if let Some(d) = target.data_dir {
        config.data_dir = d;
    }
    Ok(Admin::new(match (target.server, target.token) {
        (Some(url), Some(token)) => Target::Server { url, token },
        _ => Target::Dir(Arc::new(config)),
    }))
}

fn snapshot(command: SnapshotCommand, admin: Admin) -> anyhow::Result<()> {
    match command {
        SnapshotCommand::List { session } => {
            let versions = admin.list(&session)?;
            println!(
                "{:>8}  {:<24}  {:>10}  {:>8}",
                "version", "created_at", "bytes", "updates"
            );
            for v in versions {
                println!(
                    "{:>8}  {:<24}  {:>10}  {:>8}",
                    v.version, v.created_at, v.bytes, v.updates
                );
            }
        }
        SnapshotCommand::Export {
            session,
            version,
            out,
        } => {
            let bytes = admin.export(&session, version)?;
            match out {
                Some(path) => std::fs::write(&path, &bytes)
                    .with_context(|| format!("cannot write {}", path.display()))?,
                None => std::io::stdout().write_all(&bytes)?,
            }
        }
        SnapshotCommand::Inspect { source, version } => {
            let path = std::path::Path::new(&source);
            let bytes = if path.is_file() {
                read_update_file(path)?
            } else {
                admin.export(&source, version)?
            };
            println!("{}", serde_json::to_string_pretty(&inspect(&bytes)?)?);
        }
        SnapshotCommand::Restore { session, version } => {
            let new_version = admin.restore(&session, version)?;
            println!("restored {session} to version {version}; recorded as version {new_version}");
        }
        SnapshotCommand::Import { session, file } => {
            admin.import(&session, &read_update_file(&file)?)?;
            println!("imported {} into {session}", file.display());
        }
    }
    Ok(())
}

fn sessions(admin: Admin) -> anyhow::Result<()> {
    let sessions = admin.sessions()?;
    println!(
        "{:<32}  {:>10}  {:<24}  {:>9}",
        "session", "bytes", "last_activity", "snapshots"
    );
    for s in sessions {
        println!(
            "{:<32}  {:>10}  {:<24}  {:>9}",
            s.id,
            s.bytes,
            easel::http_api::rfc3339_ms(s.last_activity_ms),
            s.snapshots
        );
    }
    Ok(())
}

fn load_config(args: &ConfigArgs) -> anyhow::Result<Config> {
    let mut config = Config::from_file(args.config.as_deref())?;
    config.apply_env(&|k| std::env::var(k).ok())?;
    Ok(config)
}

fn init_logging(config: &Config) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&config.log.filter).with_context(|| {
        format!(
            "log filter {:?} (EASEL_LOG / log.filter)",
            config.log.filter
        )
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

async fn serve(
    mut config: Config,
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    if let Some(l) = listen {
        config.listen = l;
    }
    if let Some(d) = data_dir {
        config.data_dir = d;
    }
    config.validate()?;
    init_logging(&config)?;
    let (verifier, generated) = match Verifier::from_config(&config.auth)? {
        Some(v) => (v, false),
        None => {
            if !config.listen.ip().is_loopback() {
                bail!(
                    "refusing to listen on {} without a JWT key: set EASEL_JWT_SECRET (or auth.jwt_secret / jwt_public_key_file), or listen on a loopback address",
                    config.listen
                );
            }
            (Verifier::generated(&config.auth), true)
        }
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    if generated {
        tracing::warn!("no JWT secret configured: using a random secret for this run only");
        // Two links, so that two tabs show two people; both valid 12 h for every session.
        for (sub, name, role) in [
            ("demo-tutor", "Demo tutor", Role::Tutor),
            ("demo-student", "Demo student", Role::Student),
        ] {
            let claims = claims_for(
                sub,
                vec!["*".into()],
                role,
                Some(name.into()),
                Duration::from_secs(12 * 3600),
            );
            let token = verifier.mint(&claims)?;
            tracing::info!(
                "demo ({}): http://{addr}/?session=demo&token={token}",
                role.as_str()
            );
        }
    }
    let metrics = Arc::new(easel::metrics::Metrics::new());
    let store: Arc<dyn Store> = Arc::new(open_store(&config, metrics.clone())?);
    println!("easel listening on {addr}");
    tracing::info!(%addr, data_dir = %config.data_dir.display(), "easel listening");
    easel::server::serve(
        listener,
        Arc::new(config),
        verifier,
        store,
        metrics,
        shutdown_signal(),
    )
    .await?;
    Ok(())
}

/// Opens the data directory for `serve`; a database sled refuses (or panics on) is an
/// error that names the way out.
fn open_store(config: &Config, metrics: Arc<easel::metrics::Metrics>) -> anyhow::Result<SledStore> {
    match SledStore::open_with(
        &config.data_dir,
        SledSettings::from_config(config),
        Some(metrics),
    ) {
        Ok(store) => Ok(store),
        Err(e) if is_locked_error(&e) => Err(e.into()),
        Err(e) if e.to_string().contains("No space left") => bail!(
            "{e}\nthe disk holding {} is full: free some space and start again (nothing was changed)",
            config.data_dir.display()
        ),
        Err(e) => bail!(
            "{e}\nthe database in {dir} is damaged or unreadable: run `easel store check --data-dir {dir}` \
             to see what, and `easel store recover --data-dir {dir}` to rebuild it from the versions/ files \
             and whatever of it still reads",
            dir = config.data_dir.display()
        ),
    }
}

fn token(
    config: Config,
    sub: String,
    sessions: Vec<String>,
    role: Role,
    name: Option<String>,
    ttl: Duration,
) -> anyhow::Result<()> {
    let Some(verifier) = Verifier::from_config(&config.auth)? else {
        bail!("no JWT secret configured: set EASEL_JWT_SECRET (or auth.jwt_secret in the config file)");
    };
    let token = verifier.mint(&claims_for(&sub, sessions, role, name, ttl))?;
    println!("{token}");
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve { .. }) {
        // A command piped into `head` must end quietly when the pipe closes, not panic
        // in `println!`: let SIGPIPE end it as it ends every Unix tool. (`serve` keeps
        // Rust's ignored SIGPIPE: its sockets report EPIPE as errors.)
        restore_default_sigpipe();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // A blocking task stuck in a failed disk must not hold the exit (shutdown_timeout_s
    // has already been spent by then).
    runtime.shutdown_timeout(Duration::from_millis(500));
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line with the whole cause chain; no backtrace for an operator's mistake.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn restore_default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: resetting a signal's disposition to its default, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    let ok = |()| std::process::ExitCode::SUCCESS;
    match cli.command {
        Command::Serve {
            listen,
            data_dir,
            config,
        } => serve(load_config(&config)?, listen, data_dir).await.map(ok),
        Command::Token {
            sub,
            sessions,
            role,
            name,
            ttl,
            config,
        } => token(load_config(&config)?, sub, sessions, role, name, ttl).map(ok),
        Command::Snapshot { command, target } => snapshot(command, admin(target)?).map(ok),
        Command::Sessions { target } => sessions(admin(target)?).map(ok),
        Command::Store {
            command,
            data_dir,
            config,
        } => store_command(command, data_dir, config),
    }
}
