//! Catalog errors.

/// Why a catalog operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// No row with that key.
    #[error("{what} {id:?} not found")]
    NotFound {
        /// Kind of row.
        what: &'static str,
        /// Its key.
        id: String,
    },
    /// A request value is unusable.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The row exists with different content, or a claim was lost.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A stored row cannot be decoded.
    #[error("catalog row {id:?} is corrupt: {reason}")]
    Corrupt {
        /// Its key.
        id: String,
        /// What failed.
        reason: String,
    },
    /// The catalog could not be reached (its breaker is open, or the call
    /// failed at the connection level).
    #[error(transparent)]
    Unavailable(#[from] crate::breaker::Unavailable),
    /// The database failed.
    #[error("catalog database: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("catalog migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl CatalogError {
    /// Maps a unique-constraint violation to a conflict, other errors as they are.
    pub(crate) fn from_write(error: sqlx::Error, what: impl FnOnce() -> String) -> Self {
        match &error {
            sqlx::Error::Database(db) if db.is_unique_violation() => Self::Conflict(what()),
            _ => Self::Database(error),
        }
    }
}
