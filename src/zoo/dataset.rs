//! A zoo loaded for denoiser training and evaluation: every model's weights (aligned to a
//! reference unless the zoo shares one initialization), flattened in
//! `ArchSpec` order, with its task, feature vector and support set.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use tch::{Device, Kind, Tensor};

use crate::blobs::BlobStore;
use crate::catalog::{Catalog, PageRequest, ZooModelFilter, ZooModelRecord};
use crate::tasks::featurizer::{describe_words, schema};
use crate::tasks::{Descriptor, Family, FeatureSchema, Network, TaskSpec};
use crate::weights::{PermutationSpec, align, decode_safetensors};
use crate::zoo::words::WordsScorer;

/// Why a zoo could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// The zoo or one of its stored values is unusable.
    #[error("{field}: {reason}")]
    Input {
        /// Which input.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The catalog failed.
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    /// The blob store failed.
    #[error(transparent)]
    Blobs(#[from] crate::blobs::BlobError),
    /// A task or family is unknown.
    #[error(transparent)]
    Task(#[from] crate::tasks::TaskError),
    /// A checkpoint does not fit its architecture.
    #[error(transparent)]
    Layout(#[from] crate::weights::LayoutError),
    /// Alignment is impossible for the architecture.
    #[error(transparent)]
    Align(#[from] crate::weights::AlignError),
    /// A file could not be decoded.
    #[error(transparent)]
    Codec(#[from] crate::weights::CodecError),
}

/// Sweeps of the alignment.
const ALIGN_SWEEPS: usize = 20;

/// One zoo, ready to train on.
#[derive(Debug)]
pub struct ZooDataset {
    /// The family.
    pub family: Family,
    /// The network of every model.
    pub network: Network,
    /// The feature schema (from the zoo's plan).
    pub schema: FeatureSchema,
    /// Model rows, in id order.
    pub models: Vec<ZooModelRecord>,
    /// Their tasks.
    pub tasks: Vec<TaskSpec>,
    /// Their descriptors.
    pub descriptors: Vec<Descriptor>,
    /// Flat weights [N, D].
    pub weights: Tensor,
    /// Raw feature vectors [N, F].
    pub features: Tensor,
    /// Support inputs [N, K, in] and targets [N, K, out], when the schema has them.
    pub support: Option<(Tensor, Tensor)>,
    /// Pools of P ≥ K training examples per model [N, P, in] / [N, P, out]
    /// that training draws random K-subsets from (with `support`).
    pub support_pool: Option<(Tensor, Tensor)>,
    /// Whether the models were aligned to the first one.
    pub aligned: bool,
    /// A `words` zoo's base model and word lists, which score its tasks.
    pub words: Option<WordsScorer>,
}

/// Whether to align the zoo's models by permutation before training.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum AlignChoice {
    /// Align unless the zoo was built from one shared initialization (its
    /// models then already share a basin and a labelling of units).
    #[default]
    Auto,
    /// Always align (the ablation "alignment on").
    Always,
    /// Never align (the ablation "alignment off").
    Never,
}

/// How a zoo is loaded for training.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadOptions {
    /// Permutation alignment.
    pub align: AlignChoice,
    /// Keep only the first N models (by id); None = all.
    pub max_models: Option<usize>,
}

/// Most training examples per model that support subsets are drawn from.
pub const SUPPORT_POOL_SIZE: usize = 128;

/// The support pools of `tasks` [N, P, in] / [N, P, out], P the smallest
/// pool (at most `SUPPORT_POOL_SIZE`); tasks shared by models are read once.
fn support_pools(
    family: Family,
    schema: &FeatureSchema,
    tasks: &[TaskSpec],
    words: Option<&WordsScorer>,
) -> Result<(Tensor, Tensor), DatasetError> {
    let mut by_task: std::collections::HashMap<String, Descriptor> =
        std::collections::HashMap::new();
    let mut pools = Vec::with_capacity(tasks.len());
    for task in tasks {
        let key = serde_json::to_string(task).unwrap_or_default();
        if !by_task.contains_key(&key) {
            let (support_x, support_y) = match words {
                Some(words) => {
                    let d = describe_words(&words.examples(task, SUPPORT_POOL_SIZE, 1));
                    (d.support_x, d.support_y)
                }
                None => {
                    let data = family.data(task, Device::Cpu)?;
                    crate::tasks::featurizer::support_pool(family, task, &data, SUPPORT_POOL_SIZE)
                }
            };
            by_task.insert(
                key.clone(),
                Descriptor {
                    features: Default::default(),
                    support_x,
                    support_y,
                },
            );
        }
        pools.push(key);
    }
    let size = by_task
        .values()
        .map(|d| d.support_x.len())
        .min()
        .unwrap_or(0);
    let mut tensors: std::collections::HashMap<&str, (Tensor, Tensor)> =
        std::collections::HashMap::new();
    for (key, d) in &by_task {
        let trimmed = Descriptor {
            features: Default::default(),
            support_x: d.support_x[..size].to_vec(),
            support_y: d.support_y[..size].to_vec(),
        };
        let pair = trimmed
            .support_tensors(schema, support_ways(family))
            .map_err(|e| DatasetError::Input {
                field: "zoo",
                reason: format!("support pool: {e}"),
            })?
            .ok_or_else(|| DatasetError::Input {
                field: "zoo",
                reason: "support pool: the schema takes no support set".into(),
            })?;
        tensors.insert(key.as_str(), pair);
    }
    let xs: Vec<Tensor> = pools
        .iter()
        .map(|k| tensors[k.as_str()].0.shallow_clone())
        .collect();
    let ys: Vec<Tensor> = pools
        .iter()
        .map(|k| tensors[k.as_str()].1.shallow_clone())
        .collect();
    Ok((Tensor::stack(&xs, 0), Tensor::stack(&ys, 0)))
}

/// Classes (or 1 for regression) the support targets are encoded over.
pub fn support_ways(family: Family) -> usize {
    match family {
        Family::Digits => crate::tasks::families::DIGITS_WAYS,
        Family::Sinusoid | Family::DigitInr | Family::Words => 1,
    }
}

impl ZooDataset {
    /// Loads zoo `zoo` from the catalog and blob store (every model,
    /// aligned unless it was built from one shared init).
    pub async fn load(
        catalog: &Arc<dyn Catalog>,
        blobs: &BlobStore,
        zoo: &str,
    ) -> Result<Self, DatasetError> {
        Self::load_with(catalog, blobs, zoo, &LoadOptions::default()).await
    }

    /// Loads zoo `zoo` as `options` say.
    pub async fn load_with(
        catalog: &Arc<dyn Catalog>,
        blobs: &BlobStore,
        zoo: &str,
        options: &LoadOptions,
    ) -> Result<Self, DatasetError> {
        let plan = catalog.zoo(zoo).await?.ok_or_else(|| DatasetError::Input {
            field: "zoo",
            reason: format!("no zoo called {zoo:?}"),
        })?;
        let family = Family::parse(&plan.family)?;
        let network = family.network(&plan.architecture)?;
        let shared_init = plan.config["shared_init"].as_bool().unwrap_or(false);
        let schema: FeatureSchema = serde_json::from_value(plan.config["feature_schema"].clone())
            .unwrap_or_else(|_| schema(family));
        let filter = ZooModelFilter {
            zoo: Some(zoo.to_owned()),
            ..Default::default()
        };
        let mut models = Vec::new();
        let mut page = PageRequest::first(crate::catalog::MAX_PAGE_SIZE);
        loop {
            let got = catalog.zoo_models(&filter, &page).await?;
            models.extend(got.items);
            if got.next_token.is_empty() {
                break;
            }
            page.token = got.next_token;
        }
        models.sort_by(|a, b| a.id.cmp(&b.id));
        if let Some(n) = options.max_models {
            models.truncate(n);
        }
        if models.len() < 2 {
            return Err(DatasetError::Input {
                field: "zoo",
                reason: format!(
                    "zoo {zoo:?} has {} models; at least 2 are needed",
                    models.len()
                ),
            });
        }
        let mut params: Vec<Vec<Tensor>> = Vec::with_capacity(models.len());
        let mut tasks: Vec<TaskSpec> = Vec::with_capacity(models.len());
        let mut descriptors: Vec<Descriptor> = Vec::with_capacity(models.len());
        for model in &models {
            let bytes = blobs.get(&model.sha256).await?;
            let decoded = decode_safetensors(&bytes)?;
            network.spec.check(
                decoded
                    .specs
                    .iter()
                    .map(|t| (t.name.as_str(), t.shape.as_slice())),
            )?;
            let by_name: std::collections::HashMap<&str, &Tensor> = decoded
                .tensors
                .iter()
                .map(|(n, t)| (n.as_str(), t))
                .collect();
            params.push(
                network
                    .spec
                    .tensors
                    .iter()
                    .map(|t| by_name[t.name.as_str()].to_kind(Kind::Float))
                    .collect(),
            );
            let corrupt = |what: &str, e: serde_json::Error| DatasetError::Input {
                field: "zoo",
                reason: format!("model {}: {what}: {e}", model.id),
            };
            tasks.push(
                serde_json::from_value(model.task["spec"].clone())
                    .map_err(|e| corrupt("task", e))?,
            );
            descriptors.push(
                serde_json::from_value(model.task["descriptor"].clone())
                    .map_err(|e| corrupt("descriptor", e))?,
            );
        }
        let aligned = match options.align {
            AlignChoice::Auto => !shared_init,
            AlignChoice::Always => true,
            AlignChoice::Never => false,
        };
        if aligned {
            let spec = PermutationSpec::new(&network.spec)?;
            let reference: Vec<Tensor> = params[0].iter().map(Tensor::shallow_clone).collect();
            for p in params.iter_mut().skip(1) {
                *p = align(&spec, &reference, p, ALIGN_SWEEPS).0;
            }
        }
        let weights = Tensor::stack(
            &params
                .iter()
                .map(|p| Tensor::cat(&p.iter().map(|t| t.reshape([-1])).collect::<Vec<_>>(), 0))
                .collect::<Vec<_>>(),
            0,
        );
        let mut feature_rows = Vec::with_capacity(models.len());
        let mut support_x = Vec::new();
        let mut support_y = Vec::new();
        for (model, d) in models.iter().zip(&descriptors) {
            let bad = |e: crate::tasks::FeatureError| DatasetError::Input {
                field: "zoo",
                reason: format!("model {}: {e}", model.id),
            };
            feature_rows.push(Tensor::from_slice(&d.feature_vector(&schema).map_err(bad)?));
            if let Some((x, y)) = d
                .support_tensors(&schema, support_ways(family))
                .map_err(bad)?
            {
                support_x.push(x);
                support_y.push(y);
            }
        }
        let support = if support_x.len() == models.len() {
            let k = support_x[0].size()[0];
            if support_x.iter().any(|x| x.size()[0] != k) {
                return Err(DatasetError::Input {
                    field: "zoo",
                    reason: "support sets of different sizes".into(),
                });
            }
            Some((Tensor::stack(&support_x, 0), Tensor::stack(&support_y, 0)))
        } else {
            None
        };
        let words = match family {
            Family::Words => Some(
                WordsScorer::load(catalog, blobs, &plan.config, &network)
                    .await
                    .map_err(|e| DatasetError::Input {
                        field: "zoo",
                        reason: e.to_string(),
                    })?,
            ),
            _ => None,
        };
        let support_pool = match &support {
            Some(_) => Some(support_pools(family, &schema, &tasks, words.as_ref())?),
            None => None,
        };
        Ok(Self {
            family,
            network,
            schema,
            models,
            tasks,
            descriptors,
            weights: weights.to_device(Device::Cpu),
            features: Tensor::stack(&feature_rows, 0),
            support,
            support_pool,
            aligned,
            words,
        })
    }

    /// Number of models.
    pub fn len(&self) -> usize {
        self.models.len()
    }

    /// Ids of the models trained on a held-out task (a zoo built before the
    /// split moved, or uploaded with such a task): an evaluation on this zoo
    /// would score methods on tasks they were trained on.
    pub fn held_out_models(&self) -> Vec<&str> {
        self.models
            .iter()
            .zip(&self.tasks)
            .filter(|(_, task)| self.family.is_held_out(task))
            .map(|(model, _)| model.id.as_str())
            .collect()
    }

    /// The descriptor a client would send for `task` (through the featurizer;
    /// for a `words` zoo, example words from its lists), None when the
    /// task's data cannot be made.
    pub fn describe(&self, task: &TaskSpec) -> Option<Descriptor> {
        match &self.words {
            Some(words) => Some(words.describe(task)),
            None => self
                .family
                .data(task, Device::Cpu)
                .ok()
                .map(|d| crate::tasks::describe(self.family, task, &d)),
        }
    }

    /// Whether the zoo is empty (never, once loaded).
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }
}
