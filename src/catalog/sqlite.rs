//! The SQLite catalog (the embedded default; one worker at a time).
//! WAL journal with full sync (a committed row survives a crash or power
//! loss), foreign keys on, and a busy timeout instead of immediate
//! "database is locked" errors.

use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

/// How long a writer waits for the lock.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections a catalog keeps open at most.
pub const MAX_CONNECTIONS: u32 = 4;
/// Times a failed migration is retried (another process may be migrating).
const MIGRATION_RETRIES: u64 = 5;

/// A catalog in a SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteCatalog {
    pool: SqlitePool,
}

impl SqliteCatalog {
    /// Opens (creating if needed, with its directory) the database at `path`
    /// and applies the migrations.
    pub async fn open(path: &Path) -> Result<Self, CatalogError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| CatalogError::InvalidArgument {
                field: "catalog",
                reason: format!("cannot create {}: {e}", dir.display()),
            })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .connect_with(options)
            .await?;
        // Two processes opening a fresh file at once may both see no
        // migration applied; the loser's CREATE fails. Re-reading the applied
        // set after a pause then finds nothing left to do.
        let mut attempt = 0;
        loop {
            match sqlx::migrate!("migrations/sqlite").run(&pool).await {
                Ok(()) => break,
                Err(_) if attempt < MIGRATION_RETRIES => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Self { pool })
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

crate::catalog::sql::impl_catalog!(SqliteCatalog, sqlx::Sqlite, backend = "sqlite", lock = "");

crate::catalog::jobs::impl_job_queue!(SqliteCatalog, sqlx::Sqlite, lock = "");
