//! Where the catalog and the blobs live: with no configuration, a SQLite
//! file and a blob directory under one data directory; `--catalog
//! postgres://…` and `--blobs s3://…` switch backends and nothing else
//! changes. Shared by the server, the worker and the CLI.

use std::path::PathBuf;
use std::sync::Arc;

use crate::blobs::{BlobError, BlobStore};
use crate::catalog::{self, Catalog, CatalogError};

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
        Self {
            data_dir: data_dir.into(),
            catalog: None,
            blobs: None,
        }
    }

    /// The catalog URL in effect.
    pub fn catalog_url(&self) -> String {
        self.catalog
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("catalog.db").display()))
    }

    /// The blob store URL in effect.
    pub fn blobs_url(&self) -> String {
        self.blobs
            .clone()
            .unwrap_or_else(|| self.data_dir.join("blobs").display().to_string())
    }

    /// Opens (and migrates) both.
    pub async fn open(&self) -> Result<(Arc<dyn Catalog>, BlobStore), StorageError> {
        let catalog = catalog::open(&self.catalog_url()).await?;
        let blobs = BlobStore::open(&self.blobs_url())?;
        Ok((catalog, blobs))
    }
}
