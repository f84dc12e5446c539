//! The denoisers a server serves: the active version of each architecture,
//! loaded onto the model thread, and the reloader that notices a newly
//! activated version in the catalog and swaps it in.
//!
//! A request takes an `Arc` of the entry it starts on and keeps it until it
//! is answered, so a swap never disturbs it: requests in flight finish on the
//! old version, new ones get the new one, and the old checkpoint is freed on
//! the model thread when the last request holding it is done.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use super::readiness::Readiness;
use crate::backend::{CheckpointFacts, ModelThread};
use crate::blobs::BlobStore;
use crate::catalog::{Catalog, DenoiserRecord, PageRequest};
use crate::tasks::words::lm::{BASE_MODEL_ID_KEY, BASE_MODEL_SHA256_KEY};
use crate::weights::ArchSpec;

/// Default interval between checks of the catalog for activations.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// A denoiser version loaded on the model thread. Dropping the last handle
/// unloads it there.
#[derive(Debug)]
pub struct LoadedDenoiser {
    /// Its catalog row (as of loading).
    pub record: DenoiserRecord,
    /// 1 for the first version of its architecture, then increasing.
    pub version: u32,
    /// What the checkpoint holds.
    pub facts: CheckpointFacts,
    /// What every file it generates says of it (`__metadata__`).
    pub provenance: std::collections::BTreeMap<String, String>,
    /// For an adapter architecture, the base model its samples adapt.
    pub base_model: Option<BaseModel>,
    model: ModelThread,
}

/// The frozen model an adapter denoiser's samples apply to: the base its
/// zoo's adapters were trained on, as the zoo's plan names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseModel {
    /// The base's architecture.
    pub architecture: String,
    /// Its zoo model id (DownloadCheckpoint serves it).
    pub zoo_model_id: String,
    /// SHA-256 of its file.
    pub sha256: String,
}

/// The base model of the zoo `record` was trained on, when that zoo's plan
/// names one (a `words` adapter zoo) and the catalog holds it.
pub async fn base_model_of(
    catalog: &Arc<dyn Catalog>,
    record: &DenoiserRecord,
) -> Result<Option<BaseModel>, crate::catalog::CatalogError> {
    let Some(zoo) = record.config["zoo"].as_str() else {
        return Ok(None);
    };
    let Some(plan) = catalog.zoo(zoo).await? else {
        return Ok(None);
    };
    let Some(id) = plan.config[BASE_MODEL_ID_KEY].as_str() else {
        return Ok(None);
    };
    let Some(model) = catalog.zoo_model(id).await? else {
        tracing::warn!(denoiser = %record.id, zoo, base = id, "the zoo's base model is not in the catalog");
        return Ok(None);
    };
    Ok(Some(BaseModel {
        architecture: model.architecture,
        zoo_model_id: model.id,
        sha256: model.sha256,
    }))
}

impl LoadedDenoiser {
    /// An entry for a checkpoint already loaded on `model` under `record.id`.
    pub fn new(
        record: DenoiserRecord,
        version: u32,
        facts: CheckpointFacts,
        model: ModelThread,
    ) -> Self {
        let provenance =
            super::generate_init::denoiser_provenance(&record.id, version, &facts.arch);
        Self {
            record,
            version,
            facts,
            provenance,
            base_model: None,
            model,
        }
    }

    /// The same entry serving adapters of `base`: its files name the base
    /// (id and SHA-256, as a zoo adapter's do), its header's architecture too.
    pub fn with_base_model(mut self, base: Option<BaseModel>) -> Self {
        if let Some(base) = &base {
            self.provenance
                .insert(BASE_MODEL_ID_KEY.to_owned(), base.zoo_model_id.clone());
            self.provenance
                .insert(BASE_MODEL_SHA256_KEY.to_owned(), base.sha256.clone());
        }
        self.base_model = base;
        self
    }

    /// The model thread it lives on.
    pub fn model(&self) -> &ModelThread {
        &self.model
    }
}

impl Drop for LoadedDenoiser {
    fn drop(&mut self) {
        self.model.unload(&self.record.id);
    }
}

/// The active denoiser of each architecture.
#[derive(Debug)]
pub struct DenoiserRegistry {
    active: RwLock<HashMap<String, Arc<LoadedDenoiser>>>,
    model: ModelThread,
    readiness: Readiness,
}

impl DenoiserRegistry {
    /// An empty registry on `model`, reporting into `readiness`.
    pub fn new(model: ModelThread, readiness: Readiness) -> Self {
        Self {
            active: RwLock::new(HashMap::new()),
            model,
            readiness,
        }
    }

    /// The active denoiser of `architecture`, if one is loaded.
    pub fn active(&self, architecture: &str) -> Option<Arc<LoadedDenoiser>> {
        self.active.read().ok()?.get(architecture).cloned()
    }

