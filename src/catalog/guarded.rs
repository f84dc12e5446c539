//! A catalog behind a circuit breaker ([`crate::breaker`]): every call
//! goes through the breaker, connection-level failures become
//! [`CatalogError::Unavailable`] naming where the catalog is (never its
//! credentials) and why, and while the breaker is open calls are refused
//! at once instead of each waiting for the pool's acquire timeout.

use std::sync::Arc;
use std::time::Duration;

use super::{
    Catalog, CatalogError, DenoiserRecord, InsertedModel, JobFilter, JobOutcome, JobQueue,
    JobRecord, NewJob, Page, PageRequest, Snapshot, WorkUnit, ZooModelFilter, ZooModelRecord,
    ZooPlan, ZooProgress,
};
use crate::breaker::{BackendGuard, Outcome, Unavailable};
use crate::weights::ArchSpec;

/// The backend name catalog errors and metrics use.
pub const BACKEND: &str = "catalog";
/// How long a catalog call may go unanswered, by default, before it fails
/// as unreachable (a database that accepts connections but never answers).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A catalog whose calls pass a breaker.
#[derive(Debug, Clone)]
pub struct GuardedCatalog {
    inner: Arc<dyn Catalog>,
    guard: BackendGuard,
    location: String,
    call_timeout: Option<Duration>,
}

impl GuardedCatalog {
    /// Wraps `inner`, found at `url` (its credentials are dropped from
    /// messages); a call with no answer within `call_timeout`, if given (a
    /// database that accepts connections but does not answer), fails as
    /// unreachable.
    pub fn new(
        inner: Arc<dyn Catalog>,
        url: &str,
        guard: BackendGuard,
        call_timeout: Option<Duration>,
    ) -> Self {
        Self {
            inner,
            guard,
            location: redacted_location(url),
            call_timeout,
        }
    }

    /// The breaker (for health and the probe).
    pub fn guard(&self) -> &BackendGuard {
        &self.guard
    }

    /// Starts the breaker's probe (one cheap query every probe interval
    /// while it is open); it ends once every clone of this catalog is
    /// dropped. Needs a Tokio runtime.
    pub fn spawn_probe(&self) {
        let inner = Arc::downgrade(&self.inner);
        let gone = inner.clone();
        let location = self.location.clone();
        let timeout = self.call_timeout.unwrap_or(DEFAULT_CALL_TIMEOUT);
        let probe = move || {
            let (inner, location) = (inner.upgrade(), location.clone());
            async move {
                let Some(inner) = inner else {
                    return Outcome::Answered;
                };
                match tokio::time::timeout(timeout, inner.ping()).await {
                    Err(_) => Outcome::Unreachable(format!("{location}: no answer to a probe")),
                    Ok(Ok(())) => Outcome::Answered,
                    Ok(Err(e)) => match unreachable(&location, &e) {
                        Some(cause) => Outcome::Unreachable(cause),
                        None => Outcome::Answered,
                    },
                }
            }
        };
        tokio::spawn(
            self.guard
                .clone()
                .watch(probe, crate::breaker::dropped(gone)),
        );
    }

    /// The cause, when `error` says the catalog could not be reached.
    fn unreachable(&self, error: &CatalogError) -> Option<String> {
        unreachable(&self.location, error)
    }

    async fn run<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, CatalogError>>,
    ) -> Result<T, CatalogError> {
        let timed = async {
            let result = match self.call_timeout {
                Some(limit) => tokio::time::timeout(limit, call).await.map_err(|_| limit),
                None => Ok(call.await),
            };
            match result {
                Ok(Err(CatalogError::Database(e))) => Err(self.as_unavailable(e)),
                Ok(result) => result,
                Err(limit) => Err(CatalogError::Unavailable(Unavailable {
                    backend: BACKEND,
                    cause: format!(
                        "{}: no answer within {}",
                        self.location,
                        humantime::format_duration(limit)
                    ),
                })),
            }
        };
        self.guard
            .run(timed, |e| self.unreachable(e), CatalogError::Unavailable)
            .await
    }

    /// A database error as `Unavailable` when it says the catalog could not
    /// be reached, unchanged otherwise.
    fn as_unavailable(&self, error: sqlx::Error) -> CatalogError {
        let error = CatalogError::Database(error);
        match self.unreachable(&error) {
            Some(cause) => CatalogError::Unavailable(Unavailable {
                backend: BACKEND,
                cause,
            }),
            None => error,
        }
    }
}

