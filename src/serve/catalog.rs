//! `weightgen.v1.CatalogService`: architectures, zoo models (list, get,
//! download, upload with size, SHA-256 and layout checks) and denoiser
//! versions (list, get, activate — earlier versions stay listed and can be
//! re-activated; running servers swap the activated one in).

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use super::convert::{arch_to_proto, denoiser_record_to_proto, descriptor_from_proto, timestamp};
use super::denoisers::{version_of, versions};
use super::status::{bounded_name, catalog_status, checked_name};
use crate::blobs::upload::StagedUpload;
use crate::blobs::{BlobError, BlobStore};
use crate::catalog::{
    Catalog, DenoiserRecord, ModelSource, PageRequest, ZooModelFilter, ZooModelRecord,
};
use crate::proto::v1 as pb;
use crate::proto::v1::catalog_service_server::CatalogService;
use crate::proto::v1::{
    ActivateDenoiserRequest, DenoiserInfo, DownloadCheckpointRequest, DownloadCheckpointResponse,
    GetDenoiserRequest, GetZooModelRequest, ListArchitecturesRequest, ListArchitecturesResponse,
    ListDenoisersRequest, ListDenoisersResponse, ListZooModelsRequest, ListZooModelsResponse,
    UploadCheckpointRequest, UploadCheckpointResponse, ZooModel,
};
use crate::tasks::featurizer::Descriptor;
use crate::zoo::{AddError, IngestLine, add_checkpoint};

/// Largest chunk of a checkpoint in one message, either way.
pub const MAX_CHUNK_BYTES: usize = 1 << 20;
/// Default largest checkpoint an upload may carry.
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 256 << 20;
/// Zoo that uploaded checkpoints join.
pub const UPLOAD_ZOO: &str = "uploaded";

/// The catalog service.
#[derive(Debug, Clone)]
pub struct CatalogApi {
    catalog: Arc<dyn Catalog>,
    blobs: BlobStore,
    max_upload_bytes: u64,
    page_bytes: usize,
    upload_staging: std::path::PathBuf,
}

/// Room a list response keeps for its fields besides the rows (token,
/// total) and for each row's length prefix.
const PAGE_OVERHEAD_BYTES: usize = 1024;

impl CatalogApi {
    /// The service over `catalog` and `blobs`; list pages are cut to fit in
    /// `max_response_bytes` (the next page token resumes after the last row
    /// sent), so every documented page size works. Uploads arrive into files
    /// in `upload_staging`, not memory.
    pub fn new(
        catalog: Arc<dyn Catalog>,
        blobs: BlobStore,
        max_upload_bytes: u64,
        max_response_bytes: usize,
        upload_staging: std::path::PathBuf,
    ) -> Self {
        Self {
            catalog,
            blobs,
            max_upload_bytes,
            upload_staging,
            page_bytes: max_response_bytes
                .saturating_sub(PAGE_OVERHEAD_BYTES)
                .max(1),
        }
    }

    async fn info(&self, record: &DenoiserRecord) -> Result<DenoiserInfo, Status> {
        let version = version_of(&self.catalog, record)
            .await
            .map_err(catalog_status)?;
        Ok(denoiser_record_to_proto(record, version))
    }
}

fn required(field: &str, value: &str) -> Result<(), Status> {
    checked_name(field, value)
}

fn required_id(id: &str) -> Result<(), Status> {
    required("id", id)
}

fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {reason}"))
}

/// A task descriptor as the API shows it (from the stored descriptor).
fn task_to_proto(architecture: &str, task: &serde_json::Value) -> Option<pb::TaskDescriptor> {
    let descriptor: Descriptor = serde_json::from_value(task.get("descriptor")?.clone()).ok()?;
    let tensor = |rows: &[Vec<f32>]| pb::FloatTensor {
        shape: vec![rows.len() as u64, rows.first().map_or(0, Vec::len) as u64],
        values: rows.iter().flatten().copied().collect(),
    };
    Some(pb::TaskDescriptor {
        architecture: architecture.to_owned(),
        features: descriptor
            .features
            .into_iter()
            .map(|(k, values)| (k, pb::FeatureValue { values }))
            .collect(),
        embedding: Vec::new(),
        support: (!descriptor.support_x.is_empty()).then(|| pb::SupportSet {
            inputs: Some(tensor(&descriptor.support_x)),
            targets: Some(tensor(&descriptor.support_y)),
        }),
        num_classes: 0,
    })
}

/// A zoo model as the API shows it.
pub fn zoo_model_to_proto(m: &ZooModelRecord) -> ZooModel {
    ZooModel {
        id: m.id.clone(),
        architecture: m.architecture.clone(),
        family: m.family.clone(),
        source: match m.source {
            ModelSource::Built => pb::ZooModelSource::Built,
            ModelSource::Ingested => pb::ZooModelSource::Ingested,
        } as i32,
        task: task_to_proto(&m.architecture, &m.task),
        seed: m.seed,
        metrics: m.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        training_config_json: m.training_config.to_string(),
        sha256: m.sha256.clone(),
        size_bytes: m.size_bytes,
        created_at: Some(timestamp(m.created_at_ms)),
    }
}

