//! `easel snapshot list | export | inspect | restore | import`: prints what the admin
//! client ([`super::sessions::Admin`]) answers, on a data directory, on a cluster's Redis
//! (`--redis URL`) or through a running server. Must not open the store itself.

use std::io::Write;
use std::sync::Arc;

use anyhow::Context;

use super::sessions::{inspect, read_update_file, Admin, Target};
use super::{load_config, ConfigArgs, SnapshotCommand, TargetArgs};

/// The admin client for `--data-dir` or `--server URL --token JWT`.
pub fn admin(target: TargetArgs) -> anyhow::Result<Admin> {
    let mut config = load_config(&ConfigArgs {
        config: target.config,
    })?;
    if let Some(url) = target.redis {
        config.cluster.redis_url = Some(url);
        config.cluster.redis_cluster_nodes.clear();
    } else if let Some(d) = target.data_dir {
        // An explicit directory wins over a Redis named by the environment or the config.
        config.data_dir = d;
        config.cluster = Default::default();
    }
    config.validate()?;
    Ok(Admin::new(match (target.server, target.token) {
        (Some(url), Some(token)) => Target::Server { url, token },
        _ => Target::Dir(Arc::new(config)),
    }))
}

pub fn snapshot(command: SnapshotCommand, admin: Admin) -> anyhow::Result<()> {
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