/// The cause, when `error` says the catalog at `location` could not be
/// reached.
fn unreachable(location: &str, error: &CatalogError) -> Option<String> {
    let e = match error {
        CatalogError::Unavailable(u) => return Some(u.cause.clone()),
        CatalogError::Database(e) => e,
        _ => return None,
    };
    let reached = match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => false,
        // No connection in time: an outage, or a pool too small for the
        // load. The breaker opens only on consecutive failures, which
        // contention (other calls completing in between) rarely gives.
        sqlx::Error::PoolTimedOut => false,
        // Connection exceptions (08) and operator intervention (57: shutting
        // down, cannot connect now).
        sqlx::Error::Database(db) => !db
            .code()
            .is_some_and(|code| code.starts_with("08") || code.starts_with("57")),
        _ => true,
    };
    (!reached).then(|| format!("{location}: {e}"))
}

/// `scheme://host:port/database` of a catalog URL: no user, password or
/// query (where `sslmode` and other secrets may sit).
pub fn redacted_location(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{rest}")
}

/// Implements a catalog trait for [`GuardedCatalog`]: `$extra` as written,
/// and each listed method forwarded to the inner catalog through the
/// breaker.
macro_rules! guarded {
    (
        $trait:path { $($extra:tt)* }
        $( fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty; )*
    ) => {
        #[async_trait::async_trait]
        impl $trait for GuardedCatalog {
            $($extra)*
            $(
                async fn $name(&self $(, $arg: $ty)*) -> Result<$ret, CatalogError> {
                    self.run(self.inner.$name($($arg),*)).await
                }
            )*
        }
    };
}

guarded!(JobQueue {}
    fn submit_job(&self, job: &NewJob) -> JobRecord;
    fn job(&self, id: &str) -> Option<JobRecord>;
    fn jobs(&self, filter: &JobFilter, page: &PageRequest) -> Page<JobRecord>;
    fn claim_job(&self, worker: &str, stale_before_ms: i64) -> Option<JobRecord>;
    fn heartbeat_job(&self, id: &str, worker: &str, progress: f64, message: &str) -> JobRecord;
    fn finish_job(&self, id: &str, worker: &str, outcome: &JobOutcome) -> JobRecord;
    fn cancel_job(&self, id: &str) -> JobRecord;
);

guarded!(Catalog {
        fn backend(&self) -> &'static str {
            self.inner.backend()
        }

    }
    fn ping(&self) -> ();
    fn register_architecture(&self, spec: &ArchSpec) -> bool;
    fn architecture(&self, name: &str) -> Option<ArchSpec>;
    fn architectures(&self, family: Option<&str>) -> Vec<ArchSpec>;
    fn insert_zoo_model(&self, model: &ZooModelRecord) -> InsertedModel;
    fn zoo_model(&self, id: &str) -> Option<ZooModelRecord>;
    fn zoo_models(&self, filter: &ZooModelFilter, page: &PageRequest) -> Page<ZooModelRecord>;
    fn add_snapshot(&self, snapshot: &Snapshot) -> ();
    fn snapshots(&self, model_id: &str) -> Vec<Snapshot>;
    fn plan_zoo(&self, plan: &ZooPlan, unit_specs: &[serde_json::Value]) -> ();
    fn zoo(&self, name: &str) -> Option<ZooPlan>;
    fn claim_unit(&self, zoo: &str, worker: &str, stale_before_ms: i64) -> Option<WorkUnit>;
    fn complete_unit(
        &self,
        zoo: &str,
        unit: u64,
        worker: &str,
        model: &ZooModelRecord,
        snapshots: &[Snapshot]
    ) -> InsertedModel;
    fn release_unit(&self, zoo: &str, unit: u64, worker: &str) -> ();
    fn release_claims_before(&self, zoo: &str, before_ms: i64) -> u64;
    fn zoo_progress(&self, zoo: &str) -> ZooProgress;
    fn insert_denoiser(&self, denoiser: &DenoiserRecord) -> ();
    fn denoiser(&self, id: &str) -> Option<DenoiserRecord>;
    fn denoisers(&self, architecture: Option<&str>, page: &PageRequest) -> Page<DenoiserRecord>;
    fn activate_denoiser(&self, id: &str) -> DenoiserRecord;
    fn active_denoiser(&self, architecture: &str) -> Option<DenoiserRecord>;
    fn referenced_blobs(&self) -> Vec<String>;
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_carry_no_credentials() {
        assert_eq!(
            redacted_location("postgres://user:secret@db.internal:5432/weightgen?sslmode=require"),
            "postgres://db.internal:5432/weightgen"
        );
        assert_eq!(
            redacted_location("postgres://127.0.0.1:5432/x"),
            "postgres://127.0.0.1:5432/x"
        );
        assert_eq!(
            redacted_location("sqlite:///tmp/c.db"),
            "sqlite:///tmp/c.db"
        );
    }
}
