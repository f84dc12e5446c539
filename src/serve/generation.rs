//! `weightgen.v1.GenerationService`: liveness, readiness and server metadata
//! now; GenerateInit and the denoiser metadata arrive with the sampler.

use std::pin::Pin;

use futures_util::Stream;
use tonic::{Request, Response, Status};

use super::readiness::Readiness;
use super::unimplemented::not_yet;
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
}

impl GenerationApi {
    /// A service reporting `info` and the readiness flag.
    pub fn new(info: ServerInfo, readiness: Readiness) -> Self {
        Self { info, readiness }
    }
}

/// The stream type of GenerateInit.
pub type GenerateInitStream =
    Pin<Box<dyn Stream<Item = Result<GenerateInitResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl GenerationService for GenerationApi {
    type GenerateInitStream = GenerateInitStream;

    async fn generate_init(
        &self,
        _request: Request<GenerateInitRequest>,
    ) -> Result<Response<Self::GenerateInitStream>, Status> {
        Err(not_yet("weightgen.v1.GenerationService/GenerateInit"))
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
        _request: Request<DenoiserReadyRequest>,
    ) -> Result<Response<DenoiserReadyResponse>, Status> {
        Err(not_yet("weightgen.v1.GenerationService/DenoiserReady"))
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
        _request: Request<ArchitectureMetadataRequest>,
    ) -> Result<Response<ArchitectureSpec>, Status> {
        Err(not_yet(
            "weightgen.v1.GenerationService/ArchitectureMetadata",
        ))
    }

    async fn denoiser_metadata(
        &self,
        _request: Request<DenoiserMetadataRequest>,
    ) -> Result<Response<DenoiserInfo>, Status> {
        Err(not_yet("weightgen.v1.GenerationService/DenoiserMetadata"))
    }
}
