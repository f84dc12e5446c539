//! Ingestion of users' checkpoints: a directory of `*.safetensors` files and
//! a JSON Lines metadata file (one object per file). Every file is checked
//! against its architecture (names, shapes, finite values), stored by
//! content (an identical file already in the zoo is not added twice), and
//! recorded; a bad file is reported with its reason and the rest go on.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;

use crate::blobs::{BlobStore, sha256_hex};
use crate::catalog::{Catalog, ModelSource, ZooModelRecord};
use crate::tasks::Family;
use crate::weights::decode_safetensors;

/// Default name of the metadata file inside the directory.
pub const METADATA_FILE: &str = "metadata.jsonl";

/// One line of the metadata file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestLine {
    /// File name, relative to the directory.
    pub file: String,
    /// Architecture name (registered, or one of the built-in families').
    pub architecture: String,
    /// Task family ("" if none).
    #[serde(default)]
    pub family: String,
    /// The task: features as the family's schema names them, or anything.
    #[serde(default)]
    pub task: serde_json::Value,
    /// Metrics the user measured.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// Training seed.
    #[serde(default)]
    pub seed: u64,
    /// Training configuration.
    #[serde(default)]
    pub training_config: serde_json::Value,
}

/// What an ingestion did, file by file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IngestReport {
    /// Files added (id per file).
    pub added: Vec<(String, String)>,
    /// Files identical to a stored model (file, existing id).
    pub duplicates: Vec<(String, String)>,
    /// Files refused, with the reason.
    pub errors: Vec<(String, String)>,
}

/// Ingests `dir` into zoo `zoo` using `metadata` (default
/// `dir/metadata.jsonl`).
pub async fn ingest_dir(
    catalog: Arc<dyn Catalog>,
    blobs: &BlobStore,
    dir: &Path,
    metadata: Option<&Path>,
    zoo: &str,
) -> Result<IngestReport, std::io::Error> {
    let metadata_path: PathBuf =
        metadata.map_or_else(|| dir.join(METADATA_FILE), Path::to_path_buf);
    let text = std::fs::read_to_string(&metadata_path)?;
    let mut report = IngestReport::default();
    let mut described = BTreeSet::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let where_ = format!("{}:{}", metadata_path.display(), number + 1);
        let entry: IngestLine = match serde_json::from_str(line) {
            Ok(entry) => entry,
            Err(e) => {
                report.errors.push((where_, format!("metadata: {e}")));
                continue;
            }
        };
        described.insert(entry.file.clone());
        match ingest_one(&catalog, blobs, dir, &entry, zoo).await {
            Ok((id, false)) => report.added.push((entry.file, id)),
            Ok((id, true)) => report.duplicates.push((entry.file, id)),
            Err(reason) => report.errors.push((entry.file, reason)),
        }
    }
    let mut files: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".safetensors") && !described.contains(name))
        .collect();
    files.sort();
    for name in files {
        report.errors.push((
            name,
            format!("no line in {} describes it", metadata_path.display()),
        ));
    }
    Ok(report)
}

async fn ingest_one(
    catalog: &Arc<dyn Catalog>,
    blobs: &BlobStore,
    dir: &Path,
    entry: &IngestLine,
    zoo: &str,
) -> Result<(String, bool), String> {
    if entry.file.contains('/') || entry.file.contains("..") {
        return Err("file: must be a plain file name inside the directory".into());
    }
    let arch = match catalog
        .architecture(&entry.architecture)
        .await
        .map_err(|e| e.to_string())?
    {
        Some(arch) => arch,
        None => {
            // A built-in family's architecture is registered on first use.
            let builtin = Family::ALL
                .iter()
                .flat_map(|f| f.networks())
                .find(|n| n.spec.name == entry.architecture)
                .ok_or_else(|| {
                    format!("architecture: {:?} is not registered", entry.architecture)
                })?;
            catalog
                .register_architecture(&builtin.spec)
                .await
                .map_err(|e| e.to_string())?;
            builtin.spec
        }
    };
    let bytes = std::fs::read(dir.join(&entry.file)).map_err(|e| format!("file: {e}"))?;
    let decoded = decode_safetensors(&bytes).map_err(|e| e.to_string())?;
    arch.check(
        decoded
            .specs
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice())),
    )
    .map_err(|e| e.to_string())?;
    for (name, tensor) in &decoded.tensors {
        let finite = tch::no_grad(|| tensor.isfinite().all().int64_value(&[]) == 1);
        if !finite {
            return Err(format!("tensor {name:?} holds NaN or infinite values"));
        }
    }
    let sha256 = sha256_hex(&bytes);
    let record = ZooModelRecord {
        id: format!("{zoo}/{}", &sha256[..16]),
        zoo: zoo.to_owned(),
        architecture: arch.name.clone(),
        family: entry.family.clone(),
        source: ModelSource::Ingested,
        task: entry.task.clone(),
        seed: entry.seed,
        metrics: entry.metrics.clone(),
        training_config: entry.training_config.clone(),
        sha256,
        size_bytes: bytes.len() as u64,
        created_at_ms: 0,
    };
    blobs
        .put(Bytes::from(bytes))
        .await
        .map_err(|e| e.to_string())?;
    let inserted = catalog
        .insert_zoo_model(&record)
        .await
        .map_err(|e| e.to_string())?;
    Ok((inserted.model.id, inserted.deduplicated))
}
