//! The catalog: architectures, zoos and their build units, zoo models,
//! denoiser versions (rows only; the files live in `blobs`) and the job
//! queue ([`jobs`]). One [`Catalog`]
//! trait with a PostgreSQL and a SQLite implementation that run the same SQL
//! (numbered `$N` parameters work in both) from migrations under
//! `migrations/postgres` and `migrations/sqlite`. Where two workers could
//! race, the catalog uses single-statement claims (`FOR UPDATE SKIP LOCKED`
//! on PostgreSQL) and transactions that check who holds a claim.

mod error;
mod guarded;
pub mod jobs;
mod postgres;
mod records;
mod sql;
mod sqlite;

use std::sync::Arc;

pub use error::CatalogError;
pub use guarded::{BACKEND, DEFAULT_CALL_TIMEOUT, GuardedCatalog, redacted_location};
pub use jobs::{JobFilter, JobKind, JobOutcome, JobQueue, JobRecord, JobState, NewJob};
pub use postgres::{PATIENT_ACQUIRE_TIMEOUT, PostgresCatalog};
pub use records::{
    DenoiserRecord, InsertedModel, ModelSource, Page, PageRequest, Snapshot, WorkUnit,
    ZooModelFilter, ZooModelRecord, ZooPlan, ZooProgress,
};
pub use sqlite::SqliteCatalog;

use crate::weights::ArchSpec;

/// Most rows one page returns.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Rows per page when the request does not say.
pub const DEFAULT_PAGE_SIZE: u32 = 100;

/// The catalog's operations, the same on every backend.
#[async_trait::async_trait]
pub trait Catalog: JobQueue + Send + Sync + std::fmt::Debug {
    /// "postgres" or "sqlite".
    fn backend(&self) -> &'static str;

    /// One round trip to the database (`SELECT 1`).
    async fn ping(&self) -> Result<(), CatalogError>;

    /// Registers an architecture. Registering the same spec again is a no-op
    /// (returns false); a different spec under a taken name is a conflict.
    async fn register_architecture(&self, spec: &ArchSpec) -> Result<bool, CatalogError>;
    /// The architecture called `name`.
    async fn architecture(&self, name: &str) -> Result<Option<ArchSpec>, CatalogError>;
    /// All architectures (of one family, if given), by name.
    async fn architectures(&self, family: Option<&str>) -> Result<Vec<ArchSpec>, CatalogError>;

    /// Adds a zoo model whose blob is already stored. A file (sha256) already
    /// stored for the same architecture is not added twice: the existing row
    /// comes back with `deduplicated` set.
    async fn insert_zoo_model(&self, model: &ZooModelRecord)
    -> Result<InsertedModel, CatalogError>;
    /// One zoo model.
    async fn zoo_model(&self, id: &str) -> Result<Option<ZooModelRecord>, CatalogError>;
    /// Zoo models, newest first, filtered and paged.
    async fn zoo_models(
        &self,
        filter: &ZooModelFilter,
        page: &PageRequest,
    ) -> Result<Page<ZooModelRecord>, CatalogError>;
    /// Records a training snapshot of a zoo model (blob already stored).
    async fn add_snapshot(&self, snapshot: &Snapshot) -> Result<(), CatalogError>;
    /// A model's snapshots, by epoch.
    async fn snapshots(&self, model_id: &str) -> Result<Vec<Snapshot>, CatalogError>;

