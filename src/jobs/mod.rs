//! `weightgen-worker run`: claims jobs from the catalog's queue and runs
//! them — zoo builds and denoiser training — one at a time, heartbeating
//! while it works. A failed attempt is recorded with its reason and queued
//! again until the job's attempt limit; a job whose worker died is claimed
//! again once its lease expires, and a training job then resumes from the
//! run's last checkpoint. A job cancelled (or whose lease was lost) stops at
//! the next safe point and is not finished by this worker.

pub mod spec;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::Instrument;

use tch::Device;

pub use spec::{SpecError, TrainSpec, ZooSpec};

use crate::blobs::BlobStore;
use crate::cancel::CancelFlag;
use crate::catalog::{Catalog, CatalogError, JobKind, JobOutcome, JobRecord, JobState, now_ms};
use crate::train::{run_state, train_denoiser};
use crate::zoo::build_zoo;

/// Default lease: a job whose worker has not heartbeated for this long is
/// taken over.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);
/// Default pause between claims when the queue is empty.
pub const DEFAULT_POLL: Duration = Duration::from_secs(2);

/// How the runner works.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// This worker's id (unique among live workers).
    pub worker: String,
    /// Lease length; heartbeats go out every third of it.
    pub lease: Duration,
    /// Pause between claims while idle.
    pub poll: Duration,
    /// Device jobs run on.
    pub device: Device,
    /// Models a zoo job trains at once.
    pub zoo_lanes: usize,
    /// Return once no job is queued or running anywhere.
    pub exit_when_idle: bool,
    /// Return after this many jobs.
    pub max_jobs: Option<usize>,
}

/// What the runner did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunnerReport {
    /// Attempts that succeeded.
    pub succeeded: usize,
    /// Attempts that failed (the job may be retried).
    pub failed: usize,
    /// Attempts abandoned: the job was cancelled or its lease lost.
    pub abandoned: usize,
}

/// Progress the heartbeat reports.
type Progress = Arc<Mutex<(f64, String)>>;

