//! The PostgreSQL catalog (production; several workers may share it).

use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};

/// Connections a catalog keeps open at most.
pub const MAX_CONNECTIONS: u32 = 8;
/// How long to wait for a free connection.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

/// A catalog in a PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PostgresCatalog {
    pool: PgPool,
}

impl PostgresCatalog {
    /// Connects to `url` (`postgres://…`) and applies the migrations.
    pub async fn connect(url: &str) -> Result<Self, CatalogError> {
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect(url)
            .await?;
        sqlx::migrate!("migrations/postgres").run(&pool).await?;
        Ok(Self { pool })
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

crate::catalog::sql::impl_catalog!(
    PostgresCatalog,
    sqlx::Postgres,
    backend = "postgres",
    lock = "FOR UPDATE SKIP LOCKED"
);

crate::catalog::jobs::impl_job_queue!(
    PostgresCatalog,
    sqlx::Postgres,
    lock = "FOR UPDATE SKIP LOCKED"
);
