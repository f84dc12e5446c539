//! `weightgen.v1.GenerationService`: GenerateInit on the served denoisers,
//! liveness, readiness, and server, architecture and denoiser metadata.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures_util::Stream;
use tonic::{Request, Response, Status};

use super::auth::{Caller, Metered, Quotas};
use super::convert::{
    arch_to_proto, denoiser_record_to_proto, schema_to_proto, served_arch_to_proto,
};
use super::denoisers::{DenoiserRegistry, LoadedDenoiser};
use super::generate_init::{denoiser_for, generate, job_for, sampling_defaults};
use super::readiness::Readiness;
use super::status::{bounded_name, catalog_status, checked_name};
use crate::catalog::Catalog;
use crate::proto::v1::generation_service_server::GenerationService;
use crate::proto::v1::{
    ArchitectureMetadataRequest, ArchitectureSpec, DenoiserInfo, DenoiserMetadataRequest,
    DenoiserReadyRequest, DenoiserReadyResponse, GenerateInitRequest, GenerateInitResponse,
    ServerLiveRequest, ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse,
    ServerReadyRequest, ServerReadyResponse,
};
use crate::torch_info::TorchInfo;

/// Facts about this server that ServerMetadata reports.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    /// libtorch facts.
    pub torch: TorchInfo,
    /// Device denoisers run on ("cpu", "cuda:0").
    pub device: String,
}

/// The generation service.
#[derive(Debug, Clone)]
pub struct GenerationApi {
    info: ServerInfo,
    readiness: Readiness,
    registry: Arc<DenoiserRegistry>,
    catalog: Arc<dyn Catalog>,
    max_samples: u32,
    quotas: Quotas,
}

impl GenerationApi {
    /// A service over the served denoisers of `registry`.
    pub fn new(
        info: ServerInfo,
        readiness: Readiness,
        registry: Arc<DenoiserRegistry>,
        catalog: Arc<dyn Catalog>,
        max_samples: u32,
        quotas: Quotas,
    ) -> Self {
        Self {
            info,
            readiness,
            registry,
            catalog,
            max_samples,
            quotas,
        }
    }

    /// The denoiser a metadata request names: its id, or the active one of
    /// its architecture.
    fn named(
        &self,
        architecture: &str,
        denoiser_id: &str,
    ) -> Result<Option<Arc<LoadedDenoiser>>, Status> {
        bounded_name("denoiser_id", denoiser_id)?;
        if !denoiser_id.is_empty() {
            return Ok(self.registry.by_id(denoiser_id));
        }
        if architecture.is_empty() {
            return Err(Status::invalid_argument(
                "architecture: required when denoiser_id is empty",
            ));
        }
        bounded_name("architecture", architecture)?;
        Ok(self.registry.active(architecture))
    }
}

/// The stream type of GenerateInit.
pub type GenerateInitStream =
    Pin<Box<dyn Stream<Item = Result<GenerateInitResponse, Status>> + Send + 'static>>;

/// What DenoiserMetadata reports about a loaded denoiser: its row, with
/// what its checkpoint holds.
pub fn denoiser_info(d: &LoadedDenoiser) -> DenoiserInfo {
    let facts = &d.facts;
    let (sampler, steps, guidance) = sampling_defaults(facts.recommended, facts.timesteps);
    DenoiserInfo {
        active: true,
        feature_schema: Some(schema_to_proto(&facts.schema)),
        timesteps: facts.timesteps as u32,
        schedule: facts.schedule.clone(),
        kind: facts.kind.clone(),
        latent_dim: facts.latent_dim as u32,
        latent_space: facts.latent_space.clone(),
        default_sampler: sampler as i32,
        default_steps: steps as u32,
        default_guidance: guidance as f32,
        ..denoiser_record_to_proto(&d.record, d.version)
    }
}

#[tonic::async_trait]
impl GenerationService for GenerationApi {
    type GenerateInitStream = GenerateInitStream;

    async fn generate_init(
        &self,
        request: Request<GenerateInitRequest>,
    ) -> Result<Response<Self::GenerateInitStream>, Status> {
        let received = Instant::now();
        let caller = request.extensions().get::<Caller>().cloned();
        let request = request.into_inner();
        let denoiser = denoiser_for(&self.registry, &self.catalog, &request).await?;
        let (job, choice) = job_for(&request, &denoiser, self.max_samples)?;
        if let Some(caller) = &caller {
            let samples = u64::from(choice.num_samples);
            self.quotas.spend(caller, Metered::Samples, samples)?;
        }
        let messages = generate(denoiser, job, choice, received).await?;
        Ok(Response::new(Box::pin(messages)))
    }

    async fn server_live(
        &self,
        _request: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _request: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.readiness.is_ready(),
        }))
    }

    async fn denoiser_ready(
        &self,
        request: Request<DenoiserReadyRequest>,
    ) -> Result<Response<DenoiserReadyResponse>, Status> {
        let request = request.into_inner();
        let ready = self
            .named(&request.architecture, &request.denoiser_id)?
            .is_some();
        Ok(Response::new(DenoiserReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _request: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "weightgen".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            torch_version: self.info.torch.version.to_owned(),
            device: self.info.device.clone(),
            cuda_available: self.info.torch.cuda_available,
            extensions: Vec::new(),
        }))
    }

    async fn architecture_metadata(
        &self,
        request: Request<ArchitectureMetadataRequest>,
    ) -> Result<Response<ArchitectureSpec>, Status> {
        let name = request.into_inner().name;
        checked_name("name", &name)?;
        // A served architecture as its denoiser serves it (with its base
        // model, for adapters); else the catalog's.
        if let Some(loaded) = self.registry.active(&name) {
            return Ok(Response::new(served_arch_to_proto(&loaded)));
        }
        match self
            .catalog
            .architecture(&name)
            .await
            .map_err(catalog_status)?
        {
            Some(arch) => Ok(Response::new(arch_to_proto(&arch))),
            None => Err(Status::not_found(format!(
                "architecture {name:?} not found"
            ))),
        }
    }

    async fn denoiser_metadata(
        &self,
        request: Request<DenoiserMetadataRequest>,
    ) -> Result<Response<DenoiserInfo>, Status> {
        let request = request.into_inner();
        match self.named(&request.architecture, &request.denoiser_id)? {
            Some(loaded) => Ok(Response::new(denoiser_info(&loaded))),
            None if !request.denoiser_id.is_empty() => Err(Status::not_found(format!(
                "denoiser_id: {:?} is not loaded on this server",
                request.denoiser_id
            ))),
            None => Err(Status::not_found(format!(
                "architecture: no denoiser is loaded for {:?}",
                request.architecture
            ))),
        }
    }
}
