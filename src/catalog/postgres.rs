//! The PostgreSQL catalog (production; several workers may share it).

use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};

/// Connections a catalog keeps open at most.
pub const MAX_CONNECTIONS: u32 = 8;
/// How long a call waits for a pooled connection, by default: short, so an
/// unreachable database answers UNAVAILABLE in about a second rather than
/// after a client's deadline (sqlx retries a refused connection until then).
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a call waits for a pooled connection where nobody is waiting
/// on the other end (workers, the CLI): the old default.
pub const PATIENT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between attempts to reach the database at start-up.
const RETRY_PAUSE: Duration = Duration::from_millis(250);
/// How long opening the catalog at start-up may take, by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A catalog in a PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PostgresCatalog {
    pool: PgPool,
}

impl PostgresCatalog {
    /// Connects to `url` (`postgres://…`) and applies the migrations.
    pub async fn connect(url: &str) -> Result<Self, CatalogError> {
        Self::connect_with(url, super::CatalogTimeouts::default()).await
    }

    /// [`Self::connect`] within `timeouts.connect`; calls then wait at most
    /// `timeouts.acquire` for a connection. A database that cannot be
    /// reached in time is an error naming its address (not its
    /// credentials).
    pub async fn connect_with(
        url: &str,
        timeouts: super::CatalogTimeouts,
    ) -> Result<Self, CatalogError> {
        let unreachable = |cause: String| {
            CatalogError::Unavailable(crate::breaker::Unavailable {
                backend: super::guarded::BACKEND,
                cause: format!("{}: {cause}", super::redacted_location(url)),
            })
        };
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(timeouts.acquire)
            .connect_lazy(url)?;
        // Retried until the connect timeout: the database may be starting.
        let deadline = tokio::time::Instant::now() + timeouts.connect;
        loop {
            let attempt =
                tokio::time::timeout_at(deadline, sqlx::migrate!("migrations/postgres").run(&pool));
            let cause = match attempt.await {
                Ok(Ok(())) => break,
                Ok(Err(sqlx::migrate::MigrateError::Execute(
                    e @ (sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolTimedOut),
                ))) => e.to_string(),
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => format!(
                    "no answer within {}",
                    humantime::format_duration(timeouts.connect)
                ),
            };
            if tokio::time::Instant::now() + RETRY_PAUSE >= deadline {
                return Err(unreachable(cause));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
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
