//! The `easel` command line: `serve` runs the relay, `token` mints a development token.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use easel::auth::{claims_for, Role, Verifier};
use easel::config::{Config, LogFormat};
use easel::store::{MemoryStore, Store};

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
        let claims = claims_for(
            "demo-tutor",
            vec!["*".into()],
            Role::Tutor,
            Some("Demo tutor".into()),
            Duration::from_secs(12 * 3600),
        );
        let token = verifier.mint(&claims)?;
        tracing::warn!("no JWT secret configured: using a random secret for this run only");
        tracing::info!(
            "demo: ws://{addr}/ws/v2/session/demo/whiteboard?token={token}  (token valid 12 h, all sessions, role tutor)"
        );
    }
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    println!("easel listening on {addr}");
    tracing::info!(%addr, data_dir = %config.data_dir.display(), "easel listening");
    easel::server::serve(
        listener,
        Arc::new(config),
        verifier,
        store,
        shutdown_signal(),
    )
    .await?;
    Ok(())
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            listen,
            data_dir,
            config,
        } => serve(load_config(&config)?, listen, data_dir).await,
        Command::Token {
            sub,
            sessions,
            role,
            name,
            ttl,
            config,
        } => token(load_config(&config)?, sub, sessions, role, name, ttl),
    }
}
