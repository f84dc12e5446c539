//! `weightgen-worker zoo build`: plans a zoo as one catalog unit per model
//! (its task and seeds, derived from the zoo seed, so a re-run plans the
//! same zoo), then claims and trains units until none is left. Each model's
//! file is stored (durably) before the transaction that adds its row and
//! closes its unit, so a crash loses at most the models in flight, and
//! training is deterministic, so redoing one gives the same bytes (the
//! same content address: no orphan blob). Several workers may share a
//! PostgreSQL catalog: a unit is claimed by one of them at a time, and a
//! claim older than the lease is taken over.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use tch::Device;

use crate::blobs::{BlobError, BlobStore};
use crate::catalog::{
    Catalog, CatalogError, ModelSource, Snapshot, ZooModelRecord, ZooPlan, now_ms,
};
use crate::rng::splitmix64;
use crate::tasks::featurizer::{describe, schema};
use crate::tasks::train::{TrainConfig, train};
use crate::tasks::words::WordLists;
use crate::tasks::{Family, TaskSpec};
use crate::weights::{CodecError, DType, encode_safetensors};

use super::words::{WordsBase, WordsBaseConfig, WordsZooError, ensure_base, train_adapter_unit};

/// Default lease: a claim older than this is presumed dead and retaken.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(600);

/// What to build.
#[derive(Debug, Clone)]
pub struct ZooBuildConfig {
    /// Zoo name.
    pub zoo: String,
    /// Task family.
    pub family: Family,
    /// Architecture name ("" = the family's default).
    pub architecture: String,
    /// Number of models.
    pub num_models: u64,
    /// Seed of tasks, initializations and training.
    pub seed: u64,
    /// One initialization for every model (else one per model).
    pub shared_init: bool,
    /// How each model is trained.
    pub train: TrainConfig,
    /// This worker's id (unique among concurrent workers).
    pub worker: String,
    /// Units trained at once (each on one intra-op thread).
    pub jobs: usize,
    /// Claims older than this are retaken.
    pub lease: Duration,
    /// Device models train on.
    pub device: Device,
    /// Stop after this many models (None: until the zoo is complete).
    pub max_models: Option<u64>,
    /// Stop claiming units once set (models in training finish first).
    pub cancel: crate::cancel::CancelFlag,
    /// `words` zoos: the base model the adapters adapt (built first, once).
    pub words_base: WordsBaseConfig,
}

/// What a build did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BuildReport {
    /// Models this worker trained and recorded.
    pub built: u64,
    /// Units in the zoo, and done, when the worker stopped.
    pub total: u64,
    /// Units done when the worker stopped.
    pub done: u64,
    /// Wall time.
    pub seconds: f64,
}

