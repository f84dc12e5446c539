//! `weightgen zoo`: model zoo operations on the catalog and blob store directly.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use weightgen::storage::StorageArgs;
use weightgen::zoo::ingest_dir;

#[derive(Subcommand)]
pub enum ZooCommand {
    /// Add a directory of *.safetensors checkpoints described by a JSON Lines
    /// file (one object per file: file, architecture, family, task, metrics,
    /// seed, training_config). Each file is validated against its
    /// architecture and deduplicated by SHA-256; refused files are listed
    /// with their reason and the rest are added. Exits 1 if any was refused.
    Ingest {
        /// Directory holding the checkpoints.
        dir: PathBuf,
        /// Metadata file (default: DIR/metadata.jsonl).
        #[arg(long)]
        metadata: Option<PathBuf>,
        /// Zoo the models join.
        #[arg(long, env = "WEIGHTGEN_ZOO_NAME", default_value = "ingested")]
        zoo: String,
        #[command(flatten)]
        storage: Box<StorageArgs>,
    },
}

pub async fn zoo(command: ZooCommand) -> Result<ExitCode, String> {
    match command {
        ZooCommand::Ingest {
            dir,
            metadata,
            zoo,
            storage,
        } => {
            let (catalog, blobs) = storage.open().await.map_err(|e| e.to_string())?;
            let report = ingest_dir(catalog, &blobs, &dir, metadata.as_deref(), &zoo)
                .await
                .map_err(|e| format!("{}: {e}", dir.display()))?;
            for (file, id) in &report.added {
                println!("added      {file} as {id}");
            }
            for (file, id) in &report.duplicates {
                println!("duplicate  {file} is already stored as {id}");
            }
            for (file, reason) in &report.errors {
                println!("refused    {file}: {reason}");
            }
            println!(
                "{} added, {} duplicates, {} refused",
                report.added.len(),
                report.duplicates.len(),
                report.errors.len()
            );
            Ok(if report.errors.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
