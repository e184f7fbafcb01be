//! The `easel` command line: `serve` runs the relay (with no key configured, on a development
//! secret it keeps in the data directory), `token` mints a token with the configured or
//! development secret, `snapshot` and `sessions` work on the store, `store check | recover`
//! find and repair a damaged data directory. Errors are said for the person reading them:
//! no Rust type names, no doubled OS errors, the way out named.

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
use easel::config::{Config, ConfigError, LogFormat};
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
    /// Rebuild the database into a fresh one and swap it in (offline), so that deleted
    /// chat messages' text is gone from disk.
    Compact,
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
        StoreCommand::Compact => {
            let report = easel::store::compact::compact(&dir, config.persist.cache_mb)?;
            if report.resumed {
                println!("finished an interrupted compaction first");
            }
            println!(
                "compacted {}: {} records, {} bytes before, {} after",
                dir.display(),
                report.records,
                report.bytes_before,
                report.bytes_after
            );
            for folder in &report.left_alone {
                println!(
                    "not compacted: {} (an old database `easel store recover` moved aside; it may hold deleted chat text: delete it when you no longer need it)",
                    folder.display()
                );
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
            // A session id is letters, digits, `_` and `-`: anything else was meant as a file.
            let session_like = !source.is_empty()
                && source
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            let bytes = if path.is_file() || !session_like {
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

/// TOML and serde errors as a user reads them: the key's full name
/// (`limits.max_connections`) and what value was expected, in words, instead of a
/// snippet and Rust type names ("expected usize").
mod config_words {
    /// `message` is the `toml` error text for `text`: "TOML parse error at line L, column
    /// C", a snippet, then serde's message on the last line.
    pub fn describe(text: &str, message: &str) -> String {
        let serde_message = message.lines().last().unwrap_or(message).trim();
        let key = line_number(message).and_then(|n| key_at(text, n));
        let said = words(serde_message);
        match (key, line_number(message)) {
            (Some(key), _) => format!("{key}: {said}"),
            (None, Some(n)) => format!("line {n}: {said}"),
            (None, None) => said,
        }
    }

    fn line_number(message: &str) -> Option<usize> {
        let rest = &message[message.find("at line ")? + "at line ".len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    }

    /// `table.key` for the `key = value` on line `n` (1-based), from the nearest
    /// `[table]` header above it.
    fn key_at(text: &str, n: usize) -> Option<String> {
        let lines: Vec<&str> = text.lines().collect();
        let line = lines.get(n.checked_sub(1)?)?;
        let key = line.split_once('=')?.0.trim().trim_matches('"');
        if key.is_empty() {
            return None;
        }
        let table = lines[..n - 1].iter().rev().find_map(|l| {
            let l = l.trim();
            (l.starts_with('[') && l.ends_with(']')).then(|| l.trim_matches(['[', ']']).trim())
        });
        Some(match table {
            Some(t) if !t.is_empty() => format!("{t}.{key}"),
            _ => key.to_owned(),
        })
    }

    /// "invalid type: string \"lots\", expected usize" → "expected a whole number, got
    /// the string \"lots\"".
    fn words(message: &str) -> String {
        for prefix in ["invalid type: ", "invalid value: "] {
            if let Some(rest) = message.strip_prefix(prefix) {
                if let Some((got, expected)) = rest.rsplit_once(", expected ") {
                    return format!(
                        "expected {}, got {}",
                        expected_words(expected),
                        got_words(got)
                    );
                }
            }
        }
        if let Some(rest) = message.strip_prefix("unknown field ") {
            return format!("unknown key {}", rest.replace('`', ""));
        }
        if let Some(rest) = message.strip_prefix("unknown variant ") {
            return format!("unknown value {}", rest.replace('`', ""));
        }
        if message == "invalid socket address syntax" {
            return "expected an address and port such as \"127.0.0.1:8080\"".into();
        }
        message.to_owned()
    }

    fn expected_words(expected: &str) -> String {
        match expected.trim() {
            "usize" | "u8" | "u16" | "u32" | "u64" | "u128" => "a whole number (0 or more)".into(),
            "isize" | "i8" | "i16" | "i32" | "i64" | "i128" => "a whole number".into(),
            "f32" | "f64" => "a number".into(),
            "a boolean" | "bool" => "true or false".into(),
            "a string" | "a borrowed string" => "a string (in quotes)".into(),
            "socket address" => "an address and port such as \"127.0.0.1:8080\"".into(),
            "path string" => "a path (a string in quotes)".into(),
            other => other.replace('`', ""),
        }
    }

    fn got_words(got: &str) -> String {
        let got = got.trim();
        for (kind, words) in [
            ("string ", "the string "),
            ("integer ", "the number "),
            ("floating point ", "the number "),
            ("boolean ", ""),
        ] {
            if let Some(v) = got.strip_prefix(kind) {
                return format!("{words}{}", v.trim_matches('`'));
            }
        }
        match got {
            "sequence" => "a list".into(),
            "map" => "a table".into(),
            other => other.replace('`', ""),
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn a_string_for_a_number_is_said_in_words() {
            let text = "[limits]\nmax_connections = \"lots\"\n";
            let message = "TOML parse error at line 2, column 19\n  |\n2 | max_connections = \"lots\"\n  |                   ^^^^^^\ninvalid type: string \"lots\", expected usize";
            assert_eq!(
                super::describe(text, message),
                "limits.max_connections: expected a whole number (0 or more), got the string \"lots\""
            );
        }
    }
}

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
    let store: Arc<dyn Store> = Arc::new(open_store(&config, metrics.clone())?);
    let (verifier, dev_secret) = match configured {
        Some(v) => (v, None),
        None => {
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
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(data_dir = %config.data_dir.display(), "data directory open");
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
    easel::server::serve(listener, Arc::new(config), verifier, store, metrics, stop).await?;
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

/// The development secret: with no JWT secret or key configured, `serve` makes one and
/// keeps it in the data directory so that demo links and minted tokens survive restarts
/// (SPEC.md 1), and `easel token` reads it from there.
mod dev_secret {
    use std::io::Write;
    use std::path::{Path, PathBuf};

    use anyhow::{bail, Context};
    use easel::auth::Verifier;
    use easel::config::AuthConfig;
    use rand::RngCore;

    const FILE: &str = "dev-secret";

    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(FILE)
    }

    /// The verifier for the secret: its 64 hex digits are the HMAC key, exactly as if
    /// they were configured as `auth.jwt_secret`.
    pub fn verifier(secret: &str, auth: &AuthConfig) -> anyhow::Result<Verifier> {
        let mut auth = auth.clone();
        auth.jwt_secret = Some(secret.to_owned());
        auth.jwt_secret_file = None;
        match Verifier::from_config(&auth)? {
            Some(v) => Ok(v),
            None => bail!("the development secret gives no verifier"),
        }
    }

    /// Reads the secret at `path`; None when there is no file.
    pub fn load(path: &Path) -> anyhow::Result<Option<String>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let secret = text.trim();
        if secret.len() != 64 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!(
                "{} is not a development secret (64 hex digits): delete it to make a new one \
                 (links minted with the old one stop working)",
                path.display()
            );
        }
        Ok(Some(secret.to_owned()))
    }

    /// Reads the secret at `path`, or makes one: 32 random bytes, written to a temporary
    /// file of mode 0600 and linked into place, so a reader never sees half a secret and
    /// two servers starting at once agree on one.
    pub fn load_or_create(path: &Path) -> anyhow::Result<String> {
        if let Some(secret) = load(path)? {
            return Ok(secret);
        }
        let mut bytes = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        // A random name, not the pid: a crash between creating and removing it must not
        // block a later start that gets the same pid (always 1 in a container).
        let tmp = path.with_file_name(format!(".{FILE}.{:016x}.tmp", rand::random::<u64>()));
        let write = || -> std::io::Result<()> {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&tmp)?;
            file.write_all(format!("{secret}\n").as_bytes())?;
            file.sync_all()?;
            match std::fs::hard_link(&tmp, path) {
                // Another process made one first: use theirs.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
                other => other,
            }
        };
        let written = write();
        let _ = std::fs::remove_file(&tmp);
        written
            .with_context(|| format!("cannot write the development secret {}", path.display()))?;
        match load(path)? {
            Some(secret) => Ok(secret),
            None => bail!("{} vanished right after it was written", path.display()),
        }
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
        Err(e) if is_locked_error(&e) => bail!(
            "{}: stop it, or start this server with another --data-dir",
            easel::admin::locked_message(&config.data_dir)
        ),
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
    let verifier = match Verifier::from_config(&config.auth)? {
        Some(v) => v,
        None => {
            let path = dev_secret::path(&config.data_dir);
            let Some(secret) = dev_secret::load(&path)? else {
                bail!(
                    "no JWT secret configured and no development secret at {} (the first \
                     `easel serve` without a secret makes it): set EASEL_JWT_SECRET (or \
                     auth.jwt_secret in the config file), or pass the server's --data-dir",
                    path.display()
                );
            };
            dev_secret::verifier(&secret, &config.auth)?
        }
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
            eprintln!("error: {}", error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by ": ", leaving out a cause its parent's message
/// already says (many errors print their source too, and the OS error would show twice).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
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
            data_dir,
            config,
        } => {
            let mut config = load_config(&config)?;
            if let Some(d) = data_dir {
                config.data_dir = d;
            }
            token(config, sub, sessions, role, name, ttl).map(ok)
        }
        Command::Snapshot { command, target } => snapshot(command, admin(target)?).map(ok),
        Command::Sessions { target } => sessions(admin(target)?).map(ok),
        Command::Store {
            command,
            data_dir,
            config,
        } => store_command(command, data_dir, config),
    }
}
