//! `weightgen.v1.CatalogService`. Its logic arrives with the catalog and blob
//! store; until then every RPC answers UNIMPLEMENTED.

use std::pin::Pin;

use futures_util::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::unimplemented::not_yet;
use crate::proto::v1::catalog_service_server::CatalogService;
use crate::proto::v1::{
    ActivateDenoiserRequest, DenoiserInfo, DownloadCheckpointRequest, DownloadCheckpointResponse,
    GetDenoiserRequest, GetZooModelRequest, ListArchitecturesRequest, ListArchitecturesResponse,
    ListDenoisersRequest, ListDenoisersResponse, ListZooModelsRequest, ListZooModelsResponse,
    UploadCheckpointRequest, UploadCheckpointResponse, ZooModel,
};

/// The catalog service.
#[derive(Debug, Clone, Default)]
pub struct CatalogApi;

/// The stream type of DownloadCheckpoint.
pub type DownloadStream =
    Pin<Box<dyn Stream<Item = Result<DownloadCheckpointResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl CatalogService for CatalogApi {
    type DownloadCheckpointStream = DownloadStream;

    async fn list_architectures(
        &self,
        _request: Request<ListArchitecturesRequest>,
    ) -> Result<Response<ListArchitecturesResponse>, Status> {
        Err(not_yet("weightgen.v1.CatalogService/ListArchitectures"))
    }

    async fn get_zoo_model(
        &self,
        _request: Request<GetZooModelRequest>,
    ) -> Result<Response<ZooModel>, Status> {
        Err(not_yet("weightgen.v1.CatalogService/GetZooModel"))
    }

    async fn list_zoo_models(
        &self,
        _request: Request<ListZooModelsRequest>,
    ) -> Result<Response<ListZooModelsResponse>, Status> {
        Err(not_yet("weightgen.v1.CatalogService/ListZooModels"))
    }

    async fn download_checkpoint(
        &self,
        _request: Request<DownloadCheckpointRequest>,
    ) -> Result<Response<Self::DownloadCheckpointStream>, Status> {
        Err(not_yet("weightgen.v1.CatalogService/DownloadCheckpoint"))
    }

    async fn upload_checkpoint(
        &self,
        _request: Request<Streaming<UploadCheckpointRequest>>,
    ) -> Result<Response<UploadCheckpointResponse>, Status> {
        Err(not_yet("weightgen.v1.CatalogService/UploadCheckpoint"))
    }

    async fn list_denoisers(
        &self,
        _request: Request<ListDenoisersRequest>,
    ) -> Result<Response<ListDenoisersResponse>, Status> {
        Err(not_yet("weightgen.v1.CatalogService/ListDenoisers"))
    }

    async fn get_denoiser(
        &self,
        _request: Request<GetDenoiserRequest>,
    ) -> Result<Response<DenoiserInfo>, Status> {
        Err(not_yet("weightgen.v1.CatalogService/GetDenoiser"))
    }

    async fn activate_denoiser(
        &self,
        _request: Request<ActivateDenoiserRequest>,
    ) -> Result<Response<DenoiserInfo>, Status> {
        Err(not_yet("weightgen.v1.CatalogService/ActivateDenoiser"))
    }
}
