//! The job queue in the catalog: zoo-building and training jobs that
//! clients submit and `weightgen-worker run` consumes. A worker claims a job
//! (one statement; `FOR UPDATE SKIP LOCKED` on PostgreSQL), heartbeats while
//! it works, and finishes it; a failed attempt is queued again until its
//! attempt limit, and a job whose worker stopped heartbeating (its lease
//! expired) is claimed again by the next worker.

use serde::{Deserialize, Serialize};

use super::{CatalogError, Page, PageRequest};

/// Attempts a job gets when the submitter does not say.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Most attempts a submitter may ask for.
pub const MAX_ATTEMPTS_LIMIT: u32 = 100;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Build (or finish building) a zoo.
    BuildZoo,
    /// Train and publish a denoiser.
    TrainDenoiser,
}

impl JobKind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BuildZoo => "build_zoo",
            Self::TrainDenoiser => "train_denoiser",
        }
    }

    /// Parses a stored name.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "build_zoo" => Some(Self::BuildZoo),
            "train_denoiser" => Some(Self::TrainDenoiser),
            _ => None,
        }
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a worker (also after a failed attempt with attempts left).
    Queued,
    /// Held by a worker's lease.
    Running,
    /// Done; the result is recorded.
    Succeeded,
    /// Out of attempts; `error` says why the last one failed.
    Failed,
    /// Cancelled by a client.
    Cancelled,
}

impl JobState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses a stored name.
    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::Queued,
            Self::Running,
            Self::Succeeded,
            Self::Failed,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }

    /// Whether the job can still change.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// A job to queue.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    /// Its id (unique).
    pub id: String,
    /// What it does.
    pub kind: JobKind,
    /// Its parameters (the kind's spec as JSON).
    pub spec: serde_json::Value,
    /// Attempts before it fails for good (1..=MAX_ATTEMPTS_LIMIT).
    pub max_attempts: u32,
    /// Makes resubmission safe: a second job with the same key is not
    /// created; the first comes back.
    pub idempotency_key: Option<String>,
    /// The W3C `traceparent` of the submitting call's span: the worker's
    /// span of the job continues that trace.
    pub traceparent: Option<String>,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    /// Its id.
    pub id: String,
    /// What it does.
    pub kind: JobKind,
    /// Where it is.
    pub state: JobState,
    /// Its parameters.
    pub spec: serde_json::Value,
    /// The submitter's idempotency key.
    pub idempotency_key: Option<String>,
    /// The submitting call's W3C `traceparent`, when it was traced.
    pub traceparent: Option<String>,
    /// Attempts started so far.
    pub attempts: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Progress in [0, 1] reported by the worker.
    pub progress: f64,
    /// The worker's last status line.
    pub message: String,
    /// Why the last attempt failed ("" if none did).
    pub error: String,
    /// Worker holding (or that last held) the lease.
    pub worker: Option<String>,
    /// Result of a training job: the published denoiser.
    pub denoiser_id: Option<String>,
    /// Result of a zoo job: models built.
    pub models_built: u64,
    /// Unix ms.
    pub created_at_ms: i64,
    /// When the first attempt started.
    pub started_at_ms: Option<i64>,
    /// When it reached a final state.
    pub finished_at_ms: Option<i64>,
    /// Last heartbeat of the worker holding it.
    pub heartbeat_at_ms: Option<i64>,
}

/// Which jobs to list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobFilter {
    /// Only this kind.
    pub kind: Option<JobKind>,
    /// Only this state.
    pub state: Option<JobState>,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum JobOutcome {
    /// It did its work.
    Succeeded {
        /// The denoiser a training job published.
        denoiser_id: Option<String>,
        /// Models a zoo job built.
        models_built: u64,
    },
    /// It failed; the job is queued again while attempts remain.
    Failed {
        /// Why.
        error: String,
    },
}