    /// The loaded denoiser with this id, if any.
    pub fn by_id(&self, id: &str) -> Option<Arc<LoadedDenoiser>> {
        self.active
            .read()
            .ok()?
            .values()
            .find(|d| d.record.id == id)
            .cloned()
    }

    /// Every loaded denoiser.
    pub fn loaded(&self) -> Vec<Arc<LoadedDenoiser>> {
        self.active
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Makes the catalog's active denoisers the served ones: loads each one
    /// not loaded yet and swaps it in. Returns the ids swapped in. A version
    /// that fails to load is logged and the previous one keeps serving.
    pub async fn refresh(
        &self,
        catalog: &Arc<dyn Catalog>,
        blobs: &BlobStore,
    ) -> Result<Vec<String>, crate::catalog::CatalogError> {
        let mut swapped = Vec::new();
        for arch in catalog.architectures(None).await? {
            let Some(record) = catalog.active_denoiser(&arch.name).await? else {
                continue;
            };
            if let Some(loaded) = self.active(&arch.name).filter(|d| d.record.id == record.id) {
                // Re-published at every check, so the gauge stays true even
                // if something else in the process wrote it.
                version_gauge(&arch.name, loaded.version);
                continue;
            }
            match self.load(catalog, blobs, record, &arch).await {
                Ok(loaded) => {
                    tracing::info!(
                        architecture = %arch.name, denoiser = %loaded.record.id,
                        version = loaded.version, "denoiser loaded and swapped in"
                    );
                    version_gauge(&arch.name, loaded.version);
                    metrics::counter!(
                        "weightgen_denoiser_swaps_total",
                        "architecture" => arch.name.clone()
                    )
                    .increment(1);
                    swapped.push(loaded.record.id.clone());
                    if let Ok(mut active) = self.active.write() {
                        active.insert(arch.name.clone(), Arc::new(loaded));
                    }
                }
                Err(reason) => {
                    tracing::error!(architecture = %arch.name, %reason, "active denoiser not loaded");
                }
            }
        }
        if !swapped.is_empty() {
            self.readiness.set_denoiser_loaded(true);
        }
        Ok(swapped)
    }

    async fn load(
        &self,
        catalog: &Arc<dyn Catalog>,
        blobs: &BlobStore,
        record: DenoiserRecord,
        architecture: &ArchSpec,
    ) -> Result<LoadedDenoiser, String> {
        let bytes = blobs.get(&record.sha256).await.map_err(|e| e.to_string())?;
        let facts = self
            .model
            .load(&record.id, bytes, Some(architecture.clone()))
            .await
            .map_err(|e| e.to_string())?;
        let version = version_of(catalog, &record)
            .await
            .map_err(|e| e.to_string())?;
        let base = base_model_of(catalog, &record)
            .await
            .map_err(|e| e.to_string())?;
        Ok(LoadedDenoiser::new(record, version, facts, self.model.clone()).with_base_model(base))
    }
}

/// `weightgen_denoiser_version{architecture}`: the version served.
fn version_gauge(architecture: &str, version: u32) {
    metrics::gauge!("weightgen_denoiser_version", "architecture" => architecture.to_owned())
        .set(f64::from(version));
}

/// Version numbers of every denoiser of `architecture`: rank by creation
/// time (then id), from 1. One listing serves any number of lookups.
pub async fn versions(
    catalog: &Arc<dyn Catalog>,
    architecture: &str,
) -> Result<HashMap<String, u32>, crate::catalog::CatalogError> {
    let mut page = PageRequest::first(crate::catalog::MAX_PAGE_SIZE);
    let mut all = Vec::new();
    loop {
        let listed = catalog.denoisers(Some(architecture), &page).await?;
        all.extend(listed.items.into_iter().map(|d| (d.created_at_ms, d.id)));
        if listed.next_token.is_empty() {
            break;
        }
        page.token = listed.next_token;
    }
    all.sort();
    Ok(all
        .into_iter()
        .enumerate()
        .map(|(i, (_, id))| (id, i as u32 + 1))
        .collect())
}

/// The version number of `record` (see [`versions`]).
pub async fn version_of(
    catalog: &Arc<dyn Catalog>,
    record: &DenoiserRecord,
) -> Result<u32, crate::catalog::CatalogError> {
    let versions = versions(catalog, &record.architecture).await?;
    Ok(versions.get(&record.id).copied().unwrap_or(1))
}

/// Checks the catalog every `interval` and swaps in newly activated
/// denoisers until `stop` turns true.
pub async fn reload_loop(
    registry: Arc<DenoiserRegistry>,
    catalog: Arc<dyn Catalog>,
    blobs: BlobStore,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if let Err(e) = registry.refresh(&catalog, &blobs).await {
            tracing::warn!(error = %e, "checking the catalog for denoisers failed");
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
