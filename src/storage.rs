//! Where the catalog and the blobs live: with no configuration, a SQLite
//! file and a blob directory under one data directory; `--catalog
//! postgres://…` and `--blobs s3://…` switch backends and nothing else
//! changes. Shared by the server, the worker and the CLI.

use std::path::PathBuf;
use std::sync::Arc;

use std::time::Duration;

use crate::blobs::{BlobError, BlobStore, S3Options};
use crate::breaker::{BackendGuard, BreakerConfig};
use crate::catalog::{self, Catalog, CatalogError, GuardedCatalog};

/// Storage flags (each also an environment variable).
#[derive(Debug, Clone, clap::Args)]
pub struct StorageArgs {
    /// Directory for the embedded catalog (SQLite) and blob store; created
    /// if missing.
    #[arg(long, env = "WEIGHTGEN_DATA_DIR", default_value = "./weightgen-data")]
    pub data_dir: PathBuf,
    /// Catalog URL: postgres://… or sqlite://PATH. Default: sqlite in the
    /// data directory (catalog.db).
    #[arg(long, env = "WEIGHTGEN_CATALOG")]
    pub catalog: Option<String>,
    /// Blob store: s3://bucket/prefix (with the usual AWS_* settings) or a
    /// directory. Default: blobs/ in the data directory.
    #[arg(long, env = "WEIGHTGEN_BLOBS")]
    pub blobs: Option<String>,
    /// How long reaching and migrating a PostgreSQL catalog may take at
    /// start-up before giving up with its address.
    #[arg(long, env = "WEIGHTGEN_CATALOG_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub catalog_connect_timeout: Duration,
    /// How long a catalog call waits for a pooled PostgreSQL connection (an
    /// unreachable database answers UNAVAILABLE after this). Default: 1 s in
    /// the server (a client is waiting), 30 s in the worker and the CLI
    /// (batch work rides out a slow connection).
    #[arg(long, env = "WEIGHTGEN_CATALOG_ACQUIRE_TIMEOUT", value_parser = humantime::parse_duration)]
    pub catalog_acquire_timeout: Option<Duration>,
    /// How long a catalog call may go unanswered (a database that accepts
    /// connections but never answers) before it fails as unavailable.
    /// Default: 10 s in the server, no limit in the worker and the CLI.
    #[arg(long, env = "WEIGHTGEN_CATALOG_CALL_TIMEOUT", value_parser = humantime::parse_duration)]
    pub catalog_call_timeout: Option<Duration>,
    /// How long one S3 request may take, connect to last byte.
    #[arg(long, env = "WEIGHTGEN_BLOB_REQUEST_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub blob_request_timeout: Duration,
    /// How long a failed S3 request is retried (object_store's own default
    /// is 3 minutes).
    #[arg(long, env = "WEIGHTGEN_BLOB_RETRY_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub blob_retry_timeout: Duration,
    /// The S3 endpoint (e.g. http://127.0.0.1:8333), overriding
    /// AWS_ENDPOINT.
    #[arg(long, env = "WEIGHTGEN_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// Consecutive connection-level failures after which calls to that
    /// backend (catalog or blob store) are refused at once, UNAVAILABLE,
    /// until a background probe reaches it again.
    #[arg(long, env = "WEIGHTGEN_BREAKER_FAILURES", default_value_t = crate::breaker::DEFAULT_FAILURES_TO_OPEN)]
    pub breaker_failures: u32,
    /// How often a backend whose breaker is open is probed.
    #[arg(long, env = "WEIGHTGEN_BREAKER_PROBE_EVERY", default_value = "1s", value_parser = humantime::parse_duration)]
    pub breaker_probe_every: Duration,
}

/// Storage opened with its breakers.
#[derive(Debug, Clone)]
pub struct Storage {
    /// The catalog, behind its breaker.
    pub catalog: Arc<dyn Catalog>,
    /// The blob store (behind its breaker when it is S3).
    pub blobs: BlobStore,
    /// The catalog's breaker (health reads it).
    pub catalog_guard: BackendGuard,
}