/// The job queue's operations, the same on every backend.
#[async_trait::async_trait]
pub trait JobQueue: Send + Sync {
    /// Queues a job. With an idempotency key already used for the same kind
    /// and spec, returns that job; for a different one, an error.
    async fn submit_job(&self, job: &NewJob) -> Result<JobRecord, CatalogError>;
    /// One job.
    async fn job(&self, id: &str) -> Result<Option<JobRecord>, CatalogError>;
    /// Jobs, newest first, filtered and paged.
    async fn jobs(
        &self,
        filter: &JobFilter,
        page: &PageRequest,
    ) -> Result<Page<JobRecord>, CatalogError>;
    /// Claims the oldest job `worker` may run: a queued one, or a running one
    /// whose last heartbeat is older than `stale_before_ms` (its worker
    /// died). A stale job out of attempts is failed instead. Never the same
    /// job to two workers at once.
    async fn claim_job(
        &self,
        worker: &str,
        stale_before_ms: i64,
    ) -> Result<Option<JobRecord>, CatalogError>;
    /// Renews `worker`'s lease on a running job and records its progress.
    /// `Conflict` when the worker no longer holds it (cancelled, or its
    /// lease expired and another worker took it): the worker must stop.
    async fn heartbeat_job(
        &self,
        id: &str,
        worker: &str,
        progress: f64,
        message: &str,
    ) -> Result<JobRecord, CatalogError>;
    /// Ends `worker`'s attempt. `Conflict` when it no longer holds the job.
    async fn finish_job(
        &self,
        id: &str,
        worker: &str,
        outcome: &JobOutcome,
    ) -> Result<JobRecord, CatalogError>;
    /// Cancels a queued or running job; a finished one comes back unchanged.
    async fn cancel_job(&self, id: &str) -> Result<JobRecord, CatalogError>;
}

/// Checks a new job's fields.
pub(crate) fn validate_new_job(job: &NewJob) -> Result<(), CatalogError> {
    super::sql::check_id("id", &job.id)?;
    if !(1..=MAX_ATTEMPTS_LIMIT).contains(&job.max_attempts) {
        return Err(CatalogError::InvalidArgument {
            field: "max_attempts",
            reason: format!("{} is not in 1..={MAX_ATTEMPTS_LIMIT}", job.max_attempts),
        });
    }
    if let Some(key) = &job.idempotency_key {
        super::sql::check_id("idempotency_key", key)?;
    }
    if let Some(traceparent) = &job.traceparent {
        // W3C: "00-" 32 hex "-" 16 hex "-" 2 hex; later versions may be longer.
        if traceparent.len() > 128 || !traceparent.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(CatalogError::InvalidArgument {
                field: "traceparent",
                reason: "must be a W3C traceparent (printable ASCII, at most 128 bytes)".to_owned(),
            });
        }
    }
    if !job.spec.is_object() {
        return Err(CatalogError::InvalidArgument {
            field: "spec",
            reason: "must be a JSON object".to_owned(),
        });
    }
    Ok(())
}

/// Columns of a job row, in `job_from_row` order.
pub(crate) const JOB_COLUMNS: &str = "id, kind, state, spec_json, idempotency_key, attempts, \
     max_attempts, progress, message, error, worker, denoiser_id, models_built, created_at_ms, \
     started_at_ms, finished_at_ms, heartbeat_at_ms, traceparent";