/// The stored form of an uploaded task (`{"descriptor": …}`, as built zoo
/// models store theirs).
fn task_from_proto(task: Option<pb::TaskDescriptor>) -> Result<serde_json::Value, Status> {
    match task {
        None => Ok(serde_json::Value::Null),
        Some(task) => {
            let descriptor = descriptor_from_proto(&task, "header.task")?;
            Ok(serde_json::json!({ "descriptor": descriptor }))
        }
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
        request: Request<ListArchitecturesRequest>,
    ) -> Result<Response<ListArchitecturesResponse>, Status> {
        let family = request.into_inner().family;
        let archs = self
            .catalog
            .architectures((!family.is_empty()).then_some(family.as_str()))
            .await
            .map_err(catalog_status)?;
        Ok(Response::new(ListArchitecturesResponse {
            architectures: archs.iter().map(arch_to_proto).collect(),
        }))
    }

    async fn get_zoo_model(
        &self,
        request: Request<GetZooModelRequest>,
    ) -> Result<Response<ZooModel>, Status> {
        let id = request.into_inner().id;
        required_id(&id)?;
        match self.catalog.zoo_model(&id).await.map_err(catalog_status)? {
            Some(m) => Ok(Response::new(zoo_model_to_proto(&m))),
            None => Err(Status::not_found(format!("zoo model {id:?} not found"))),
        }
    }

    async fn list_zoo_models(
        &self,
        request: Request<ListZooModelsRequest>,
    ) -> Result<Response<ListZooModelsResponse>, Status> {
        let request = request.into_inner();
        bounded_name("architecture", &request.architecture)?;
        bounded_name("family", &request.family)?;
        let page = request.page.unwrap_or_default();
        let filter = ZooModelFilter {
            zoo: None,
            architecture: (!request.architecture.is_empty()).then_some(request.architecture),
            family: (!request.family.is_empty()).then_some(request.family),
        };
        let listed = self
            .catalog
            .zoo_models(
                &filter,
                &PageRequest {
                    size: page.page_size,
                    token: page.page_token,
                },
            )
            .await
            .map_err(catalog_status)?
            .map(|m| (zoo_model_to_proto(&m), m))
            .fit_bytes(
                self.page_bytes,
                |(proto, _)| proto.encoded_len() + 8,
                |(_, m)| (m.created_at_ms, &m.id),
            );
        Ok(Response::new(ListZooModelsResponse {
            models: listed.items.into_iter().map(|(proto, _)| proto).collect(),
            next_page_token: listed.next_token,
            total: listed.total,
        }))
    }

    async fn download_checkpoint(
        &self,
        request: Request<DownloadCheckpointRequest>,
    ) -> Result<Response<Self::DownloadCheckpointStream>, Status> {
        use pb::download_checkpoint_request::Target;
        let (sha256, filename) = match request.into_inner().target {
            Some(Target::ZooModelId(id)) => {
                required("zoo_model_id", &id)?;
                let m = self
                    .catalog
                    .zoo_model(&id)
                    .await
                    .map_err(catalog_status)?
                    .ok_or_else(|| Status::not_found(format!("zoo model {id:?} not found")))?;
                (m.sha256, format!("{}.safetensors", id.replace('/', "_")))
            }
            Some(Target::DenoiserId(id)) => {
                required("denoiser_id", &id)?;
                let d = self
                    .catalog
                    .denoiser(&id)
                    .await
                    .map_err(catalog_status)?
                    .ok_or_else(|| Status::not_found(format!("denoiser {id:?} not found")))?;
                (d.sha256, format!("{id}.safetensors"))
            }
            None => return Err(invalid("target", "required: zoo_model_id or denoiser_id")),
        };
        let bytes = self.blobs.get(&sha256).await.map_err(|e| match e {
            BlobError::Corrupt { .. } => {
                tracing::error!(error = %e, "stored checkpoint is corrupt");
                Status::data_loss(e.to_string())
            }
            BlobError::NotFound(_) => Status::data_loss(format!(
                "the file of {filename} is missing from the blob store"
            )),
            other => Status::unavailable(other.to_string()),
        })?;
        let part = |p| Ok(DownloadCheckpointResponse { part: Some(p) });
        use pb::download_checkpoint_response::Part;
        let mut messages = vec![part(Part::Header(pb::CheckpointHeader {
            size_bytes: bytes.len() as u64,
            sha256: sha256.clone(),
            filename,
        }))];
        for start in (0..bytes.len()).step_by(MAX_CHUNK_BYTES) {
            let end = (start + MAX_CHUNK_BYTES).min(bytes.len());
            messages.push(part(Part::Chunk(bytes.slice(start..end).to_vec())));
        }
        messages.push(part(Part::Trailer(pb::CheckpointTrailer { sha256 })));
        Ok(Response::new(Box::pin(tokio_stream::iter(messages))))
    }

    async fn upload_checkpoint(
        &self,
        request: Request<Streaming<UploadCheckpointRequest>>,
    ) -> Result<Response<UploadCheckpointResponse>, Status> {
        use pb::upload_checkpoint_request::Part;
        let mut stream = request.into_inner();
        let header = match stream.message().await?.and_then(|m| m.part) {
            Some(Part::Header(h)) => h,
            _ => {
                return Err(invalid(
                    "header",
                    "the first message must be the UploadHeader",
                ));
            }
        };
        required("header.architecture", &header.architecture)?;
        if header.size_bytes == 0 {
            return Err(invalid(
                "header.size_bytes",
                "required (the file's exact size)",
            ));
        }
        if header.size_bytes > self.max_upload_bytes {
            return Err(Status::resource_exhausted(format!(
                "header.size_bytes: {} is over this server's limit of {} bytes",
                header.size_bytes, self.max_upload_bytes
            )));
        }
        if header.sha256.len() != 64
            || !header
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(invalid("header.sha256", "must be 64 lowercase hex digits"));
        }
        let staging_failed = |e: BlobError| {
            tracing::error!(error = %e, "staging an upload failed");
            Status::unavailable(format!("staging the upload on this server failed: {e}"))
        };
        let mut staged = StagedUpload::create(&self.upload_staging)
            .await
            .map_err(staging_failed)?;
        while let Some(message) = stream.message().await? {
            match message.part {
                Some(Part::Chunk(chunk)) => {
                    if chunk.len() > MAX_CHUNK_BYTES {
                        return Err(invalid(
                            "chunk",
                            format!(
                                "{} bytes; at most {MAX_CHUNK_BYTES} per message",
                                chunk.len()
                            ),
                        ));
                    }
                    if staged.len() + chunk.len() as u64 > header.size_bytes {
                        return Err(invalid(
                            "header.size_bytes",
                            format!("declared {} bytes, received more", header.size_bytes),
                        ));
                    }
                    staged.append(&chunk).await.map_err(staging_failed)?;
                }
                Some(Part::Header(_)) => return Err(invalid("header", "sent twice")),
                None => return Err(invalid("part", "an empty message")),
            }
        }
        if staged.len() != header.size_bytes {
            return Err(invalid(
                "header.size_bytes",
                format!(
                    "declared {} bytes, received {}",
                    header.size_bytes,
                    staged.len()
                ),
            ));
        }
        let (file, actual) = staged.finish().await.map_err(staging_failed)?;
        if actual != header.sha256 {
            return Err(invalid(
                "header.sha256",
                format!("declared {}, the bytes hash to {actual}", header.sha256),
            ));
        }
        let training_config = if header.training_config_json.trim().is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&header.training_config_json)
                .map_err(|e| invalid("header.training_config_json", e))?
        };
        let meta = IngestLine {
            file: header.filename.clone(),
            architecture: header.architecture.clone(),
            family: header.family.clone(),
            task: task_from_proto(header.task)?,
            metrics: header.metrics.into_iter().collect(),
            seed: header.seed,
            training_config,
        };
        let inserted = add_checkpoint(&self.catalog, &self.blobs, file, &meta, UPLOAD_ZOO)
            .await
            .map_err(|e| match e {
                AddError::Invalid { field, reason } => invalid(&format!("file.{field}"), reason),
                AddError::UnknownArchitecture(name) => {
                    Status::not_found(format!("header.architecture: {name:?} is not registered"))
                }
                AddError::Storage(reason) => {
                    tracing::error!(%reason, "storing an upload failed");
                    Status::unavailable(reason)
                }
            })?;
        tracing::info!(model = %inserted.model.id, deduplicated = inserted.deduplicated, file = %header.filename, "checkpoint uploaded");
        Ok(Response::new(UploadCheckpointResponse {
            model: Some(zoo_model_to_proto(&inserted.model)),
            deduplicated: inserted.deduplicated,
        }))
    }

    async fn list_denoisers(
        &self,
        request: Request<ListDenoisersRequest>,
    ) -> Result<Response<ListDenoisersResponse>, Status> {
        let request = request.into_inner();
        bounded_name("architecture", &request.architecture)?;
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
            .map_err(catalog_status)?
            .fit_bytes(
                self.page_bytes,
                |d| denoiser_record_to_proto(d, 0).encoded_len() + 8,
                |d| (d.created_at_ms, &d.id),
            );
        let mut denoisers = Vec::with_capacity(listed.items.len());
        // One listing per architecture numbers every row of the page.
        let mut numbered: std::collections::HashMap<
            String,
            std::collections::HashMap<String, u32>,
        > = std::collections::HashMap::new();
        for record in &listed.items {
            if !numbered.contains_key(&record.architecture) {
                let found = versions(&self.catalog, &record.architecture)
                    .await
                    .map_err(catalog_status)?;
                numbered.insert(record.architecture.clone(), found);
            }
            let version = numbered[&record.architecture]
                .get(&record.id)
                .copied()
                .unwrap_or(1);
            denoisers.push(denoiser_record_to_proto(record, version));
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
