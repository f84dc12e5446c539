//! A published denoiser of several architectures, made to serve one more:
//! an architecture it was not trained on but that fits its union (an unseen
//! width) gets a catalog row `ID.ARCH` on the same checkpoint blob, as the
//! trained-on architectures got theirs when it was published.

use std::sync::Arc;

use tch::Device;

use super::{TrainError, member_denoiser_id, training_figures};
use crate::blobs::BlobStore;
use crate::catalog::{Catalog, DenoiserRecord};
use crate::model::DenoiserCheckpoint;
use crate::zoo::ingest::builtin_architecture;

/// Summary key marking a row whose architecture no gate scored (1).
pub const UNSEEN_ARCHITECTURE_KEY: &str = "unseen_architecture";

/// Publishes denoiser `denoiser_id`'s checkpoint for `architecture`
/// (registered, or a built-in family's — then registered): checks that the
/// checkpoint places it, inserts `ID.ARCH` with the run's training figures
/// but no quality figures (nothing scored that architecture; summary
/// [`UNSEEN_ARCHITECTURE_KEY`] = 1), and activates it when asked.
pub async fn publish_for_architecture(
    catalog: Arc<dyn Catalog>,
    blobs: &BlobStore,
    denoiser_id: &str,
    architecture: &str,
    activate: bool,
) -> Result<DenoiserRecord, TrainError> {
    let input = |field: &'static str, reason: String| TrainError::Input { field, reason };
    let record = catalog
        .denoiser(denoiser_id)
        .await?
        .ok_or_else(|| input("denoiser_id", format!("no denoiser {denoiser_id:?}")))?;
    // A catalog failure stays a catalog failure, not a fault of the field.
    let (spec, unregistered) = match catalog.architecture(architecture).await? {
        Some(spec) => (spec, false),
        None => (
            builtin_architecture(architecture).ok_or_else(|| {
                input(
                    "architecture",
                    format!("{architecture:?} is neither registered nor built in"),
                )
            })?,
            true,
        ),
    };
    // Rows of the checkpoint's other architectures name its first one's id.
    let base = record
        .id
        .strip_suffix(&format!(".{}", record.architecture))
        .unwrap_or(&record.id);
    let id = member_denoiser_id(base, &spec.name);
    if catalog.denoiser(&id).await?.is_some() || record.architecture == spec.name {
        return Err(input(
            "architecture",
            format!("denoiser {denoiser_id:?} already has a row for {architecture:?}"),
        ));
    }
    let bytes = blobs.get(&record.sha256).await?;
    let mut checkpoint = DenoiserCheckpoint::from_bytes(&bytes, Device::Cpu)?;
    checkpoint
        .select_architecture(&spec)
        .map_err(|e| input("architecture", e.to_string()))?;
    if unregistered {
        catalog.register_architecture(&spec).await?;
    }
    let mut summary = training_figures(&record.summary);
    summary.insert(UNSEEN_ARCHITECTURE_KEY.to_owned(), 1.0);
    let row = DenoiserRecord {
        id,
        architecture: spec.name.clone(),
        summary,
        active: false,
        ..record
    };
    catalog.insert_denoiser(&row).await?;
    tracing::info!(denoiser = %row.id, architecture = %spec.name, "published for an unseen architecture");
    Ok(match activate {
        true => catalog.activate_denoiser(&row.id).await?,
        false => row,
    })
}
