//! `easel store check | recover | compact`: finds and repairs a damaged data directory
//! through `easel::store::repair`, printing what it found and what could not be brought
//! back, and rebuilds it through `easel::store::compact` so deleted chat text leaves disk.
//! Must not open the store for serving.

use std::path::PathBuf;
use std::process::ExitCode;

use super::{load_config, ConfigArgs, StoreCommand};
use easel::store::{repair, SledSettings};

pub fn store_command(
    command: StoreCommand,
    data_dir: Option<PathBuf>,
    config: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
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
                Ok(ExitCode::SUCCESS)
            } else {
                println!(
                    "{}: {} problems; `easel store recover --data-dir {}` rebuilds the database",
                    dir.display(),
                    report.problems.len(),
                    dir.display()
                );
                Ok(ExitCode::FAILURE)
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
            Ok(ExitCode::SUCCESS)
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
            Ok(ExitCode::SUCCESS)
        }
    }
}
