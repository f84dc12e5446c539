//! The `words` family's zoo: LoRA adapters of one frozen byte-level base
//! model. The base is built first as a one-model zoo of its own (named by
//! its settings, so every adapter zoo with the same settings shares it and
//! the catalog serves it like any checkpoint); each adapter unit then
//! trains an adapter of it from the zoo's init on its task's training
//! words and records the base's SHA-256 in the file's PEFT metadata.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tch::Device;

use super::builder::{Trained, UnitSpec, ZooBuildConfig, ZooError, unit_record};
use crate::blobs::BlobStore;
use crate::catalog::{Catalog, CatalogError, ModelSource, ZooModelRecord, ZooPlan, now_ms};
use crate::tasks::featurizer::describe_words;
use crate::tasks::words::lm::{
    Adapter, BASE_MODEL_ID_KEY, ByteLm, ByteLmConfig, LmTrainConfig, base_arch, bits_per_byte,
    train,
};
use crate::tasks::words::task::draw_support;
use crate::tasks::words::{HELD_OUT_LANGUAGES, WordLists, WordSplit, WordsError};
use crate::tasks::{Descriptor, Family, NetKind, TaskSpec};
use crate::weights::{DType, encode_safetensors, unflatten};

/// Example words in a zoo adapter's descriptor (its support set).
pub const WORDS_SUPPORT: usize = 25;

/// How the base model is trained.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WordsBaseConfig {
    /// Its shape.
    pub model: ByteLmConfig,
    /// Adam steps on the training languages' mixture.
    pub steps: usize,
    /// Words per step.
    pub batch: usize,
    /// Adam's learning rate.
    pub learning_rate: f64,
    /// Seed of the init (libtorch's generator) and of the word draws.
    pub seed: u64,
}

impl Default for WordsBaseConfig {
    /// 3,000 steps of 64 words at 3e-3: 54 s on 2 cores for the default
    /// 0.13 M-parameter model (examples/words_sizing.rs).
    fn default() -> Self {
        Self {
            model: ByteLmConfig::default(),
            steps: 3000,
            batch: 64,
            learning_rate: 3e-3,
            seed: 1,
        }
    }
}

impl WordsBaseConfig {
    /// The base's one-model zoo: its settings in its name, so different
    /// settings never share a base.
    pub fn zoo_name(&self) -> String {
        let m = self.model;
        format!(
            "words-base-w{}x{}h{}-s{}-b{}-lr{}-seed{}",
            m.width, m.layers, m.heads, self.steps, self.batch, self.learning_rate, self.seed
        )
    }

    /// The base model's id in the catalog.
    pub fn model_id(&self) -> String {
        format!("{}/000000", self.zoo_name())
    }
}

/// The stored base an adapter zoo is built on.
#[derive(Debug, Clone)]
pub struct WordsBase {
    /// Its shape.
    pub model: ByteLmConfig,
    /// Its safetensors file.
    pub bytes: Bytes,
    /// The file's SHA-256 (what adapters name in their metadata).
    pub sha256: String,
    /// Its catalog id.
    pub model_id: String,
}

impl WordsBase {
    /// The stored base model `id` of shape `model`, when the catalog has it.
    async fn fetch(
        catalog: &Arc<dyn Catalog>,
        blobs: &BlobStore,
        id: &str,
        model: ByteLmConfig,
    ) -> Result<Option<Self>, ZooError> {
        let Some(record) = catalog.zoo_model(id).await? else {
            return Ok(None);
        };
        Ok(Some(Self {
            model,
            bytes: blobs.get(&record.sha256).await?,
            sha256: record.sha256,
            model_id: record.id,
        }))
    }

    /// The base as a model on `device`.
    fn lm(&self, device: Device) -> Result<ByteLm, ZooError> {
        let base = |reason: String| WordsZooError::Base {
            id: self.model_id.clone(),
            reason,
        };
        let (tensors, _) =
            crate::weights::decode_tensors(&self.bytes).map_err(|e| base(e.to_string()))?;
        Ok(ByteLm::from_tensors(self.model, &tensors, device).map_err(|e| base(e.to_string()))?)
    }
}

