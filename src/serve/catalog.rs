//! `weightgen.v1.CatalogService`: denoiser versions (list, get, activate —
//! earlier versions stay listed and can be re-activated; running servers
//! swap the activated one in). The zoo-model RPCs answer UNIMPLEMENTED until
//! their issue lands.

use std::pin::Pin;

use futures_util::Stream;
use tonic::{Request, Response, Status, Streaming};

use std::sync::Arc;

use super::convert::denoiser_record_to_proto;
use super::denoisers::version_of;
use super::status::catalog_status;
use super::unimplemented::not_yet;
use crate::catalog::{Catalog, DenoiserRecord, PageRequest};
use crate::proto::v1::catalog_service_server::CatalogService;
use crate::proto::v1::{
    ActivateDenoiserRequest, DenoiserInfo, DownloadCheckpointRequest, DownloadCheckpointResponse,
    GetDenoiserRequest, GetZooModelRequest, ListArchitecturesRequest, ListArchitecturesResponse,
    ListDenoisersRequest, ListDenoisersResponse, ListZooModelsRequest, ListZooModelsResponse,
    UploadCheckpointRequest, UploadCheckpointResponse, ZooModel,
};

/// The catalog service.
#[derive(Debug, Clone)]
pub struct CatalogApi {
    catalog: Arc<dyn Catalog>,
}

impl CatalogApi {
    /// The service over `catalog`.
    pub fn new(catalog: Arc<dyn Catalog>) -> Self {
        Self { catalog }
    }

    async fn info(&self, record: &DenoiserRecord) -> Result<DenoiserInfo, Status> {
        let version = version_of(&self.catalog, record)
            .await
            .map_err(catalog_status)?;
        Ok(denoiser_record_to_proto(record, version))
    }
}

fn required_id(id: &str) -> Result<(), Status> {
    if id.is_empty() {
        Err(Status::invalid_argument("id: required"))
    } else {
        Ok(())
    }
}

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
        request: Request<ListDenoisersRequest>,
    ) -> Result<Response<ListDenoisersResponse>, Status> {
        let request = request.into_inner();
        let page = request.page.unwrap_or_default();
        let architecture =
            (!request.architecture.is_empty()).then_some(request.architecture.as_str());
        let listed = self
            .catalog
            .denoisers(
                architecture,
                &PageRequest {
                    size: page.page_size,
                    token: page.page_token,
                },
            )
            .await
            .map_err(catalog_status)?;
        let mut denoisers = Vec::with_capacity(listed.items.len());
        for record in &listed.items {
            denoisers.push(self.info(record).await?);
        }
        Ok(Response::new(ListDenoisersResponse {
            denoisers,
            next_page_token: listed.next_token,
        }))
    }

    async fn get_denoiser(
        &self,
        request: Request<GetDenoiserRequest>,
    ) -> Result<Response<DenoiserInfo>, Status> {
        let id = request.into_inner().id;
        required_id(&id)?;
        match self.catalog.denoiser(&id).await.map_err(catalog_status)? {
            Some(record) => Ok(Response::new(self.info(&record).await?)),
            None => Err(Status::not_found(format!("denoiser {id:?} not found"))),
        }
    }

    async fn activate_denoiser(
        &self,
        request: Request<ActivateDenoiserRequest>,
    ) -> Result<Response<DenoiserInfo>, Status> {
        let id = request.into_inner().id;
        required_id(&id)?;
        let record = self
            .catalog
            .activate_denoiser(&id)
            .await
            .map_err(catalog_status)?;
        tracing::info!(denoiser = %id, architecture = %record.architecture, "denoiser activated");
        Ok(Response::new(self.info(&record).await?))
    }
}