impl BuildReport {
    /// Models per minute of this worker.
    pub fn rate_per_minute(&self) -> f64 {
        self.built as f64 * 60.0 / self.seconds.max(1e-9)
    }
}

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum ZooError {
    /// The catalog failed.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The blob store failed.
    #[error(transparent)]
    Blobs(#[from] BlobError),
    /// A task or family is invalid.
    #[error(transparent)]
    Task(#[from] crate::tasks::TaskError),
    /// Encoding a checkpoint failed.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// libtorch failed.
    #[error("training: {0}")]
    Torch(#[from] tch::TchError),
    /// A model could not be trained.
    #[error(transparent)]
    Train(#[from] crate::tasks::train::TrainError),
    /// A unit's spec cannot be read.
    #[error("unit {unit} of zoo {zoo:?}: {reason}")]
    BadUnit {
        /// The zoo the unit belongs to.
        zoo: String,
        /// The unit's index in the zoo's plan.
        unit: u64,
        /// Why.
        reason: String,
    },
    /// A training thread died.
    #[error("training task: {0}")]
    Join(#[from] tokio::task::JoinError),
    /// A `words` zoo's lists, tasks or base failed.
    #[error(transparent)]
    Words(#[from] WordsZooError),
    /// A file's layout did not match its architecture.
    #[error(transparent)]
    Layout(#[from] crate::weights::LayoutError),
}

/// One unit's work: which task, from which initialization, with which seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitSpec {
    /// The task.
    pub task: TaskSpec,
    /// Seed of the initialization.
    pub init_seed: u64,
    /// Seed of minibatch order.
    pub train_seed: u64,
}

/// The units of a zoo: task i from the zoo seed's stream of zoo-side tasks.
pub fn plan_units(config: &ZooBuildConfig) -> Vec<UnitSpec> {
    let mut rng = StdRng::seed_from_u64(splitmix64(config.seed ^ 0x7A5C));
    (0..config.num_models)
        .map(|i| {
            let train_seed = splitmix64(config.seed.wrapping_add(i.wrapping_mul(0x9E37)));
            UnitSpec {
                task: config.family.sample_task(&mut rng, false),
                init_seed: if config.shared_init {
                    splitmix64(config.seed ^ 0x1417)
                } else {
                    train_seed
                },
                train_seed,
            }
        })
        .collect()
}

fn plan(config: &ZooBuildConfig, architecture: &str) -> ZooPlan {
    ZooPlan {
        name: config.zoo.clone(),
        family: config.family.name().to_owned(),
        architecture: architecture.to_owned(),
        config: {
            let mut plan = serde_json::json!({
                "seed": config.seed,
                "shared_init": config.shared_init,
                "train": config.train,
                "feature_schema": schema(config.family),
            });
            if config.family == Family::Words {
                plan["base"] = serde_json::json!(config.words_base);
                plan[crate::tasks::words::lm::BASE_MODEL_ID_KEY] =
                    config.words_base.model_id().into();
            }
            plan
        },
        num_models: config.num_models,
    }
}

/// A trained unit, ready to store.
pub(crate) struct Trained {
    pub(crate) bytes: Bytes,
    pub(crate) snapshots: Vec<(u64, Bytes)>,
    pub(crate) record: ZooModelRecord,
    pub(crate) test_metric: String,
}

/// What a `words` zoo's units share: the base and the word lists.
#[derive(Clone)]
struct WordsContext {
    base: Arc<WordsBase>,
    lists: Arc<WordLists>,
}

fn train_unit(
    config: &ZooBuildConfig,
    architecture: &str,
    unit: u64,
    spec: &UnitSpec,
    words: Option<&WordsContext>,
) -> Result<Trained, ZooError> {
    if let Some(words) = words {
        return train_adapter_unit(config, &words.base, &words.lists, architecture, unit, spec);
    }
    let family = config.family;
    let net = family.network(architecture)?;
    let data = family.data(&spec.task, config.device)?;
    let init = net.init(spec.init_seed, config.device);
    let model = train(
        &net,
        &init,
        &data,
        family.objective(),
        &config.train,
        spec.train_seed,
    )?;
    let descriptor = describe(family, &spec.task, &data);
    let names: Vec<String> = net.spec.tensors.iter().map(|t| t.name.clone()).collect();
    let metadata = HashMap::from([
        (
            crate::weights::TORCH_FORMAT.0.to_owned(),
            crate::weights::TORCH_FORMAT.1.to_owned(),
        ),
        ("zoo".to_owned(), config.zoo.clone()),
        ("unit".to_owned(), unit.to_string()),
        ("architecture".to_owned(), net.spec.name.clone()),
    ]);
    let encode = |params: &[tch::Tensor]| -> Result<Bytes, ZooError> {
        let named: Vec<(String, tch::Tensor)> = names
            .iter()
            .cloned()
            .zip(params.iter().map(|p| p.to_device(Device::Cpu)))
            .collect();
        Ok(Bytes::from(encode_safetensors(
            &named,
            DType::F32,
            &metadata,
        )?))
    };
    let bytes = encode(&model.params)?;
    let snapshots = model
        .snapshots
        .iter()
        .map(|(step, params)| Ok((*step, encode(params)?)))
        .collect::<Result<Vec<_>, ZooError>>()?;
    let test_metric = model
        .metrics
        .iter()
        .find(|(k, _)| k.starts_with("test_") && !k.ends_with("_loss"))
        .map(|(k, v)| format!("{k} {v:.4}"))
        .unwrap_or_default();
    let record = unit_record(
        config,
        (unit, spec),
        &net.spec.name,
        descriptor,
        model.metrics,
        serde_json::json!({}),
        &bytes,
    );
    Ok(Trained {
        bytes,
        snapshots,
        record,
        test_metric,
    })
}

/// The catalog row of unit `unit` (with `spec`) of `config`'s zoo: its
/// file `bytes`, `metrics`, and `extra` fields added to the training
/// config (init seed, whether shared, the train settings).
pub(crate) fn unit_record(
    config: &ZooBuildConfig,
    (unit, spec): (u64, &UnitSpec),
    architecture: &str,
    descriptor: crate::tasks::Descriptor,
    metrics: std::collections::BTreeMap<String, f64>,
    extra: serde_json::Value,
    bytes: &[u8],
) -> ZooModelRecord {
    let mut training = serde_json::json!({
        "train": config.train,
        "init_seed": spec.init_seed,
        "shared_init": config.shared_init,
    });
    if let (Some(training), serde_json::Value::Object(extra)) = (training.as_object_mut(), extra) {
        training.extend(extra);
    }
    ZooModelRecord {
        id: format!("{}/{unit:06}", config.zoo),
        zoo: config.zoo.clone(),
        architecture: architecture.to_owned(),
        family: config.family.name().to_owned(),
        source: ModelSource::Built,
        task: serde_json::json!({"spec": spec.task, "descriptor": descriptor}),
        seed: spec.train_seed,
        metrics,
        training_config: training,
        sha256: crate::blobs::sha256_hex(bytes),
        size_bytes: bytes.len() as u64,
        created_at_ms: 0,
    }
}

/// Builds (or continues building) a zoo until no unit is left, or
/// `max_models` models were built by this call. `on_model` is called after
/// each recorded model (progress bars).
#[tracing::instrument(
    name = "zoo.build",
    skip_all,
    fields(zoo = %config.zoo, family = ?config.family, models = config.num_models as i64, worker = %config.worker)
)]
pub async fn build_zoo(
    catalog: Arc<dyn Catalog>,
    blobs: BlobStore,
    config: ZooBuildConfig,
    on_model: impl Fn(&BuildReport) + Send + Sync + 'static,
) -> Result<BuildReport, ZooError> {
    let started = Instant::now();
    let family = config.family;
    let net = family.network(&config.architecture)?;
    let architecture = net.spec.name.clone();
    catalog.register_architecture(&net.spec).await?;
    let words = match family {
        Family::Words => {
            let lists = Arc::new(WordLists::from_env().map_err(WordsZooError::from)?);
            let base = ensure_base(&catalog, &blobs, &config, &lists).await?;
            Some(WordsContext {
                base: Arc::new(base),
                lists,
            })
        }
        _ => None,
    };
    let specs = plan_units(&config);
    let unit_specs: Vec<serde_json::Value> = specs
        .iter()
        .map(|s| serde_json::to_value(s).unwrap_or_default())
        .collect();
    catalog
        .plan_zoo(&plan(&config, &architecture), &unit_specs)
        .await?;
    if catalog.backend() == "sqlite" {
        // One worker per SQLite catalog: any claim left is from a run that died.
        let released = catalog
            .release_claims_before(&config.zoo, now_ms() + 1)
            .await?;
        if released > 0 {
            tracing::info!(zoo = %config.zoo, released, "retrying units a previous run left claimed");
        }
    }
    let progress = catalog.zoo_progress(&config.zoo).await?;
    tracing::info!(
        zoo = %config.zoo, family = family.name(), architecture = %architecture,
        total = progress.total, done = progress.done, worker = %config.worker,
        "building zoo"
    );
    let config = Arc::new(config);
    let architecture = Arc::new(architecture);
    let on_model = Arc::new(on_model);
    let report = Arc::new(std::sync::Mutex::new(BuildReport {
        total: progress.total,
        done: progress.done,
        ..Default::default()
    }));
    let budget = Arc::new(std::sync::atomic::AtomicU64::new(
        config.max_models.unwrap_or(u64::MAX),
    ));
    let mut lanes = Vec::new();
    for lane in 0..config.jobs.max(1) {
        let (catalog, blobs, config, architecture, report, budget, on_model, words) = (
            catalog.clone(),
            blobs.clone(),
            config.clone(),
            architecture.clone(),
            report.clone(),
            budget.clone(),
            on_model.clone(),
            words.clone(),
        );
        lanes.push(tokio::spawn(async move {
            let worker = format!("{}#{lane}", config.worker);
            loop {
                let take = budget.fetch_update(
                    std::sync::atomic::Ordering::SeqCst,
                    std::sync::atomic::Ordering::SeqCst,
                    |b| b.checked_sub(1),
                );
                if take.is_err() || config.cancel.is_cancelled() {
                    return Ok::<(), ZooError>(());
                }
                let stale_before = now_ms() - config.lease.as_millis() as i64;
                let Some(unit) = catalog.claim_unit(&config.zoo, &worker, stale_before).await? else {
                    return Ok(());
                };
                let spec: UnitSpec = serde_json::from_value(unit.spec.clone()).map_err(|e| ZooError::BadUnit {
                    zoo: config.zoo.clone(),
                    unit: unit.unit,
                    reason: e.to_string(),
                })?;
                let began = Instant::now();
                let trained = {
                    let (config, architecture, words) = (config.clone(), architecture.clone(), words.clone());
                    tokio::task::spawn_blocking(move || {
                        train_unit(&config, &architecture, unit.unit, &spec, words.as_ref())
                    })
                    .await?
                };
                let trained = match trained {
                    Ok(t) => t,
                    Err(e) => {
                        catalog.release_unit(&config.zoo, unit.unit, &worker).await?;
                        return Err(e);
                    }
                };
                // Files first, durable; then the rows, in one transaction.
                blobs.put(trained.bytes.clone()).await?;
                let mut snapshots = Vec::new();
                for (epoch, bytes) in &trained.snapshots {
                    let stored = blobs.put(bytes.clone()).await?;
                    snapshots.push(Snapshot {
                        model_id: trained.record.id.clone(),
                        epoch: *epoch,
                        sha256: stored.sha256,
                        size_bytes: stored.size,
                    });
                }
                match catalog
                    .complete_unit(&config.zoo, unit.unit, &worker, &trained.record, &snapshots)
                    .await
                {
                    Ok(_) => {}
                    Err(CatalogError::Conflict(reason)) => {
                        // Our lease ran out and another worker took the unit.
                        tracing::warn!(unit = unit.unit, %reason, "unit taken over; result dropped");
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
                tracing::info!(
                    zoo = %config.zoo, unit = unit.unit, attempts = unit.attempts,
                    seconds = began.elapsed().as_secs_f64(), metric = %trained.test_metric,
                    "model built"
                );
                let snapshot = {
                    let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
                    r.built += 1;
                    r.done += 1;
                    r.clone()
                };
                on_model(&snapshot);
            }
        }));
    }
    let mut first_error = None;
    for lane in lanes {
        if let Err(e) = lane.await.map_err(ZooError::from).and_then(|r| r) {
            first_error.get_or_insert(e);
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let progress = catalog.zoo_progress(&config.zoo).await?;
    let mut report = report.lock().unwrap_or_else(|e| e.into_inner()).clone();
    report.total = progress.total;
    report.done = progress.done;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}