/// Runs jobs until `shutdown` resolves (the job in hand is abandoned to its
/// lease; a training job keeps its checkpoints), or until idle/`max_jobs`.
pub async fn run_jobs(
    catalog: Arc<dyn Catalog>,
    blobs: BlobStore,
    config: RunnerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<RunnerReport, CatalogError> {
    let mut report = RunnerReport::default();
    tokio::pin!(shutdown);
    loop {
        if config
            .max_jobs
            .is_some_and(|max| report_total(&report) >= max)
        {
            return Ok(report);
        }
        let stale_before = now_ms() - config.lease.as_millis() as i64;
        let Some(job) = catalog.claim_job(&config.worker, stale_before).await? else {
            if config.exit_when_idle && queue_is_empty(&catalog).await? {
                return Ok(report);
            }
            tokio::select! {
                () = &mut shutdown => return Ok(report),
                () = tokio::time::sleep(config.poll) => continue,
            }
        };
        tracing::info!(
            job = %job.id, kind = job.kind.as_str(), attempt = job.attempts,
            max_attempts = job.max_attempts, worker = %config.worker, "job claimed"
        );
        let cancel = CancelFlag::new();
        let progress: Progress = Arc::new(Mutex::new((0.0, "starting".to_owned())));
        let heartbeat = tokio::spawn(heartbeat(
            catalog.clone(),
            job.id.clone(),
            config.clone(),
            progress.clone(),
            cancel.clone(),
        ));
        let span = tracing::info_span!("job", job.id = %job.id, job.kind = ?job.kind);
        if let Some(traceparent) = &job.traceparent {
            crate::serve::trace_context::continue_trace(&span, traceparent);
        }
        let work = execute(&catalog, &blobs, &job, &config, &progress, &cancel).instrument(span);
        let result = tokio::select! {
            r = work => r,
            () = &mut shutdown => {
                cancel.cancel();
                heartbeat.abort();
                tracing::warn!(job = %job.id, "shutting down: job left to its lease");
                report.abandoned += 1;
                return Ok(report);
            }
        };
        heartbeat.abort();
        if cancel.is_cancelled() {
            tracing::warn!(job = %job.id, "job cancelled or lease lost: not finishing it");
            report.abandoned += 1;
            continue;
        }
        let outcome = match result {
            Ok(outcome) => {
                report.succeeded += 1;
                outcome
            }
            Err(error) => {
                tracing::error!(job = %job.id, %error, "job attempt failed");
                report.failed += 1;
                JobOutcome::Failed { error }
            }
        };
        match catalog.finish_job(&job.id, &config.worker, &outcome).await {
            Ok(done) => tracing::info!(job = %done.id, state = done.state.as_str(), "job finished"),
            Err(CatalogError::Conflict(reason)) => {
                tracing::warn!(job = %job.id, %reason, "job no longer ours");
            }
            Err(e) => return Err(e),
        }
    }
}

fn report_total(r: &RunnerReport) -> usize {
    r.succeeded + r.failed + r.abandoned
}

/// Whether no job is queued or running (a running one may come back when
/// its lease expires).
async fn queue_is_empty(catalog: &Arc<dyn Catalog>) -> Result<bool, CatalogError> {
    for state in [JobState::Queued, JobState::Running] {
        let filter = crate::catalog::JobFilter {
            kind: None,
            state: Some(state),
        };
        let page = catalog
            .jobs(&filter, &crate::catalog::PageRequest::first(1))
            .await?;
        if page.total > 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Renews the lease every third of it; sets `cancel` when the job is no
/// longer this worker's.
async fn heartbeat(
    catalog: Arc<dyn Catalog>,
    id: String,
    config: RunnerConfig,
    progress: Progress,
    cancel: CancelFlag,
) {
    let every = (config.lease / 3).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        let (fraction, message) = progress
            .lock()
            .map(|p| p.clone())
            .unwrap_or((0.0, String::new()));
        match catalog
            .heartbeat_job(&id, &config.worker, fraction, &message)
            .await
        {
            Ok(_) => {}
            Err(CatalogError::Conflict(reason))
            | Err(CatalogError::NotFound { id: reason, .. }) => {
                tracing::warn!(job = %id, %reason, "stopping the job");
                cancel.cancel();
                return;
            }
            Err(e) => tracing::warn!(job = %id, error = %e, "heartbeat failed; retrying"),
        }
    }
}

fn set_progress(progress: &Progress, fraction: f64, message: String) {
    if let Ok(mut p) = progress.lock() {
        *p = (fraction, message);
    }
}

/// Runs one attempt of `job`.
async fn execute(
    catalog: &Arc<dyn Catalog>,
    blobs: &BlobStore,
    job: &JobRecord,
    config: &RunnerConfig,
    progress: &Progress,
    cancel: &CancelFlag,
) -> Result<JobOutcome, String> {
    match job.kind {
        JobKind::BuildZoo => {
            let spec: ZooSpec =
                serde_json::from_value(job.spec.clone()).map_err(|e| format!("spec: {e}"))?;
            let build = spec
                .to_config(
                    &config.worker,
                    config.zoo_lanes,
                    config.lease,
                    config.device,
                    cancel.clone(),
                )
                .map_err(|e| e.to_string())?;
            // Zoo models are tiny: one intra-op thread per model.
            tch::set_num_threads(1);
            let shown = progress.clone();
            let report = build_zoo(catalog.clone(), blobs.clone(), build, move |r| {
                let fraction = r.done as f64 / r.total.max(1) as f64;
                set_progress(&shown, fraction, format!("{}/{} models", r.done, r.total));
            })
            .await
            .map_err(|e| e.to_string())?;
            if report.done < report.total && !cancel.is_cancelled() {
                return Err(format!(
                    "zoo {:?} has {}/{} models: units failed or are held by other workers",
                    spec.zoo_name(),
                    report.done,
                    report.total
                ));
            }
            Ok(JobOutcome::Succeeded {
                denoiser_id: None,
                models_built: report.done,
            })
        }
        JobKind::TrainDenoiser => {
            let spec: TrainSpec =
                serde_json::from_value(job.spec.clone()).map_err(|e| format!("spec: {e}"))?;
            let denoiser_id = spec
                .denoiser_id
                .clone()
                .unwrap_or_else(|| format!("{}-{}", spec.zoo, job.id));
            if catalog
                .denoiser(&denoiser_id)
                .await
                .map_err(|e| e.to_string())?
                .is_some()
            {
                // An earlier attempt published it and died before finishing the job.
                run_state::clear(blobs, &denoiser_id)
                    .await
                    .map_err(|e| e.to_string())?;
                return Ok(JobOutcome::Succeeded {
                    denoiser_id: Some(denoiser_id),
                    models_built: 0,
                });
            }
            let train = spec
                .to_config(&denoiser_id, config.device, true, cancel.clone())
                .map_err(|e| e.to_string())?;
            tch::set_num_threads(std::thread::available_parallelism().map_or(1, |n| n.get()) as i32);
            let steps = train.fit.steps;
            let shown = progress.clone();
            let outcome = train_denoiser(
                catalog.clone(),
                blobs.clone(),
                train,
                move |step, loss, val| {
                    set_progress(
                        &shown,
                        step as f64 / steps.max(1) as f64,
                        format!("step {step}/{steps} loss {loss:.4} val {val:.4}"),
                    );
                },
            )
            .await
            .map_err(|e| e.to_string())?;
            Ok(JobOutcome::Succeeded {
                denoiser_id: Some(outcome.record.id),
                models_built: 0,
            })
        }
    }
}
