//! `easel cluster import | export --data-dir DIR [--redis URL]`: moves sessions between a
//! sled data directory and a cluster's Redis (SPEC 9), through
//! [`easel::store::redis::transfer`], and prints what it moved. The Redis URL comes from
//! `--redis`, else `EASEL_REDIS_URL` or the config's `[cluster]`. Must not hold the copy
//! logic itself.

use std::path::PathBuf;

use anyhow::{bail, Context};

use super::{load_config, ClusterCommand, ConfigArgs};
use easel::store::redis::transfer::{self, TransferReport};
use easel::store::{ClientIdentity, RedisStore, RedisTarget};

pub fn cluster_command(
    command: ClusterCommand,
    data_dir: Option<PathBuf>,
    redis: Option<String>,
    config: Option<PathBuf>,
) -> anyhow::Result<()> {
    let mut config = load_config(&ConfigArgs { config })?;
    let Some(dir) = data_dir else {
        bail!("--data-dir DIR is required: the sled data directory to import from or export into");
    };
    if let Some(url) = redis {
        config.cluster.redis_url = Some(url);
        config.cluster.redis_cluster_nodes.clear();
    }
    config.validate()?;
    let Some(target) = RedisTarget::from_config(&config.cluster) else {
        bail!("no Redis named: pass --redis redis://HOST:PORT (or set EASEL_REDIS_URL, or [cluster] redis_url)");
    };
    let store = RedisStore::connect_as(
        target,
        ClientIdentity::from_config(&config.cluster)?,
        config.cluster.node_id(),
        config.persist.keep_snapshots,
    )?;
    match command {
        ClusterCommand::Import => {
            let report = transfer::import(&dir, &store)
                .with_context(|| format!("import from {}", dir.display()))?;
            print_report("imported", &report);
        }
        ClusterCommand::Export => {
            let report = transfer::export(&store, &dir)
                .with_context(|| format!("export into {}", dir.display()))?;
            print_report("exported", &report);
        }
    }
    Ok(())
}

fn print_report(done: &str, report: &TransferReport) {
    let mut copied = 0;
    for s in &report.sessions {
        match &s.skipped {
            Some(why) => println!("skipped {}: {why}", s.session),
            None => {
                copied += 1;
                println!(
                    "{done} {}: {} versions, {} log entries, {} chat messages",
                    s.session, s.versions, s.log_entries, s.messages
                );
            }
        }
    }
    println!("{done} {copied} of {} sessions", report.sessions.len());
}
