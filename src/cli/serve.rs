//! `easel serve`: checks the configuration, opens the store (a locked, full or damaged
//! data directory fails here, with the way out named; in cluster mode the Redis store,
//! built in [`open_cluster_store`] and nowhere else), sets up logging, the signal
//! handlers and the development secret, prints the "listening" line scripts wait for, and
//! runs `easel::server::serve` until SIGINT or SIGTERM. Must not hold server logic.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tracing_subscriber::EnvFilter;

use super::dev_secret;
use super::sessions::locked_message;
use easel::auth::{claims_for, Role, Verifier};
use easel::config::{Config, LogFormat};
use easel::store::{
    ClientIdentity, RedisStore, RedisTarget, SledSettings, SledStore, Store, StoreError,
};

fn init_logging(config: &Config) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_new(&config.log.filter).with_context(|| {
        format!(
            "log filter {:?} (EASEL_LOG / log.filter)",
            config.log.filter
        )
    })?;
    // Colour only for a person at a terminal: escape codes in a file or a pipe are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

/// SIGINT or SIGTERM, registered now: until a handler is registered a signal still has its
/// default action and kills the process before any socket is closed with 1012. So the
/// handlers exist before the "listening" line, and the returned future only waits on them.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {},
                _ = terminate.recv() => {},
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

pub async fn serve(
    mut config: Config,
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    redis: Option<String>,
) -> anyhow::Result<()> {
    if let Some(l) = listen {
        config.listen = l;
    }
    if let Some(d) = data_dir {
        config.data_dir = d;
    }
    if let Some(url) = redis {
        config.cluster.redis_url = Some(url);
        config.cluster.redis_cluster_nodes.clear();
    }
    config.validate()?;
    init_logging(&config)?;
    let configured = Verifier::from_config(&config.auth)?;
    if configured.is_none() && !config.listen.ip().is_loopback() {
        bail!(
            "refusing to listen on {} without a JWT key: set EASEL_JWT_SECRET (or auth.jwt_secret / jwt_public_key_file), or listen on a loopback address",
            config.listen
        );
    }
    // The store first: a directory another process holds must fail before any link is
    // printed (the links would point at that other server).
    let metrics = Arc::new(easel::metrics::Metrics::new());
    let cluster_store = open_cluster_store(&config, metrics.clone())?;
    let store: Arc<dyn Store> = match &cluster_store {
        Some(redis) => redis.clone(),
        None => Arc::new(open_store(&config, metrics.clone())?),
    };
    let (verifier, dev_secret) = match configured {
        Some(v) => (v, None),
        None => {
            if cluster_store.is_some() {
                // No sled to create it: the development secret is all it holds.
                std::fs::create_dir_all(&config.data_dir).with_context(|| {
                    format!(
                        "cannot create the data directory {}",
                        config.data_dir.display()
                    )
                })?;
            }
            let path = dev_secret::path(&config.data_dir);
            let secret = dev_secret::load_or_create(&path)?;
            #[cfg(unix)]
            if let Ok(meta) = std::fs::metadata(&path) {
                use std::os::unix::fs::PermissionsExt;
                if meta.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(
                        "{} can be read by other users: anyone who reads it can mint tokens (chmod 600 it)",
                        path.display()
                    );
                }
            }
            (dev_secret::verifier(&secret, &config.auth)?, Some(path))
        }
    };
    let listener = easel::server::bind(config.listen, config.limits.listen_backlog)?;
    let addr = listener.local_addr()?;
    match &cluster_store {
        Some(redis) => tracing::info!(
            node = redis.node_id(),
            "cluster mode: sessions are kept in Redis and shared with the other nodes"
        ),
        None => tracing::info!(data_dir = %config.data_dir.display(), "data directory open"),
    }
    let data_dir_arg = shell_word(&config.data_dir.display().to_string());
    match &dev_secret {
        Some(path) => {
            tracing::warn!(
                "no JWT secret configured: using the development secret kept in {} (for development only; \
                 set EASEL_JWT_SECRET for anything else). Links and tokens stay valid across restarts; \
                 an admin token: `easel token --data-dir {data_dir_arg} --sub me --session '*' --role admin`",
                path.display()
            );
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
        None => {
            // Only an HMAC secret can mint; a public key's tokens come from its issuer.
            let probe = claims_for("probe", vec![], Role::Viewer, None, Duration::from_secs(1));
            if verifier.mint(&probe).is_ok() {
                tracing::info!(
                    "demo page: http://{addr}/?session=SESSION with a token appended as its `token` \
                     parameter; mint one with the same secret (EASEL_JWT_SECRET or --config): \
                     `easel token --sub NAME --session SESSION --role tutor` (or student)"
                );
            } else {
                tracing::info!(
                    "demo page: http://{addr}/?session=SESSION with a token appended as its `token` \
                     parameter, from the issuer of the configured public key"
                );
            }
        }
    }
    let stop = shutdown_signal()?;
    // The one "listening" line, on stdout: scripts (and the tests) wait for it.
    println!("easel listening on {addr}");
    easel::server::serve(
        listener,
        Arc::new(config),
        verifier,
        store,
        cluster_store,
        metrics,
        stop,
    )
    .await?;
    Ok(())
}

/// `s` as one shell word, quoted only when it needs to be.
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
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
        Err(StoreError::Locked { .. }) => bail!(
            "{}: stop it, or start this server with another --data-dir",
            locked_message(&config.data_dir)
        ),
        Err(e) if e.is_disk_full() => bail!(
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

/// Cluster mode's store, when `[cluster]` (or `--redis`, `EASEL_REDIS_URL`) names a Redis:
/// the one place a node's `RedisStore` is built. A Redis that is down now is no reason
/// not to start: `/readyz` answers 503 and the store reconnects by itself (SPEC 9).
pub fn open_cluster_store(
    config: &Config,
    metrics: Arc<easel::metrics::Metrics>,
) -> anyhow::Result<Option<Arc<RedisStore>>> {
    let Some(target) = RedisTarget::from_config(&config.cluster) else {
        return Ok(None);
    };
    // This process's id in Redis: the configured (or host-pid) id and a random
    // incarnation. A process restarted under the same id (a container's PID 1, a fixed
    // `node_id`) must not renew the dead one's heartbeat: its users would never be swept.
    let node_id = format!("{}.{:08x}", config.cluster.node_id(), rand::random::<u32>());
    let identity = ClientIdentity::from_config(&config.cluster)
        .map_err(|e| anyhow::anyhow!("cluster mode: {e}"))?;
    let store = RedisStore::connect_as(target, identity, node_id, config.persist.keep_snapshots)
        .map_err(|e| anyhow::anyhow!("cluster mode: {e}"))?
        .with_metrics(metrics);
    match store.ping() {
        Ok(rtt) => tracing::info!(
            node = store.node_id(),
            round_trip_us = rtt.as_micros() as u64,
            "Redis reached"
        ),
        Err(e) => tracing::error!(
            node = store.node_id(),
            error = %e,
            "Redis cannot be reached now; /readyz answers 503 until it can (retrying by itself)"
        ),
    }
    Ok(Some(Arc::new(store)))
}
