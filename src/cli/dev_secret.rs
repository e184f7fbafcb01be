//! The development secret: with no JWT secret or key configured, `serve` makes one and
//! keeps it in the data directory so that demo links and minted tokens survive restarts
//! (SPEC.md 1), and `easel token` reads it from there. Must not touch configured keys.

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
    written.with_context(|| format!("cannot write the development secret {}", path.display()))?;
    match load(path)? {
        Some(secret) => Ok(secret),
        None => bail!("{} vanished right after it was written", path.display()),
    }
}