/// What the words zoo adds to [`ZooError`].
#[derive(Debug, thiserror::Error)]
pub enum WordsZooError {
    /// The word lists cannot be read.
    #[error(transparent)]
    Words(#[from] WordsError),
    /// A unit's task is not a valid `words` task.
    #[error("unit {unit}: {reason}")]
    Task {
        /// The unit.
        unit: u64,
        /// Why.
        reason: String,
    },
    /// The stored base does not load.
    #[error("base model {id}: {reason}")]
    Base {
        /// Its catalog id.
        id: String,
        /// Why.
        reason: String,
    },
}

/// The languages the base and the zoo train on: every listed language
/// but the held-out ones.
fn training_languages(lists: &WordLists) -> Vec<String> {
    lists
        .languages()
        .into_iter()
        .filter(|l| !HELD_OUT_LANGUAGES.contains(l))
        .map(str::to_owned)
        .collect()
}

/// The training words of every training language, each language's
/// frequencies normalized to an equal share.
fn base_mixture(lists: &WordLists) -> Result<Vec<(String, f64)>, WordsError> {
    let languages = training_languages(lists);
    let share = 1.0 / languages.len().max(1) as f64;
    let mut mixture = Vec::new();
    for language in &languages {
        let list = lists.load(language)?;
        let words: Vec<(&str, f64)> = list.part(WordSplit::Train).collect();
        let total: f64 = words.iter().map(|(_, f)| f).sum();
        mixture.extend(
            words
                .into_iter()
                .map(|(w, f)| (w.to_owned(), share * f / total.max(f64::MIN_POSITIVE))),
        );
    }
    Ok(mixture)
}

/// Borrowed (word, weight) pairs, as the language model's functions take them.
pub(crate) fn pairs(words: &[(String, f64)]) -> Vec<(&str, f64)> {
    words.iter().map(|(w, f)| (w.as_str(), *f)).collect()
}

/// Mean test bits per byte of `lm` over `languages`.
fn mean_test_bits(lm: &ByteLm, lists: &WordLists, languages: &[&str]) -> Result<f64, WordsError> {
    let mut sum = 0.0;
    for language in languages {
        let list = lists.load(language)?;
        let words: Vec<(&str, f64)> = list.part(WordSplit::Test).collect();
        sum += bits_per_byte(lm, None, &words);
    }
    Ok(sum / languages.len().max(1) as f64)
}

/// Trains the base model (one intra-op thread's worth of work, so the
/// bytes depend only on the settings and libtorch) and its record.
fn train_base(
    config: &WordsBaseConfig,
    lists: &WordLists,
    device: Device,
) -> Result<(Bytes, ZooModelRecord), ZooError> {
    let arch = base_arch(config.model);
    let mixture = base_mixture(lists).map_err(WordsZooError::from)?;
    let lm = ByteLm::new(config.model, config.seed as i64, device);
    let last = train(
        &lm,
        None,
        &pairs(&mixture),
        &LmTrainConfig {
            steps: config.steps,
            batch: config.batch,
            learning_rate: config.learning_rate,
            seed: config.seed,
        },
    );
    let languages = training_languages(lists);
    let seen: Vec<&str> = languages.iter().map(String::as_str).collect();
    let mut metrics = std::collections::BTreeMap::new();
    metrics.insert("train_bits_per_byte_last_batch".to_owned(), last);
    metrics.insert(
        "test_bits_per_byte".to_owned(),
        mean_test_bits(&lm, lists, &seen).map_err(WordsZooError::from)?,
    );
    metrics.insert(
        "held_out_test_bits_per_byte".to_owned(),
        mean_test_bits(&lm, lists, &HELD_OUT_LANGUAGES).map_err(WordsZooError::from)?,
    );
    let metadata = HashMap::from([
        (
            crate::weights::TORCH_FORMAT.0.to_owned(),
            crate::weights::TORCH_FORMAT.1.to_owned(),
        ),
        ("architecture".to_owned(), arch.name.clone()),
        ("zoo".to_owned(), config.zoo_name()),
        ("unit".to_owned(), "0".to_owned()),
    ]);
    let cpu: Vec<(String, tch::Tensor)> = lm
        .named_tensors()
        .into_iter()
        .map(|(n, t)| (n, t.to_device(Device::Cpu)))
        .collect();
    let bytes = Bytes::from(encode_safetensors(&cpu, DType::F32, &metadata)?);
    let record = ZooModelRecord {
        id: config.model_id(),
        zoo: config.zoo_name(),
        architecture: arch.name.clone(),
        family: Family::Words.name().to_owned(),
        source: ModelSource::Built,
        task: serde_json::json!({"base_model": {"languages": languages, "share": "equal"}}),
        seed: config.seed,
        metrics,
        training_config: serde_json::json!({"base": config}),
        sha256: crate::blobs::sha256_hex(&bytes),
        size_bytes: bytes.len() as u64,
        created_at_ms: 0,
    };
    Ok((bytes, record))
}

/// The base model `config` describes: the stored one, or trained now and
/// stored (one worker trains it; others wait for its record).
pub async fn ensure_base(
    catalog: &Arc<dyn Catalog>,
    blobs: &BlobStore,
    config: &ZooBuildConfig,
    lists: &Arc<WordLists>,
) -> Result<WordsBase, ZooError> {
    let base = config.words_base;
    let arch = base_arch(base.model);
    catalog.register_architecture(&arch).await?;
    let zoo = base.zoo_name();
    let plan = ZooPlan {
        name: zoo.clone(),
        family: Family::Words.name().to_owned(),
        architecture: arch.name.clone(),
        config: serde_json::json!({"base": base}),
        num_models: 1,
    };
    catalog
        .plan_zoo(&plan, &[serde_json::json!({"base": base})])
        .await?;
    if catalog.backend() == "sqlite" {
        // One worker per SQLite catalog: a claim left is from a run that died.
        catalog.release_claims_before(&zoo, now_ms() + 1).await?;
    }
    let worker = format!("{}#base", config.worker);
    loop {
        if let Some(stored) = WordsBase::fetch(catalog, blobs, &base.model_id(), base.model).await?
        {
            return Ok(stored);
        }
        let stale_before = now_ms() - config.lease.as_millis() as i64;
        let Some(unit) = catalog.claim_unit(&zoo, &worker, stale_before).await? else {
            // Another worker is training it.
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        tracing::info!(zoo = %zoo, steps = base.steps, "training the words base model");
        let (lists, device) = (lists.clone(), config.device);
        let trained =
            tokio::task::spawn_blocking(move || train_base(&base, &lists, device)).await?;
        let (bytes, record) = match trained {
            Ok(t) => t,
            Err(e) => {
                catalog.release_unit(&zoo, unit.unit, &worker).await?;
                return Err(e);
            }
        };
        blobs.put(bytes).await?;
        match catalog
            .complete_unit(&zoo, unit.unit, &worker, &record, &[])
            .await
        {
            Ok(_) | Err(CatalogError::Conflict(_)) => {}
            Err(e) => return Err(e.into()),
        }
        tracing::info!(
            id = %record.id, test_bits_per_byte = record.metrics.get("test_bits_per_byte"),
            "words base model stored"
        );
    }
}

/// Trains unit `unit`'s adapter of `base` (the zoo's LoRA shape, its task's
/// training words) and its record: metrics before and after on the task's
/// test words, the descriptor of [`WORDS_SUPPORT`] example words, the
/// file PEFT-named with the adapter config and the base's SHA-256 in its
/// metadata.
pub(crate) fn train_adapter_unit(
    config: &ZooBuildConfig,
    base: &WordsBase,
    lists: &WordLists,
    architecture: &str,
    unit: u64,
    spec: &UnitSpec,
) -> Result<Trained, ZooError> {
    let bad = |reason: String| ZooError::from(WordsZooError::Task { unit, reason });
    let net = Family::Words.network(architecture)?;
    let NetKind::LoraAdapter { base: shape, lora } = net.kind else {
        return Err(bad(format!("{architecture} is not a LoRA adapter")));
    };
    if shape != base.model {
        return Err(bad(format!(
            "{architecture} adapts a {shape:?} base, the zoo's base is {:?}",
            base.model
        )));
    }
    let task = spec
        .task
        .words_task()
        .ok_or_else(|| bad(format!("{:?} is not a words task", spec.task)))?;
    let train_words = task
        .words(lists, WordSplit::Train)
        .map_err(WordsZooError::from)?;
    let test_words = task
        .words(lists, WordSplit::Test)
        .map_err(WordsZooError::from)?;
    let lm = base.lm(config.device)?;
    let adapter = Adapter::new(&lm, lora, spec.init_seed);
    let test = pairs(&test_words);
    let before = bits_per_byte(&lm, None, &test);
    let last = train(
        &lm,
        Some(&adapter),
        &pairs(&train_words),
        &LmTrainConfig {
            steps: config.train.steps,
            batch: config.train.batch_size.max(1),
            learning_rate: config.train.learning_rate,
            seed: spec.train_seed,
        },
    );
    let after = bits_per_byte(&lm, Some(&adapter), &test);
    let descriptor = describe_words(&draw_support(
        &train_words,
        WORDS_SUPPORT,
        spec.train_seed ^ 0x5EED,
    ));
    let named = unflatten(&net.spec, &adapter.to_flat(&net.spec)?)?;
    let named: Vec<(String, tch::Tensor)> = named
        .into_iter()
        .map(|(n, t)| (n, t.to_device(Device::Cpu)))
        .collect();
    let mut metadata = adapter.metadata(&base.sha256);
    let (format, torch) = crate::weights::TORCH_FORMAT;
    metadata.insert(format.to_owned(), torch.to_owned());
    metadata.insert("zoo".to_owned(), config.zoo.clone());
    metadata.insert("unit".to_owned(), unit.to_string());
    metadata.insert("architecture".to_owned(), net.spec.name.clone());
    metadata.insert(BASE_MODEL_ID_KEY.to_owned(), base.model_id.clone());
    let bytes = Bytes::from(encode_safetensors(&named, DType::F32, &metadata)?);
    let metrics = std::collections::BTreeMap::from([
        ("base_test_bits_per_byte".to_owned(), before),
        ("test_bits_per_byte".to_owned(), after),
        ("train_bits_per_byte_last_batch".to_owned(), last),
    ]);
    let record = unit_record(
        config,
        (unit, spec),
        &net.spec.name,
        descriptor,
        metrics,
        serde_json::json!({
            "base_model_id": base.model_id,
            "base_model_sha256": base.sha256,
        }),
        &bytes,
    );
    Ok(Trained {
        bytes,
        snapshots: Vec::new(),
        record,
        test_metric: format!("test_bits_per_byte {after:.4} (base {before:.4})"),
    })
}

/// A task's words and their weights, shared.
pub type TaskWords = std::sync::Arc<Vec<(String, f64)>>;

/// What scoring adapters of a `words` zoo needs: its base model (from the
/// catalog, as the zoo's plan names it), the adapters' shape and the word
/// lists. The training gate and the denoiser's data read `words` tasks
/// through it, as they read other families' tasks through their tensors.
pub struct WordsScorer {
    lm: ByteLm,
    lora: crate::tasks::words::lm::LoraConfig,
    arch: crate::weights::ArchSpec,
    lists: WordLists,
    /// Each task's words by split, read once: the gate and `pca:auto`
    /// score every task many times, and reading a task's words re-reads,
    /// checks and parses its languages' lists.
    cache: std::sync::Mutex<std::collections::HashMap<(String, WordSplit), TaskWords>>,
}

impl std::fmt::Debug for WordsScorer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WordsScorer")
            .field("base", &self.lm.config)
            .field("arch", &self.arch.name)
            .finish()
    }
}