/// Why storage could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The catalog failed to open.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The blob store failed to open.
    #[error(transparent)]
    Blobs(#[from] BlobError),
}

impl StorageArgs {
    /// Embedded defaults under `data_dir`.
    pub fn embedded(data_dir: impl Into<PathBuf>) -> Self {
        let defaults = S3Options::default();
        Self {
            data_dir: data_dir.into(),
            catalog: None,
            blobs: None,
            catalog_connect_timeout: crate::catalog::CatalogTimeouts::default().connect,
            catalog_acquire_timeout: None,
            catalog_call_timeout: None,
            blob_request_timeout: defaults.request_timeout,
            blob_retry_timeout: defaults.retry_timeout,
            s3_endpoint: None,
            breaker_failures: crate::breaker::DEFAULT_FAILURES_TO_OPEN,
            breaker_probe_every: crate::breaker::DEFAULT_PROBE_EVERY,
        }
    }

    /// The catalog URL in effect.
    pub fn catalog_url(&self) -> String {
        self.catalog
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("catalog.db").display()))
    }

    /// Where uploads are staged while they arrive (`blobs::upload`).
    pub fn upload_staging(&self) -> PathBuf {
        self.data_dir.join("staging")
    }

    /// The blob store URL in effect.
    pub fn blobs_url(&self) -> String {
        self.blobs
            .clone()
            .unwrap_or_else(|| self.data_dir.join("blobs").display().to_string())
    }

    /// Opens (and migrates) both.
    pub async fn open(&self) -> Result<(Arc<dyn Catalog>, BlobStore), StorageError> {
        let storage = self.open_guarded().await?;
        Ok((storage.catalog, storage.blobs))
    }

    /// These settings with the server's defaults where none was given: a
    /// short acquire timeout and a call timeout, since a client is waiting.
    pub fn for_server(&self) -> Self {
        let mut args = self.clone();
        args.catalog_acquire_timeout
            .get_or_insert(crate::catalog::CatalogTimeouts::default().acquire);
        args.catalog_call_timeout
            .get_or_insert(crate::catalog::DEFAULT_CALL_TIMEOUT);
        args
    }

    /// Opens (and migrates) both, each behind a breaker whose probe runs
    /// while they are in use (an S3 store only; a local directory has none).
    pub async fn open_guarded(&self) -> Result<Storage, StorageError> {
        let url = self.catalog_url();
        let timeouts = crate::catalog::CatalogTimeouts {
            connect: self.catalog_connect_timeout,
            acquire: self
                .catalog_acquire_timeout
                .unwrap_or(crate::catalog::PATIENT_ACQUIRE_TIMEOUT),
        };
        let breaker = BreakerConfig {
            failures_to_open: self.breaker_failures,
            probe_every: self.breaker_probe_every,
        };
        let catalog_guard = BackendGuard::new(crate::catalog::BACKEND, breaker)
            .at(crate::catalog::redacted_location(&url));
        let guarded = GuardedCatalog::new(
            catalog::open_with(&url, timeouts).await?,
            &url,
            catalog_guard.clone(),
            self.catalog_call_timeout,
        );
        guarded.spawn_probe();
        let blobs_url = self.blobs_url();
        let mut blobs = BlobStore::open_with(
            &blobs_url,
            &S3Options {
                request_timeout: self.blob_request_timeout,
                retry_timeout: self.blob_retry_timeout,
                endpoint: self.s3_endpoint.clone(),
                ..Default::default()
            },
        )?;
        if blobs_url.starts_with("s3://") {
            let guard = BackendGuard::new(crate::blobs::BACKEND, breaker)
                .at(crate::catalog::redacted_location(&blobs_url));
            blobs = blobs.with_guard(guard);
            blobs.spawn_probe();
        }
        Ok(Storage {
            catalog: Arc::new(guarded),
            blobs,
            catalog_guard,
        })
    }
}
