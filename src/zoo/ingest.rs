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
use crate::catalog::{Catalog, InsertedModel, ModelSource, ZooModelRecord};
use crate::tasks::Family;

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

/// Why a checkpoint was not added.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AddError {
    /// The file or its description does not fit (the field named).
    #[error("{field}: {reason}")]
    Invalid {
        /// What is wrong: "architecture", "file", "tensors", ….
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The architecture is neither registered nor built in.
    #[error("architecture: {0:?} is not registered")]
    UnknownArchitecture(String),
    /// The catalog or blob store failed.
    #[error("storage: {0}")]
    Storage(String),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> AddError {
    AddError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// Names and shapes of a safetensors file's tensors (by name), after
/// checking every value is finite; read without libtorch (so request
/// threads never touch it).
fn inspect(bytes: &[u8]) -> Result<Vec<(String, Vec<usize>)>, AddError> {
    use safetensors::Dtype;
    let file = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| invalid("file", format!("not a safetensors file: {e}")))?;
    let mut tensors = file.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut specs = Vec::new();
    for (name, view) in tensors {
        let data = view.data();
        let finite = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .all(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite()),
            Dtype::F64 => data.chunks_exact(8).all(|b| {
                f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]).is_finite()
            }),
            // An exponent of all ones is ∞ or NaN.
            Dtype::F16 => data
                .chunks_exact(2)
                .all(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7C00 != 0x7C00),
            Dtype::BF16 => data
                .chunks_exact(2)
                .all(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7F80 != 0x7F80),
            other => {
                return Err(invalid(
                    "tensors",
                    format!("tensor {name:?} has dtype {other:?}; expected F32, F16, BF16 or F64"),
                ));
            }
        };
        if !finite {
            return Err(invalid(
                "tensors",
                format!("tensor {name:?} holds NaN or infinite values"),
            ));
        }
        specs.push((name, view.shape().to_vec()));
    }
    Ok(specs)
}

/// The architecture called `name`: registered, or a built-in family's —
/// then `true`: it is registered only once a file for it is accepted, so a
/// refused upload leaves the catalog as it was.
pub async fn find_architecture(
    catalog: &Arc<dyn Catalog>,
    name: &str,
) -> Result<(crate::weights::ArchSpec, bool), AddError> {
    if let Some(arch) = catalog
        .architecture(name)
        .await
        .map_err(|e| AddError::Storage(e.to_string()))?
    {
        return Ok((arch, false));
    }
    builtin_architecture(name)
        .map(|spec| (spec, true))
        .ok_or_else(|| AddError::UnknownArchitecture(name.to_owned()))
}

/// The built-in architecture (of some family's networks) named `name`.
pub fn builtin_architecture(name: &str) -> Option<crate::weights::ArchSpec> {
    Family::ALL
        .iter()
        .flat_map(|f| f.networks())
        .find(|n| n.spec.name == name)
        .map(|n| n.spec)
}

/// Checks a checkpoint against its architecture (names, shapes, finite
/// values), stores it by content and records it in zoo `zoo`. A file already
/// stored for the architecture comes back with `deduplicated` set; a
/// refused one stores nothing.
pub async fn add_checkpoint(
    catalog: &Arc<dyn Catalog>,
    blobs: &BlobStore,
    bytes: Bytes,
    meta: &IngestLine,
    zoo: &str,
) -> Result<InsertedModel, AddError> {
    let storage = |e: &dyn std::fmt::Display| AddError::Storage(e.to_string());
    let (arch, unregistered) = find_architecture(catalog, &meta.architecture).await?;
    let specs = inspect(&bytes)?;
    arch.check(specs.iter().map(|(n, s)| (n.as_str(), s.as_slice())))
        .map_err(|e| invalid("tensors", e.to_string()))?;
    if unregistered {
        catalog
            .register_architecture(&arch)
            .await
            .map_err(|e| storage(&e))?;
    }
    let sha256 = sha256_hex(&bytes);
    let record = ZooModelRecord {
        id: format!("{zoo}/{}", &sha256[..16]),
        zoo: zoo.to_owned(),
        architecture: arch.name.clone(),
        family: meta.family.clone(),
        source: ModelSource::Ingested,
        task: meta.task.clone(),
        seed: meta.seed,
        metrics: meta.metrics.clone(),
        training_config: meta.training_config.clone(),
        sha256,
        size_bytes: bytes.len() as u64,
        created_at_ms: 0,
    };
    blobs.put(bytes).await.map_err(|e| storage(&e))?;
    catalog
        .insert_zoo_model(&record)
        .await
        .map_err(|e| storage(&e))
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
    find_architecture(catalog, &entry.architecture)
        .await
        .map_err(|e| e.to_string())?;
    let bytes = std::fs::read(dir.join(&entry.file)).map_err(|e| format!("file: {e}"))?;
    let inserted = add_checkpoint(catalog, blobs, Bytes::from(bytes), entry, zoo)
        .await
        .map_err(|e| e.to_string())?;
    Ok((inserted.model.id, inserted.deduplicated))
}