impl WordsScorer {
    /// The scorer of the zoo whose plan config is `plan_config` (its
    /// `base_model_id`), for adapters of architecture `arch`.
    pub async fn load(
        catalog: &Arc<dyn Catalog>,
        blobs: &BlobStore,
        plan_config: &serde_json::Value,
        network: &crate::tasks::Network,
    ) -> Result<Self, ZooError> {
        let NetKind::LoraAdapter { base, lora } = network.kind else {
            return Err(WordsZooError::Base {
                id: String::new(),
                reason: format!("{} is not a LoRA adapter", network.spec.name),
            }
            .into());
        };
        let id = plan_config[BASE_MODEL_ID_KEY].as_str().unwrap_or_default();
        let lm = WordsBase::fetch(catalog, blobs, id, base)
            .await?
            .ok_or_else(|| WordsZooError::Base {
                id: id.to_owned(),
                reason: "not in the catalog (the zoo's plan names it)".into(),
            })?
            .lm(Device::Cpu)?;
        // The base is frozen here for good: scoring never trains it.
        for v in lm.vs.trainable_variables() {
            let _ = v.set_requires_grad(false);
        }
        Ok(Self {
            lm,
            lora,
            arch: network.spec.clone(),
            lists: WordLists::from_env().map_err(WordsZooError::from)?,
            cache: Default::default(),
        })
    }

