//! What an evaluation runs on: a zoo and a published denoiser of its
//! architecture, loaded from the catalog and blob store.

use std::sync::Arc;

use tch::Device;

use crate::blobs::BlobStore;
use crate::catalog::{Catalog, DenoiserRecord};
use crate::model::{DenoiserCheckpoint, TaskBatch};
use crate::tasks::TaskSpec;
use crate::train::quality::{condition_of, one_input};
use crate::train::validation_rows;
use crate::zoo::ZooDataset;

/// Why the subject of an evaluation cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SubjectError {
    /// The zoo or denoiser is missing, or they do not match.
    #[error("{field}: {reason}")]
    Input {
        /// The flag at fault.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// Loading failed.
    #[error("{0}")]
    Load(String),
}

/// A zoo, the denoiser evaluated and its catalog row.
pub struct Subject {
    /// The zoo (aligned as training saw it).
    pub data: ZooDataset,
    /// The denoiser.
    pub checkpoint: DenoiserCheckpoint,
    /// Its row.
    pub record: DenoiserRecord,
}

/// Loads zoo `zoo` and the denoiser `denoiser_id` (default: the active one
/// of the zoo's architecture) onto `device`.
pub async fn load_subject(
    catalog: &Arc<dyn Catalog>,
    blobs: &BlobStore,
    zoo: &str,
    denoiser_id: Option<&str>,
    device: Device,
) -> Result<Subject, SubjectError> {
    let data = load_zoo(catalog, blobs, zoo).await?;
    let (checkpoint, record) = load_denoiser(catalog, blobs, &data, denoiser_id, device).await?;
    Ok(Subject {
        data,
        checkpoint,
        record,
    })
}

impl Subject {
    /// The zoo tasks the training gate validates on (`val_fraction` 0.1)
    /// and their condition in one request form: `"both"`, `"features"` (the
    /// features alone) or `"support"` (the support set alone); `None` for
    /// another form.
    pub fn validation_tasks(&self, form: &str) -> Option<(Vec<TaskSpec>, TaskBatch)> {
        let rows = validation_rows(self.data.len(), 0.1);
        let pick = |i: &i64| *i as usize;
        let tasks = rows
            .iter()
            .map(|i| self.data.tasks[pick(i)].clone())
            .collect();
        let descriptors: Vec<_> = rows
            .iter()
            .map(|i| self.data.descriptors[pick(i)].clone())
            .collect();
        let full = condition_of(&self.checkpoint, &self.data, &descriptors);
        let condition = match form {
            "both" => full,
            "features" => one_input(&full, true),
            "support" => one_input(&full, false),
            _ => return None,
        };
        Some((tasks, condition))
    }
}

/// Loads zoo `zoo` as training sees it (aligned unless built from one
/// shared init).
pub async fn load_zoo(
    catalog: &Arc<dyn Catalog>,
    blobs: &BlobStore,
    zoo: &str,
) -> Result<ZooDataset, SubjectError> {
    ZooDataset::load(catalog, blobs, zoo)
        .await
        .map_err(|e| SubjectError::Input {
            field: "zoo",
            reason: e.to_string(),
        })
}

/// Loads the denoiser `denoiser_id` (default: the active one of the zoo's
/// architecture) onto `device`, checking that it generates the zoo's
/// architecture (one of several's selected for it).
pub async fn load_denoiser(
    catalog: &Arc<dyn Catalog>,
    blobs: &BlobStore,
    data: &ZooDataset,
    denoiser_id: Option<&str>,
    device: Device,
) -> Result<(DenoiserCheckpoint, DenoiserRecord), SubjectError> {
    let load = |e: &dyn std::fmt::Display| SubjectError::Load(e.to_string());
    let architecture = &data.network.spec.name;
    let record = match denoiser_id {
        Some(id) => catalog.denoiser(id).await.map_err(|e| load(&e))?,
        None => catalog
            .active_denoiser(architecture)
            .await
            .map_err(|e| load(&e))?,
    }
    .ok_or_else(|| SubjectError::Input {
        field: "denoiser-id",
        reason: match denoiser_id {
            Some(id) => format!("no denoiser {id:?}"),
            None => format!("no active denoiser for {architecture:?}"),
        },
    })?;
    let bytes = blobs.get(&record.sha256).await.map_err(|e| load(&e))?;
    let mut checkpoint = DenoiserCheckpoint::from_bytes(&bytes, device).map_err(|e| load(&e))?;
    if &record.architecture != architecture {
        // A denoiser of several architectures generates any that fits its
        // union, unseen widths too; one of a single architecture only that.
        let refused = |reason: String| SubjectError::Input {
            field: "denoiser-id",
            reason: format!(
                "{:?} generates {:?}, the zoo holds {architecture:?}{reason}",
                record.id, record.architecture
            ),
        };
        if checkpoint.union.is_none() {
            return Err(refused(String::new()));
        }
        checkpoint
            .select_architecture(&data.network.spec)
            .map_err(|e| refused(format!(": {e}")))?;
    }
    Ok((checkpoint, record))
}
