//! `weightgen.v1.JobService`: submit, inspect and cancel the zoo-building
//! and training jobs that `weightgen-worker run` consumes from the catalog.
//! Specs are validated here, so a bad field is refused at submission with
//! INVALID_ARGUMENT naming it, not discovered by a worker later.

use std::sync::Arc;

use rand::Rng;
use tonic::{Request, Response, Status};

use super::convert::jobs::{
    train_spec_from_proto, train_spec_to_proto, zoo_spec_from_proto, zoo_spec_to_proto,
};
use super::status::{catalog_status, checked_name};
use crate::catalog::jobs::DEFAULT_MAX_ATTEMPTS;
use crate::catalog::{
    Catalog, JobFilter, JobKind, JobRecord, JobState, NewJob, PageRequest, now_ms,
};
use crate::jobs::{SpecError, TrainSpec, ZooSpec};
use crate::proto::v1::job_service_server::JobService;
use crate::proto::v1::{
    self as pb, BuildZooSpec, CancelJobRequest, GetJobRequest, Job, ListJobsRequest,
    ListJobsResponse, SubmitJobRequest, TrainDenoiserSpec,
};

/// The job service over the catalog's queue.
#[derive(Debug, Clone)]
pub struct JobsApi {
    catalog: Arc<dyn Catalog>,
}

impl JobsApi {
    /// The service for `catalog`.
    pub fn new(catalog: Arc<dyn Catalog>) -> Self {
        Self { catalog }
    }
}

fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {reason}"))
}

fn spec_invalid(e: SpecError) -> Status {
    invalid(&e.field, e.reason)
}

/// The stored spec of a BuildZoo request.
fn build_zoo_job(spec: &BuildZooSpec) -> Result<ZooSpec, Status> {
    let job = zoo_spec_from_proto(spec);
    job.validate().map_err(spec_invalid)?;
    Ok(job)
}

/// The stored spec of a TrainDenoiser request.
fn train_job(spec: &TrainDenoiserSpec) -> Result<TrainSpec, Status> {
    let job = train_spec_from_proto(spec).map_err(spec_invalid)?;
    job.validate().map_err(spec_invalid)?;
    Ok(job)
}

fn timestamp(ms: Option<i64>) -> Option<prost_types::Timestamp> {
    ms.map(super::convert::timestamp)
}

fn kind_to_proto(kind: JobKind) -> pb::JobKind {
    match kind {
        JobKind::BuildZoo => pb::JobKind::BuildZoo,
        JobKind::TrainDenoiser => pb::JobKind::TrainDenoiser,
    }
}

