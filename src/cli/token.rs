//! `easel token`: mints an HS256 token with the configured secret, or the development
//! secret a `serve` left in the data directory. Must not create a secret: only `serve` does.

use std::time::Duration;

use anyhow::bail;

use super::dev_secret;
use easel::auth::{claims_for, Role, Verifier};
use easel::config::Config;

pub fn token(
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