/// Implements `JobQueue` for `$ty` (a struct with `pool: sqlx::Pool<$db>`),
/// with `$lock` appended to the claim's inner SELECT.
macro_rules! impl_job_queue {
    ($ty:ty, $db:ty, lock = $lock:literal) => {
        const _: () = {
            use sqlx::Row as _;

            use crate::catalog::jobs::{
                JOB_COLUMNS, JobFilter, JobKind, JobOutcome, JobQueue, JobRecord, JobState,
                NewJob, validate_new_job,
            };
            use crate::catalog::records::Cursor;
            use crate::catalog::sql::{check_id, paged, parse_json};
            use crate::catalog::{CatalogError, Page, PageRequest, now_ms};

            type DbRow = <$db as sqlx::Database>::Row;

            fn job_from_row(row: &DbRow) -> Result<JobRecord, CatalogError> {
                let id: String = row.try_get("id")?;
                let corrupt = |column: &str, value: String| CatalogError::Corrupt {
                    id: id.clone(),
                    reason: format!("{column}: unknown value {value:?}"),
                };
                let kind: String = row.try_get("kind")?;
                let state: String = row.try_get("state")?;
                Ok(JobRecord {
                    kind: JobKind::parse(&kind).ok_or_else(|| corrupt("kind", kind.clone()))?,
                    state: JobState::parse(&state).ok_or_else(|| corrupt("state", state.clone()))?,
                    spec: parse_json(&row.try_get::<String, _>("spec_json")?, &id, "spec_json")?,
                    idempotency_key: row.try_get("idempotency_key")?,
                    traceparent: row.try_get("traceparent")?,
                    attempts: row.try_get::<i64, _>("attempts")? as u32,
                    max_attempts: row.try_get::<i64, _>("max_attempts")? as u32,
                    progress: row.try_get("progress")?,
                    message: row.try_get("message")?,
                    error: row.try_get("error")?,
                    worker: row.try_get("worker")?,
                    denoiser_id: row.try_get("denoiser_id")?,
                    models_built: row.try_get::<i64, _>("models_built")? as u64,
                    created_at_ms: row.try_get("created_at_ms")?,
                    started_at_ms: row.try_get("started_at_ms")?,
                    finished_at_ms: row.try_get("finished_at_ms")?,
                    heartbeat_at_ms: row.try_get("heartbeat_at_ms")?,
                    id,
                })
            }

            impl $ty {
                async fn fetch_job(&self, id: &str) -> Result<Option<JobRecord>, CatalogError> {
                    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
                    sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(id)
                        .fetch_optional(&self.pool)
                        .await?
                        .as_ref()
                        .map(job_from_row)
                        .transpose()
                }

                /// Why `worker` cannot update job `id` (it is not running
                /// under that worker).
                async fn not_held(&self, id: &str, worker: &str) -> CatalogError {
                    match self.fetch_job(id).await {
                        Ok(None) => CatalogError::NotFound { what: "job", id: id.to_owned() },
                        Ok(Some(job)) if job.state == JobState::Cancelled => {
                            CatalogError::Conflict(format!("job {id:?} was cancelled"))
                        }
                        Ok(Some(job)) => CatalogError::Conflict(format!(
                            "job {id:?} is {} and held by {:?}, not by worker {worker:?} \
                             (its lease expired?)",
                            job.state.as_str(),
                            job.worker.as_deref().unwrap_or("nobody")
                        )),
                        Err(e) => e,
                    }
                }
            }

            #[async_trait::async_trait]
            impl JobQueue for $ty {
                async fn submit_job(&self, job: &NewJob) -> Result<JobRecord, CatalogError> {
                    validate_new_job(job)?;
                    let spec = serde_json::to_string(&job.spec).unwrap_or_default();
                    let inserted = sqlx::query(
                        "INSERT INTO jobs (id, kind, state, spec_json, idempotency_key, \
                         max_attempts, created_at_ms, traceparent) \
                         VALUES ($1, $2, 'queued', $3, $4, $5, $6, $7) \
                         ON CONFLICT (idempotency_key) DO NOTHING",
                    )
                    .bind(&job.id)
                    .bind(job.kind.as_str())
                    .bind(&spec)
                    .bind(job.idempotency_key.as_deref())
                    .bind(i64::from(job.max_attempts))
                    .bind(now_ms())
                    .bind(job.traceparent.as_deref())
                    .execute(&self.pool)
                    .await
                    .map_err(|e| match e {
                        sqlx::Error::Database(db) if db.is_unique_violation() => {
                            CatalogError::Conflict(format!("job {:?} already exists", job.id))
                        }
                        other => other.into(),
                    })?
                    .rows_affected();
                    if inserted == 1 {
                        return self.fetch_job(&job.id).await?.ok_or_else(|| {
                            CatalogError::NotFound { what: "job", id: job.id.clone() }
                        });
                    }
                    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE idempotency_key = $1");
                    let existing = sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(job.idempotency_key.as_deref())
                        .fetch_one(&self.pool)
                        .await?;
                    let existing = job_from_row(&existing)?;
                    if existing.kind != job.kind || existing.spec != job.spec {
                        return Err(CatalogError::InvalidArgument {
                            field: "idempotency_key",
                            reason: format!(
                                "already used by job {:?} with a different spec",
                                existing.id
                            ),
                        });
                    }
                    Ok(existing)
                }

                async fn job(&self, id: &str) -> Result<Option<JobRecord>, CatalogError> {
                    self.fetch_job(id).await
                }

                async fn jobs(
                    &self,
                    filter: &JobFilter,
                    page: &PageRequest,
                ) -> Result<Page<JobRecord>, CatalogError> {
                    let limit = page.limit()?;
                    let cursor = page.cursor()?;
                    let kind = filter.kind.map(JobKind::as_str);
                    let state = filter.state.map(JobState::as_str);
                    let sql = format!(
                        "SELECT {JOB_COLUMNS} FROM jobs \
                         WHERE ($1 IS NULL OR kind = $1) AND ($2 IS NULL OR state = $2) \
                         AND ($3 IS NULL OR created_at_ms < $3 OR (created_at_ms = $3 AND id < $4)) \
                         ORDER BY created_at_ms DESC, id DESC LIMIT $5"
                    );
                    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(kind)
                        .bind(state)
                        .bind(cursor.as_ref().map(|c| c.created_at_ms))
                        .bind(cursor.as_ref().map(|c| c.id.as_str()).unwrap_or(""))
                        .bind(limit + 1)
                        .fetch_all(&self.pool)
                        .await?;
                    let total: i64 = sqlx::query_scalar(
                        "SELECT COUNT(*) FROM jobs \
                         WHERE ($1 IS NULL OR kind = $1) AND ($2 IS NULL OR state = $2)",
                    )
                    .bind(kind)
                    .bind(state)
                    .fetch_one(&self.pool)
                    .await?;
                    let items = rows.iter().map(job_from_row).collect::<Result<Vec<_>, _>>()?;
                    Ok(paged(items, limit, total, |j: &JobRecord| Cursor {
                        created_at_ms: j.created_at_ms,
                        id: j.id.clone(),
                    }))
                }

                async fn claim_job(
                    &self,
                    worker: &str,
                    stale_before_ms: i64,
                ) -> Result<Option<JobRecord>, CatalogError> {
                    check_id("worker", worker)?;
                    let now = now_ms();
                    // A dead worker's job with no attempts left fails for good.
                    sqlx::query(
                        "UPDATE jobs SET state = 'failed', finished_at_ms = $1, \
                         version = version + 1, \
                         error = 'lease expired: its worker stopped heartbeating (attempt ' \
                           || attempts || ' of ' || max_attempts || '); last error: ' || error \
                         WHERE state = 'running' AND heartbeat_at_ms < $2 \
                           AND attempts >= max_attempts",
                    )
                    .bind(now)
                    .bind(stale_before_ms)
                    .execute(&self.pool)
                    .await?;
                    let sql = format!(
                        "UPDATE jobs SET state = 'running', worker = $1, attempts = attempts + 1, \
                         started_at_ms = COALESCE(started_at_ms, $2), heartbeat_at_ms = $2, \
                         version = version + 1 \
                         WHERE id = (SELECT id FROM jobs WHERE state = 'queued' \
                           OR (state = 'running' AND heartbeat_at_ms < $3 \
                               AND attempts < max_attempts) \
                           ORDER BY created_at_ms, id LIMIT 1 {}) \
                         RETURNING {JOB_COLUMNS}",
                        $lock
                    );
                    sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(worker)
                        .bind(now)
                        .bind(stale_before_ms)
                        .fetch_optional(&self.pool)
                        .await?
                        .as_ref()
                        .map(job_from_row)
                        .transpose()
                }

                async fn heartbeat_job(
                    &self,
                    id: &str,
                    worker: &str,
                    progress: f64,
                    message: &str,
                ) -> Result<JobRecord, CatalogError> {
                    let progress = if progress.is_finite() { progress.clamp(0.0, 1.0) } else { 0.0 };
                    let sql = format!(
                        "UPDATE jobs SET heartbeat_at_ms = $3, progress = $4, message = $5, \
                         version = version + 1 \
                         WHERE id = $1 AND state = 'running' AND worker = $2 \
                         RETURNING {JOB_COLUMNS}"
                    );
                    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(id)
                        .bind(worker)
                        .bind(now_ms())
                        .bind(progress)
                        .bind(message)
                        .fetch_optional(&self.pool)
                        .await?;
                    match row {
                        Some(row) => job_from_row(&row),
                        None => Err(self.not_held(id, worker).await),
                    }
                }

                async fn finish_job(
                    &self,
                    id: &str,
                    worker: &str,
                    outcome: &JobOutcome,
                ) -> Result<JobRecord, CatalogError> {
                    let now = now_ms();
                    let row = match outcome {
                        JobOutcome::Succeeded { denoiser_id, models_built } => {
                            let sql = format!(
                                "UPDATE jobs SET state = 'succeeded', finished_at_ms = $3, \
                                 heartbeat_at_ms = $3, progress = 1, denoiser_id = $4, \
                                 models_built = $5, error = '', version = version + 1 \
                                 WHERE id = $1 AND state = 'running' AND worker = $2 \
                                 RETURNING {JOB_COLUMNS}"
                            );
                            sqlx::query(sqlx::AssertSqlSafe(sql))
                                .bind(id)
                                .bind(worker)
                                .bind(now)
                                .bind(denoiser_id.as_deref())
                                .bind(*models_built as i64)
                                .fetch_optional(&self.pool)
                                .await?
                        }
                        JobOutcome::Failed { error } => {
                            // Attempts left: queued again (another worker, or
                            // this one, retries it); otherwise failed for good.
                            let sql = format!(
                                "UPDATE jobs SET \
                                 state = CASE WHEN attempts < max_attempts THEN 'queued' ELSE 'failed' END, \
                                 finished_at_ms = CASE WHEN attempts < max_attempts THEN NULL ELSE $3 END, \
                                 heartbeat_at_ms = $3, error = $4, version = version + 1 \
                                 WHERE id = $1 AND state = 'running' AND worker = $2 \
                                 RETURNING {JOB_COLUMNS}"
                            );
                            sqlx::query(sqlx::AssertSqlSafe(sql))
                                .bind(id)
                                .bind(worker)
                                .bind(now)
                                .bind(error)
                                .fetch_optional(&self.pool)
                                .await?
                        }
                    };
                    match row {
                        Some(row) => job_from_row(&row),
                        None => Err(self.not_held(id, worker).await),
                    }
                }

                async fn cancel_job(&self, id: &str) -> Result<JobRecord, CatalogError> {
                    let sql = format!(
                        "UPDATE jobs SET state = 'cancelled', finished_at_ms = $2, \
                         version = version + 1 \
                         WHERE id = $1 AND state IN ('queued', 'running') \
                         RETURNING {JOB_COLUMNS}"
                    );
                    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(id)
                        .bind(now_ms())
                        .fetch_optional(&self.pool)
                        .await?;
                    match row {
                        Some(row) => job_from_row(&row),
                        None => self.fetch_job(id).await?.ok_or_else(|| {
                            CatalogError::NotFound { what: "job", id: id.to_owned() }
                        }),
                    }
                }
            }
        };
    };
}
pub(crate) use impl_job_queue;
