//! Garbage collection of the blob store: what a killed process leaves
//! behind. A kill during a local blob write leaves a partial `KEY#N` file; a
//! kill between the blob write and its catalog row leaves a complete blob no
//! row refers to. The sweep removes both once they are older than a grace
//! period, so a writer still between those two steps is never robbed: blobs
//! are listed *before* the references are read, and each candidate's write
//! time is read again just before it is removed (a blob re-written since —
//! an identical upload about to get its row — is kept).
//!
//! Live blobs: every hash a catalog row refers to (zoo models, snapshots,
//! denoisers) and each saved training run's latest state (a named pointer).
//! Run by `weightgen-worker gc` and, in the background, at server start-up.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use crate::blobs::{BlobError, BlobStore};
use crate::catalog::{Catalog, CatalogError};
use crate::train::TrainError;
use crate::train::run_state::referenced_states;

/// Default age below which nothing is removed: far longer than any write
/// between a blob and its row (a 256 MiB upload over a slow link).
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(3600);

/// What a sweep removes.
#[derive(Debug, Clone, PartialEq)]
pub struct GcConfig {
    /// Only files and blobs older than this are removed.
    pub grace: Duration,
    /// Report what would be removed, remove nothing.
    pub dry_run: bool,
    /// A server's directory of staged uploads (`blobs::upload`), swept too.
    pub upload_staging: Option<std::path::PathBuf>,
}

impl Default for GcConfig {
    fn default() -> Self {
        Self {
            grace: DEFAULT_GC_GRACE,
            dry_run: false,
            upload_staging: None,
        }
    }
}

/// What a sweep found (and removed, unless it was a dry run).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GcReport {
    /// Partial writes removed (paths).
    pub staging: Vec<String>,
    /// Blobs no row or training run refers to, removed (hashes).
    pub unreferenced: Vec<String>,
    /// Bytes the removed files held.
    pub bytes: u64,
    /// Orphans younger than the grace period, kept for now.
    pub young: usize,
    /// Blobs that are referenced and kept.
    pub live: usize,
}

/// Why a sweep stopped.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// The blob store failed.
    #[error(transparent)]
    Blobs(#[from] BlobError),
    /// The catalog failed.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// A training run's pointer could not be read.
    #[error("training runs: {0}")]
    Runs(#[from] TrainError),
}

fn older_than(modified: SystemTime, grace: Duration, now: SystemTime) -> bool {
    now.duration_since(modified).is_ok_and(|age| age >= grace)
}

/// Sweeps `blobs` against the references of `catalog`.
pub async fn collect(
    catalog: &dyn Catalog,
    blobs: &BlobStore,
    config: &GcConfig,
) -> Result<GcReport, GcError> {
    let now = SystemTime::now();
    let mut report = GcReport::default();
    // Listed before the references are read: a blob written after this
    // point is not a candidate, one written before and referenced since is
    // found referenced below.
    let mut staging = blobs.staging_files().await?;
    if let Some(dir) = &config.upload_staging {
        staging.extend(crate::blobs::upload::leftovers(dir).await?);
    }
    let stored = blobs.stored().await?;
    let mut live: HashSet<String> = catalog.referenced_blobs().await?.into_iter().collect();
    live.extend(referenced_states(blobs).await?);

    for file in staging {
        if !older_than(file.modified, config.grace, now) {
            report.young += 1;
            continue;
        }
        if !config.dry_run {
            blobs.remove_staging(&file).await?;
        }
        report.bytes += file.size;
        report.staging.push(file.path.display().to_string());
    }
    for blob in stored {
        if live.contains(&blob.sha256) {
            report.live += 1;
            continue;
        }
        if !older_than(blob.modified, config.grace, now) {
            report.young += 1;
            continue;
        }
        // Re-written since the listing (an identical upload in progress)?
        match blobs.modified(&blob.sha256).await? {
            None => continue,
            Some(m) if !older_than(m, config.grace, SystemTime::now()) => {
                report.young += 1;
                continue;
            }
            Some(_) => {}
        }
        if !config.dry_run {
            blobs.delete(&blob.sha256).await?;
        }
        report.bytes += blob.size;
        report.unreferenced.push(blob.sha256);
    }
    tracing::info!(
        staging = report.staging.len(),
        unreferenced = report.unreferenced.len(),
        bytes = report.bytes,
        young = report.young,
        live = report.live,
        dry_run = config.dry_run,
        grace = ?config.grace,
        "blob store swept"
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_is_older_than_the_grace_period_is_old() {
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        assert!(older_than(now - 2 * hour, hour, now));
        assert!(older_than(now - hour, hour, now));
        assert!(!older_than(now - hour / 2, hour, now));
        // A write time in the future (clock skew) is never old.
        assert!(!older_than(now + hour, Duration::ZERO, now));
        assert!(older_than(now, Duration::ZERO, now));
    }
}