    /// `task`'s words of `split` with their weights (None for a task that
    /// is not a `words` task or whose lists cannot be read).
    pub fn words(&self, task: &TaskSpec, split: WordSplit) -> Option<TaskWords> {
        let key = (task.key(), split);
        if let Some(words) = self.cache.lock().ok()?.get(&key) {
            return Some(words.clone());
        }
        let words = std::sync::Arc::new(task.words_task()?.words(&self.lists, split).ok()?);
        self.cache.lock().ok()?.insert(key, words.clone());
        Some(words)
    }

    /// Test bits per byte of flat adapter weights `flat` on `task` (NaN
    /// when the task or the weights are unusable).
    pub fn bits_per_byte(&self, task: &TaskSpec, flat: &tch::Tensor) -> f64 {
        let Some(test) = self.words(task, WordSplit::Test) else {
            return f64::NAN;
        };
        let flat = flat.to_kind(tch::Kind::Float).to_device(Device::Cpu);
        match Adapter::from_flat(&self.lm, self.lora, &self.arch, &flat) {
            Ok(adapter) => bits_per_byte(&self.lm, Some(&adapter), &pairs(&test)),
            Err(_) => f64::NAN,
        }
    }

    /// The frozen base model.
    pub fn lm(&self) -> &ByteLm {
        &self.lm
    }