fn state_to_proto(state: JobState) -> pb::JobState {
    match state {
        JobState::Queued => pb::JobState::Queued,
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

/// A stored job as the API shows it.
pub fn job_to_proto(job: &JobRecord) -> Job {
    let spec = match job.kind {
        JobKind::BuildZoo => serde_json::from_value::<ZooSpec>(job.spec.clone())
            .ok()
            .map(|s| pb::job::Spec::BuildZoo(zoo_spec_to_proto(&s))),
        JobKind::TrainDenoiser => serde_json::from_value::<TrainSpec>(job.spec.clone())
            .ok()
            .map(|s| pb::job::Spec::TrainDenoiser(train_spec_to_proto(&s))),
    };
    Job {
        id: job.id.clone(),
        kind: kind_to_proto(job.kind) as i32,
        state: state_to_proto(job.state) as i32,
        spec,
        attempts: job.attempts,
        max_attempts: job.max_attempts,
        progress: job.progress,
        message: job.message.clone(),
        error: job.error.clone(),
        worker_id: job.worker.clone().unwrap_or_default(),
        created_at: timestamp(Some(job.created_at_ms)),
        started_at: timestamp(job.started_at_ms),
        finished_at: timestamp(job.finished_at_ms),
        heartbeat_at: timestamp(job.heartbeat_at_ms),
        denoiser_id: job.denoiser_id.clone().unwrap_or_default(),
        models_built: job.models_built,
    }
}

fn new_job_id() -> String {
    format!("job-{}-{:08x}", now_ms(), rand::rng().random::<u32>())
}

#[tonic::async_trait]
impl JobService for JobsApi {
    async fn submit_job(
        &self,
        request: Request<SubmitJobRequest>,
    ) -> Result<Response<Job>, Status> {
        let request = request.into_inner();
        let (kind, spec) = match &request.spec {
            Some(pb::submit_job_request::Spec::BuildZoo(spec)) => (
                JobKind::BuildZoo,
                serde_json::to_value(build_zoo_job(spec)?),
            ),
            Some(pb::submit_job_request::Spec::TrainDenoiser(spec)) => {
                let job = train_job(spec)?;
                // Checked again when training starts, for a zoo built later.
                let zoo = match &job.architecture {
                    None => None,
                    Some(_) => self.catalog.zoo(&job.zoo).await.map_err(catalog_status)?,
                };
                if let Some(zoo) =
                    zoo.filter(|z| Some(&z.architecture) != job.architecture.as_ref())
                {
                    return Err(invalid(
                        "train_denoiser.architecture",
                        format!(
                            "{:?}, but zoo {:?} holds {:?} models",
                            spec.architecture, job.zoo, zoo.architecture
                        ),
                    ));
                }
                (JobKind::TrainDenoiser, serde_json::to_value(job))
            }
            None => return Err(invalid("spec", "required: build_zoo or train_denoiser")),
        };
        let spec = spec.map_err(|e| Status::internal(e.to_string()))?;
        let job = NewJob {
            id: new_job_id(),
            kind,
            spec,
            max_attempts: if request.max_attempts == 0 {
                DEFAULT_MAX_ATTEMPTS
            } else {
                request.max_attempts
            },
            idempotency_key: (!request.idempotency_key.is_empty())
                .then_some(request.idempotency_key),
            // The worker's span of the job continues this call's trace.
            traceparent: crate::serve::trace_context::current_traceparent(),
        };
        let stored = self
            .catalog
            .submit_job(&job)
            .await
            .map_err(catalog_status)?;
        tracing::info!(job = %stored.id, kind = stored.kind.as_str(), "job submitted");
        Ok(Response::new(job_to_proto(&stored)))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let id = request.into_inner().id;
        checked_name("id", &id)?;
        match self.catalog.job(&id).await.map_err(catalog_status)? {
            Some(job) => Ok(Response::new(job_to_proto(&job))),
            None => Err(Status::not_found(format!("job {id:?} not found"))),
        }
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let request = request.into_inner();
        let kind = match pb::JobKind::try_from(request.kind) {
            Ok(pb::JobKind::Unspecified) => None,
            Ok(pb::JobKind::BuildZoo) => Some(JobKind::BuildZoo),
            Ok(pb::JobKind::TrainDenoiser) => Some(JobKind::TrainDenoiser),
            Err(_) => return Err(invalid("kind", format!("unknown value {}", request.kind))),
        };
        let state = match pb::JobState::try_from(request.state) {
            Ok(pb::JobState::Unspecified) => None,
            Ok(pb::JobState::Queued) => Some(JobState::Queued),
            Ok(pb::JobState::Running) => Some(JobState::Running),
            Ok(pb::JobState::Succeeded) => Some(JobState::Succeeded),
            Ok(pb::JobState::Failed) => Some(JobState::Failed),
            Ok(pb::JobState::Cancelled) => Some(JobState::Cancelled),
            Err(_) => return Err(invalid("state", format!("unknown value {}", request.state))),
        };
        let page = request.page.unwrap_or_default();
        let page = self
            .catalog
            .jobs(
                &JobFilter { kind, state },
                &PageRequest {
                    size: page.page_size,
                    token: page.page_token,
                },
            )
            .await
            .map_err(catalog_status)?;
        Ok(Response::new(ListJobsResponse {
            jobs: page.items.iter().map(job_to_proto).collect(),
            next_page_token: page.next_token,
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<CancelJobRequest>,
    ) -> Result<Response<Job>, Status> {
        let id = request.into_inner().id;
        checked_name("id", &id)?;
        let job = self.catalog.cancel_job(&id).await.map_err(catalog_status)?;
        Ok(Response::new(job_to_proto(&job)))
    }
}