    /// Creates a zoo and its units (one per model, with its spec), or checks
    /// that an existing zoo of that name has the same plan. Idempotent.
    async fn plan_zoo(
        &self,
        plan: &ZooPlan,
        unit_specs: &[serde_json::Value],
    ) -> Result<(), CatalogError>;
    /// The plan of a zoo.
    async fn zoo(&self, name: &str) -> Result<Option<ZooPlan>, CatalogError>;
    /// Claims the next unit to build for `worker`: a pending one, one this
    /// worker claimed before (it restarted), or one whose claim is older than
    /// `stale_before_ms` (its worker died). Never the same unit to two
    /// workers at once.
    async fn claim_unit(
        &self,
        zoo: &str,
        worker: &str,
        stale_before_ms: i64,
    ) -> Result<Option<WorkUnit>, CatalogError>;
    /// Records the model of a claimed unit (and its training snapshots,
    /// whose blobs are stored) and marks the unit done, in one transaction.
    /// A conflict if `worker` no longer holds the claim.
    async fn complete_unit(
        &self,
        zoo: &str,
        unit: u64,
        worker: &str,
        model: &ZooModelRecord,
        snapshots: &[Snapshot],
    ) -> Result<InsertedModel, CatalogError>;
    /// Gives a claimed unit back (its build failed) so it can be retried.
    async fn release_unit(&self, zoo: &str, unit: u64, worker: &str) -> Result<(), CatalogError>;
    /// Returns every claim of a zoo taken before `before_ms` to pending (a
    /// single worker restarting after a crash); the count released.
    async fn release_claims_before(&self, zoo: &str, before_ms: i64) -> Result<u64, CatalogError>;
    /// Units done / claimed / pending.
    async fn zoo_progress(&self, zoo: &str) -> Result<ZooProgress, CatalogError>;

    /// Adds a denoiser version (inactive; blob already stored).
    async fn insert_denoiser(&self, denoiser: &DenoiserRecord) -> Result<(), CatalogError>;
    /// One denoiser.
    async fn denoiser(&self, id: &str) -> Result<Option<DenoiserRecord>, CatalogError>;
    /// Denoisers, newest first (of one architecture, if given), paged.
    async fn denoisers(
        &self,
        architecture: Option<&str>,
        page: &PageRequest,
    ) -> Result<Page<DenoiserRecord>, CatalogError>;
    /// Makes `id` the one active denoiser of its architecture, atomically.
    async fn activate_denoiser(&self, id: &str) -> Result<DenoiserRecord, CatalogError>;
    /// The active denoiser of an architecture.
    async fn active_denoiser(
        &self,
        architecture: &str,
    ) -> Result<Option<DenoiserRecord>, CatalogError>;

    /// Every blob hash a row refers to (models, snapshots, denoisers).
    async fn referenced_blobs(&self) -> Result<Vec<String>, CatalogError>;
}

/// How long catalog calls may wait on the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatalogTimeouts {
    /// Opening the catalog at start-up (connect and migrate).
    pub connect: std::time::Duration,
    /// Waiting for a pooled connection (each call).
    pub acquire: std::time::Duration,
}

impl Default for CatalogTimeouts {
    fn default() -> Self {
        Self {
            connect: postgres::DEFAULT_CONNECT_TIMEOUT,
            acquire: postgres::DEFAULT_ACQUIRE_TIMEOUT,
        }
    }
}

/// Opens (and migrates) the catalog a URL names: `postgres://…` or
/// `postgresql://…` for PostgreSQL, `sqlite://PATH` (or a bare path ending in
/// `.db`/`.sqlite`) for SQLite.
pub async fn open(url: &str) -> Result<Arc<dyn Catalog>, CatalogError> {
    open_with(url, CatalogTimeouts::default()).await
}

/// [`open`] with the given timeouts (they apply to PostgreSQL).
pub async fn open_with(
    url: &str,
    timeouts: CatalogTimeouts,
) -> Result<Arc<dyn Catalog>, CatalogError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(
            PostgresCatalog::connect_with(url, timeouts).await?,
        ))
    } else if let Some(path) = url.strip_prefix("sqlite://") {
        Ok(Arc::new(
            SqliteCatalog::open(std::path::Path::new(path)).await?,
        ))
    } else if url.ends_with(".db") || url.ends_with(".sqlite") {
        Ok(Arc::new(
            SqliteCatalog::open(std::path::Path::new(url)).await?,
        ))
    } else {
        Err(CatalogError::InvalidArgument {
            field: "catalog",
            reason: format!(
                "unsupported catalog URL {url:?}: expected postgres://…, sqlite://PATH or a .db path"
            ),
        })
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
