//! `weightgen.v1.JobService`. Its logic arrives with the job queue; until
//! then every RPC answers UNIMPLEMENTED.

use tonic::{Request, Response, Status};

use super::unimplemented::not_yet;
use crate::proto::v1::job_service_server::JobService;
use crate::proto::v1::{
    CancelJobRequest, GetJobRequest, Job, ListJobsRequest, ListJobsResponse, SubmitJobRequest,
};

/// The job service.
#[derive(Debug, Clone, Default)]
pub struct JobsApi;

#[tonic::async_trait]
impl JobService for JobsApi {
    async fn submit_job(
        &self,
        _request: Request<SubmitJobRequest>,
    ) -> Result<Response<Job>, Status> {
        Err(not_yet("weightgen.v1.JobService/SubmitJob"))
    }

    async fn get_job(&self, _request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        Err(not_yet("weightgen.v1.JobService/GetJob"))
    }

    async fn list_jobs(
        &self,
        _request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        Err(not_yet("weightgen.v1.JobService/ListJobs"))
    }

    async fn cancel_job(
        &self,
        _request: Request<CancelJobRequest>,
    ) -> Result<Response<Job>, Status> {
        Err(not_yet("weightgen.v1.JobService/CancelJob"))
    }
}