    /// The adapters' rank and scale.
    pub fn lora(&self) -> crate::tasks::words::lm::LoraConfig {
        self.lora
    }

    /// The adapters' architecture.
    pub fn arch(&self) -> &crate::weights::ArchSpec {
        &self.arch
    }

    /// Test bits per byte of the base model alone on `task`.
    pub fn base_bits_per_byte(&self, task: &TaskSpec) -> f64 {
        self.words(task, WordSplit::Test).map_or(f64::NAN, |test| {
            bits_per_byte(&self.lm, None, &pairs(&test))
        })
    }

    /// `count` of `task`'s training words drawn by frequency from a seed of
    /// the task and `salt` (the zoo builder's descriptors use [`WORDS_SUPPORT`]).
    pub fn examples(&self, task: &TaskSpec, count: usize, salt: u64) -> Vec<String> {
        let seed = crate::rng::fnv1a(salt ^ crate::rng::FNV_OFFSET, task.key().as_bytes());
        self.words(task, WordSplit::Train)
            .map(|words| draw_support(&words, count, seed))
            .unwrap_or_default()
    }

    /// A descriptor of `task` as a user would send it: [`WORDS_SUPPORT`]
    /// example words and their features.
    pub fn describe(&self, task: &TaskSpec) -> Descriptor {
        describe_words(&self.examples(task, WORDS_SUPPORT, 0))
    }
}
