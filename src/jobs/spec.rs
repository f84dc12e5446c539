//! The one shape of each job: [`ZooSpec`] (build a zoo) and [`TrainSpec`]
//! (train a denoiser). Each is at once the flags of `weightgen-worker` and
//! `weightgen jobs submit-*` (flattened `clap::Args`, every flag also an env
//! var), the JSON stored in the catalog's `jobs.spec_json`, and — converted
//! field by field in `serve::convert` — the proto's `BuildZooSpec` and
//! `TrainDenoiserSpec`. Defaults live here once (the constants below, used by
//! both `Default` and clap); adding an option means a field here, one in the
//! proto and its line in the conversion.

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use tch::Device;

use crate::cancel::CancelFlag;
use crate::diffusion::objective::Prediction;
use crate::diffusion::schedule::{DEFAULT_TIMESTEPS, ScheduleKind};
use crate::model::fit::{DEFAULT_BATCH_SIZE, DEFAULT_COND_DROPOUT, DEFAULT_LEARNING_RATE};
use crate::model::layer_transformer::{DEFAULT_DEPTH, DEFAULT_HEADS, DEFAULT_TOKEN_WIDTH};
use crate::model::mlp_unet::DEFAULT_BLOCKS_PER_LEVEL;
use crate::model::weight_autoencoder::DEFAULT_AE_STEPS;
use crate::model::{
    Conditioning, FitConfig, LayerTransformerConfig, LrSchedule, MlpUnetConfig, NetConfig,
    PrecisionChoice, TokenLayout,
};
use crate::tasks::{Family, TrainConfig};
use crate::train::{
    DEFAULT_CHECKPOINT_EVERY, DEFAULT_EMA_DECAY, DEFAULT_VAL_FRACTION, LatentChoice,
    TrainDenoiserConfig,
};
use crate::zoo::{AlignChoice, LoadOptions};
use crate::zoo::{WordsBaseConfig, ZooBuildConfig};

/// Training steps of the proposal.
pub const DEFAULT_TRAIN_STEPS: usize = 200_000;
/// Widths of the default MLP U-Net.
pub const DEFAULT_WIDTHS: [i64; 2] = [512, 256];
/// Held-out tasks the quality gate samples.
pub const DEFAULT_EVAL_TASKS: usize = 20;
/// Guidance scale of the quality gate.
pub const DEFAULT_EVAL_GUIDANCE: f64 = 1.0;
/// Steps between log points.
pub const DEFAULT_LOG_EVERY: usize = 1000;
/// Size E of the task embedding (the best of 16/64/256 in the digits
/// ablation, docs/RESULTS.md).
pub const DEFAULT_EMBED_DIM: i64 = 256;
/// Hidden width of the task encoder.
pub const DEFAULT_ENCODER_HIDDEN: i64 = 128;
/// Most batch parts a training run may compute on threads of their own.
pub const MAX_DATA_PARALLEL: usize = 64;

/// Most attention windows a training step may ask for.
pub const MAX_TRAIN_WINDOWS: usize = 65_536;
/// Default space of diffusion: a PCA latent of the size `pca:auto` picks.
pub const DEFAULT_LATENT: LatentChoice = LatentChoice::PcaAuto;
/// Default share of rows trained on the support set alone (features
/// withheld), where the zoo's descriptors have both.
pub const DEFAULT_FEATURE_DROPOUT: f64 = 0.25;
/// Default share of rows trained on the features alone (support set
/// withheld), where the zoo's descriptors have both.
pub const DEFAULT_SUPPORT_DROPOUT: f64 = 0.25;
/// Most zoo models one job may ask for.
pub const MAX_ZOO_MODELS: u64 = 1_000_000;
/// Most snapshots a zoo job may keep per model.
pub const MAX_KEEP_SNAPSHOTS: usize = 1000;

/// A spec field that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SpecError {
    /// The field, as the API names it.
    pub field: String,
    /// Why.
    pub reason: String,
}

fn invalid(field: &str, reason: impl Into<String>) -> SpecError {
    SpecError {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// Refuses `value` outside [`low`, `high`], naming `field`.
fn within(field: &str, value: i128, low: i128, high: i128) -> Result<(), SpecError> {
    if (low..=high).contains(&value) {
        Ok(())
    } else {
        Err(invalid(field, format!("{value} is not in [{low}, {high}]")))
    }
}

/// Build (or finish) a zoo of a built-in task family.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(deny_unknown_fields)]
pub struct ZooSpec {
    /// Zoo name (default: the family's name).
    #[arg(long, env = "WEIGHTGEN_ZOO_NAME")]
    #[serde(default, deserialize_with = "empty_as_none")]
    pub zoo: Option<String>,
    /// Task family: sinusoid, digits, digit-inr or words.
    #[arg(long, env = "WEIGHTGEN_ZOO_FAMILY")]
    pub family: String,
    /// Architecture within the family (default: the family's first).
    #[arg(long, env = "WEIGHTGEN_ZOO_ARCHITECTURE", default_value = "")]
    #[serde(default)]
    pub architecture: String,
    /// Number of models the zoo has when the job ends (already built ones count).
    #[arg(
        long = "models",
        visible_alias = "num-models",
        env = "WEIGHTGEN_ZOO_MODELS"
    )]
    pub num_models: u64,
    /// Start every model from one shared initialization (default: one
    /// initialization per model).
    #[arg(long, env = "WEIGHTGEN_ZOO_SHARED_INIT")]
    #[serde(default)]
    pub shared_init: bool,
    /// Seed of tasks, initializations and training order; model i uses a
    /// seed derived from it and i.
    #[arg(long, env = "WEIGHTGEN_ZOO_SEED", default_value_t = 0)]
    #[serde(default)]
    pub seed: u64,
    /// Optimizer steps per model (default: the family's).
    #[arg(long, env = "WEIGHTGEN_ZOO_STEPS")]
    #[serde(default)]
    pub steps: Option<usize>,
    /// Adam learning rate of each model (default: the family's).
    #[arg(long, env = "WEIGHTGEN_ZOO_LEARNING_RATE")]
    #[serde(default)]
    pub learning_rate: Option<f64>,
    /// Keep this many checkpoints of each run, the last one being the end
    /// (0: the final model only).
    #[arg(
        long,
        visible_alias = "keep-last-checkpoints",
        env = "WEIGHTGEN_ZOO_KEEP_SNAPSHOTS",
        default_value_t = 0
    )]
    #[serde(default)]
    pub keep_snapshots: usize,
    /// `words`: Adam steps of the base model the adapters adapt (trained
    /// once, stored as the one-model zoo named by its settings; default
    /// 3,000).
    #[arg(long, env = "WEIGHTGEN_ZOO_BASE_STEPS")]
    #[serde(default)]
    pub base_steps: Option<usize>,
}

/// Reads `""` (how older job rows stored "no zoo name") as `None`.
fn empty_as_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.filter(|s| !s.is_empty()))
}

impl ZooSpec {
    /// Checks the spec, naming the first bad field.
    pub fn validate(&self) -> Result<Family, SpecError> {
        let family =
            Family::parse(&self.family).map_err(|e| invalid("build_zoo.family", e.to_string()))?;
        family
            .network(&self.architecture)
            .map_err(|e| invalid("build_zoo.architecture", e.to_string()))?;
        if !(1..=MAX_ZOO_MODELS).contains(&self.num_models) {
            return Err(invalid(
                "build_zoo.num_models",
                format!("{} is not in 1..={MAX_ZOO_MODELS}", self.num_models),
            ));
        }
        if self.steps == Some(0) {
            return Err(invalid("build_zoo.steps", "must be positive"));
        }
        if let Some(lr) = self
            .learning_rate
            .filter(|lr| !(lr.is_finite() && *lr > 0.0))
        {
            return Err(invalid(
                "build_zoo.learning_rate",
                format!("{lr} is not a positive number"),
            ));
        }
        if self.base_steps == Some(0) {
            return Err(invalid("build_zoo.base_steps", "must be positive"));
        }
        if self.base_steps.is_some() && family != Family::Words {
            return Err(invalid(
                "build_zoo.base_steps",
                format!("only words zoos have a base model, not {}", family.name()),
            ));
        }
        if self.keep_snapshots > MAX_KEEP_SNAPSHOTS {
            return Err(invalid(
                "build_zoo.keep_last_checkpoints",
                format!("{} is more than {MAX_KEEP_SNAPSHOTS}", self.keep_snapshots),
            ));
        }
        Ok(family)
    }

    /// The builder's config for `worker`, with `lanes` models at a time.
    pub fn to_config(
        &self,
        worker: &str,
        lanes: usize,
        lease: std::time::Duration,
        device: Device,
        cancel: CancelFlag,
    ) -> Result<ZooBuildConfig, SpecError> {
        let family = self.validate()?;
        let defaults = family.train_config();
        Ok(ZooBuildConfig {
            zoo: self.zoo_name(),
            family,
            architecture: self.architecture.clone(),
            num_models: self.num_models,
            seed: self.seed,
            shared_init: self.shared_init,
            train: TrainConfig {
                steps: self.steps.unwrap_or(defaults.steps),
                learning_rate: self.learning_rate.unwrap_or(defaults.learning_rate),
                batch_size: defaults.batch_size,
                keep_snapshots: self.keep_snapshots,
            },
            worker: worker.to_owned(),
            jobs: lanes.max(1),
            lease,
            device,
            max_models: None,
            cancel,
            words_base: {
                let defaults = WordsBaseConfig::default();
                WordsBaseConfig {
                    steps: self.base_steps.unwrap_or(defaults.steps),
                    ..defaults
                }
            },
        })
    }

    /// The zoo's name.
    pub fn zoo_name(&self) -> String {
        self.zoo.clone().unwrap_or_else(|| self.family.clone())
    }
}

/// The denoiser network a training spec names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum DenoiserKind {
    /// The proposal's MLP U-Net.
    #[default]
    #[value(name = "mlp_unet")]
    MlpUnet,
    /// A transformer over per-layer weight tokens (adaLN conditioning).
    #[value(name = "layer_transformer")]
    LayerTransformer,
    /// The layer transformer over one token per hidden unit (its row, bias
    /// and outgoing column) without unit positions: equivariant to
    /// permutations of the units, so an unaligned zoo of independent inits
    /// needs no alignment (exactly for one hidden layer). Needs --latent none.
    #[value(name = "unit_transformer")]
    UnitTransformer,
}

/// The noise schedule a training spec names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum NoiseSchedule {
    /// The proposal's cosine schedule.
    #[default]
    Cosine,
    /// β linear over the steps (DDPM's).
    Linear,
}

impl NoiseSchedule {
    /// The schedule with its default parameters.
    pub fn kind(self) -> ScheduleKind {
        match self {
            Self::Cosine => ScheduleKind::cosine(),
            Self::Linear => ScheduleKind::linear(),
        }
    }
}

/// Train a denoiser on a zoo and publish it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSpec {
    /// The zoo to train on (required).
    #[arg(long, env = "WEIGHTGEN_TRAIN_ZOO")]
    pub zoo: String,
    /// Id of the published denoiser version (default: the job's
    /// "ZOO-JOB_ID", so a retried job resumes the same run; the worker's
    /// "ZOO-UNIX_SECONDS").
    #[arg(long, env = "WEIGHTGEN_TRAIN_DENOISER_ID")]
    pub denoiser_id: Option<String>,
    /// Checked against the zoo's architecture when given.
    #[arg(long, env = "WEIGHTGEN_TRAIN_ARCHITECTURE")]
    pub architecture: Option<String>,
    /// Optimizer steps (the proposal: 200,000).
    #[arg(long, visible_alias = "iterations", env = "WEIGHTGEN_TRAIN_STEPS", default_value_t = DEFAULT_TRAIN_STEPS)]
    pub steps: usize,
    /// Rows per step (the proposal: 64).
    #[arg(long, env = "WEIGHTGEN_TRAIN_BATCH_SIZE", default_value_t = DEFAULT_BATCH_SIZE)]
    pub batch_size: i64,
    /// Adam learning rate (the proposal: 1e-4).
    #[arg(long, env = "WEIGHTGEN_TRAIN_LEARNING_RATE", default_value_t = DEFAULT_LEARNING_RATE)]
    pub learning_rate: f64,
    /// Learning-rate schedule: constant (the proposal) or cosine (down to a
    /// tenth of the rate at the last step).
    #[arg(long, value_enum, env = "WEIGHTGEN_TRAIN_LR_SCHEDULE", default_value_t = LrSchedule::Constant)]
    pub lr_schedule: LrSchedule,
    /// Decoupled weight decay, as `torch.optim.AdamW` applies it: every step
    /// shrinks the weights by learning rate × this (0: Adam, the proposal's).
    #[arg(long, env = "WEIGHTGEN_TRAIN_WEIGHT_DECAY", default_value_t = 0.0)]
    #[serde(skip_serializing_if = "is_zero")]
    pub weight_decay: f64,
    /// Share of rows trained with the null condition (classifier-free guidance).
    #[arg(long, env = "WEIGHTGEN_TRAIN_COND_DROPOUT", default_value_t = DEFAULT_COND_DROPOUT)]
    pub cond_dropout: f64,
    /// Share of rows whose descriptor features are withheld (support set
    /// kept), so the denoiser can also be conditioned on a support set alone.
    #[arg(long, env = "WEIGHTGEN_TRAIN_FEATURE_DROPOUT", default_value_t = DEFAULT_FEATURE_DROPOUT)]
    pub feature_dropout: f64,
    /// Share of rows whose support set is withheld (features kept), so the
    /// denoiser can also be conditioned on the features alone.
    #[arg(long, env = "WEIGHTGEN_TRAIN_SUPPORT_DROPOUT", default_value_t = DEFAULT_SUPPORT_DROPOUT)]
    pub support_dropout: f64,
    /// Space of diffusion: none (the standardized weights), pca:K,
    /// pca:auto (the smallest PCA latent whose rebuilt zoo models keep their
    /// test score), or ae:K (an autoencoder latent of K coordinates, trained
    /// on the training zoo first).
    #[arg(long, env = "WEIGHTGEN_TRAIN_LATENT", default_value_t = DEFAULT_LATENT)]
    #[serde(with = "as_text")]
    pub latent: LatentChoice,
    /// Adam steps that train an `ae:K` latent's autoencoder (ignored by the
    /// other latents).
    #[arg(long, env = "WEIGHTGEN_TRAIN_LATENT_STEPS", default_value_t = DEFAULT_AE_STEPS)]
    #[serde(skip_serializing_if = "is_default_latent_steps")]
    pub latent_steps: usize,
    /// Denoiser network: mlp_unet (the proposal) or layer_transformer.
    #[arg(long, value_enum, env = "WEIGHTGEN_TRAIN_KIND", default_value_t = DenoiserKind::MlpUnet)]
    pub kind: DenoiserKind,
    /// How the MLP U-Net takes in the condition: film (the proposal) or concat.
    #[arg(long, value_enum, env = "WEIGHTGEN_TRAIN_CONDITIONING", default_value_t = Conditioning::Film)]
    pub conditioning: Conditioning,
    /// Diffusion steps T (the proposal: 1000).
    #[arg(long, env = "WEIGHTGEN_TRAIN_TIMESTEPS", default_value_t = DEFAULT_TIMESTEPS)]
    pub timesteps: usize,
    /// Noise schedule: cosine (the proposal) or linear.
    #[arg(long, value_enum, env = "WEIGHTGEN_TRAIN_SCHEDULE", default_value_t = NoiseSchedule::Cosine)]
    pub schedule: NoiseSchedule,
    /// What the network predicts: epsilon (the proposal), x0 or v (default:
    /// epsilon for the MLP U-Net, v for the layer transformer, which an ε
    /// loss does not train to generate weights — docs/RESULTS.md).
    #[arg(long, value_enum, env = "WEIGHTGEN_TRAIN_PREDICTION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prediction: Option<Prediction>,
    /// Residual blocks per MLP U-Net level on each side.
    #[arg(long, env = "WEIGHTGEN_TRAIN_BLOCKS_PER_LEVEL", default_value_t = DEFAULT_BLOCKS_PER_LEVEL)]
    pub blocks_per_level: usize,
    /// Hidden width of the task encoder's paths (features, support pairs,
    /// label prototypes).
    #[arg(long, env = "WEIGHTGEN_TRAIN_ENCODER_HIDDEN", default_value_t = DEFAULT_ENCODER_HIDDEN)]
    pub encoder_hidden: i64,
    /// Size E of the task embedding.
    #[arg(long, env = "WEIGHTGEN_TRAIN_EMBED_DIM", default_value_t = DEFAULT_EMBED_DIM)]
    pub embed_dim: i64,
    /// Layer and unit transformers: token width H (the MLP U-Net ignores it).
    #[arg(long, env = "WEIGHTGEN_TRAIN_TRANSFORMER_WIDTH", default_value_t = DEFAULT_TOKEN_WIDTH)]
    #[serde(skip_serializing_if = "is_default_transformer_width")]
    pub transformer_width: i64,
    /// Layer and unit transformers: transformer blocks.
    #[arg(long, env = "WEIGHTGEN_TRAIN_TRANSFORMER_DEPTH", default_value_t = DEFAULT_DEPTH)]
    #[serde(skip_serializing_if = "is_default_transformer_depth")]
    pub transformer_depth: usize,
    /// Layer and unit transformers: attention heads (must divide the width).
    #[arg(long, env = "WEIGHTGEN_TRAIN_TRANSFORMER_HEADS", default_value_t = DEFAULT_HEADS)]
    #[serde(skip_serializing_if = "is_default_transformer_heads")]
    pub transformer_heads: i64,
    /// Permutation alignment of the zoo: auto (unless built from one shared
    /// init), always or never.
    #[arg(long, value_enum, env = "WEIGHTGEN_TRAIN_ALIGN", default_value_t = AlignChoice::Auto)]
    pub align: AlignChoice,
    /// Train on the first N zoo models only (by id; default: all).
    #[arg(long, env = "WEIGHTGEN_TRAIN_MAX_MODELS")]
    pub max_models: Option<usize>,
    /// Decay of the weights' exponential moving average, which is what gets
    /// published (0: the last weights).
    #[arg(long, env = "WEIGHTGEN_TRAIN_EMA_DECAY", default_value_t = DEFAULT_EMA_DECAY)]
    pub ema_decay: f64,
    /// Share of zoo models held out for validation.
    #[arg(long, env = "WEIGHTGEN_TRAIN_VAL_FRACTION", default_value_t = DEFAULT_VAL_FRACTION)]
    pub val_fraction: f64,
    /// Widths of the MLP U-Net levels, widest first.
    #[arg(long, env = "WEIGHTGEN_TRAIN_WIDTHS", value_delimiter = ',', default_values_t = DEFAULT_WIDTHS)]
    pub widths: Vec<i64>,
    /// Seed of initialization, batches, noise and the quality gate.
    #[arg(long, env = "WEIGHTGEN_TRAIN_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Held-out tasks the quality gate scores.
    #[arg(long, env = "WEIGHTGEN_TRAIN_EVAL_TASKS", default_value_t = DEFAULT_EVAL_TASKS)]
    pub eval_tasks: usize,
    /// Classifier-free guidance scale of the quality gate's samples.
    #[arg(long, env = "WEIGHTGEN_TRAIN_EVAL_GUIDANCE", default_value_t = DEFAULT_EVAL_GUIDANCE)]
    pub eval_guidance: f64,
    /// Log and validate every this many steps.
    #[arg(long, env = "WEIGHTGEN_TRAIN_LOG_EVERY", default_value_t = DEFAULT_LOG_EVERY)]
    pub log_every: usize,
    /// Save a resumable training checkpoint every this many steps (0 = never).
    #[arg(long, env = "WEIGHTGEN_TRAIN_CHECKPOINT_EVERY", default_value_t = DEFAULT_CHECKPOINT_EVERY)]
    pub checkpoint_every: usize,
    /// auto (fp16 autocast with loss scaling on CUDA, fp32 elsewhere), fp32 or fp16.
    #[arg(long, env = "WEIGHTGEN_TRAIN_PRECISION", default_value_t = PrecisionChoice::Auto)]
    #[serde(with = "as_text")]
    pub precision: PrecisionChoice,
    /// Split each batch into this many parts, each computed on a thread of
    /// its own (CPU, with one intra-op thread); pays at larger batches, not
    /// at the demo's (BENCHMARKS.md). 1 splits nothing.
    #[arg(long, env = "WEIGHTGEN_TRAIN_DATA_PARALLEL", default_value_t = 1)]
    pub data_parallel: usize,
    /// Layer transformer: attention windows (256 tokens of 64 weights each)
    /// every step trains on, drawn at random per step, when a vector has
    /// more; bounds a step's memory for networks of millions of weights
    /// (default: all windows).
    #[arg(long, env = "WEIGHTGEN_TRAIN_WINDOWS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_windows: Option<usize>,
    /// Further zoos of the zoo's family with other architectures (comma
    /// separated): one denoiser then learns every zoo's architecture in one
    /// union of their weight spaces and generates each of them — and
    /// unseen widths of them — from one checkpoint. Needs --latent none.
    #[arg(
        long = "also-zoo",
        env = "WEIGHTGEN_TRAIN_ALSO_ZOOS",
        value_delimiter = ','
    )]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub also_zoos: Vec<String>,
    /// Make the result the active denoiser of its architecture once published.
    #[arg(long, env = "WEIGHTGEN_TRAIN_ACTIVATE")]
    pub activate: bool,
}

impl Default for TrainSpec {
    /// The proposal's defaults, with no zoo named (which `validate` refuses).
    fn default() -> Self {
        Self {
            zoo: String::new(),
            denoiser_id: None,
            architecture: None,
            steps: DEFAULT_TRAIN_STEPS,
            batch_size: DEFAULT_BATCH_SIZE,
            learning_rate: DEFAULT_LEARNING_RATE,
            lr_schedule: LrSchedule::Constant,
            weight_decay: 0.0,
            cond_dropout: DEFAULT_COND_DROPOUT,
            feature_dropout: DEFAULT_FEATURE_DROPOUT,
            support_dropout: DEFAULT_SUPPORT_DROPOUT,
            latent: DEFAULT_LATENT,
            latent_steps: DEFAULT_AE_STEPS,
            kind: DenoiserKind::MlpUnet,
            conditioning: Conditioning::Film,
            timesteps: DEFAULT_TIMESTEPS,
            schedule: NoiseSchedule::Cosine,
            prediction: None,
            blocks_per_level: DEFAULT_BLOCKS_PER_LEVEL,
            encoder_hidden: DEFAULT_ENCODER_HIDDEN,
            embed_dim: DEFAULT_EMBED_DIM,
            transformer_width: DEFAULT_TOKEN_WIDTH,
            transformer_depth: DEFAULT_DEPTH,
            transformer_heads: DEFAULT_HEADS,
            align: AlignChoice::Auto,
            max_models: None,
            ema_decay: DEFAULT_EMA_DECAY,
            val_fraction: DEFAULT_VAL_FRACTION,
            widths: DEFAULT_WIDTHS.to_vec(),
            seed: 0,
            eval_tasks: DEFAULT_EVAL_TASKS,
            eval_guidance: DEFAULT_EVAL_GUIDANCE,
            log_every: DEFAULT_LOG_EVERY,
            checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
            precision: PrecisionChoice::Auto,
            data_parallel: 1,
            train_windows: None,
            also_zoos: Vec::new(),
            activate: false,
        }
    }
}

/// Serde as the type's text form (`Display` / `FromStr`), as job rows
/// store `latent` ("pca:auto") and `precision` ("fp32").
mod as_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<T: std::fmt::Display, S: Serializer>(
        value: &T,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_str(value)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: std::str::FromStr<Err = String>,
        D: Deserializer<'de>,
    {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Left out of stored specs at its default, so a worker from before the
/// option existed still reads them.
fn is_default_latent_steps(steps: &usize) -> bool {
    *steps == DEFAULT_AE_STEPS
}

/// Weight decay is left out of stored specs when off, for the same reason.
fn is_zero(value: &f64) -> bool {
    *value == 0.0
}

/// The transformer's sizes are left out of stored specs at their defaults,
/// for the same reason.
fn is_default_transformer_width(width: &i64) -> bool {
    *width == DEFAULT_TOKEN_WIDTH
}

fn is_default_transformer_depth(depth: &usize) -> bool {
    *depth == DEFAULT_DEPTH
}

fn is_default_transformer_heads(heads: &i64) -> bool {
    *heads == DEFAULT_HEADS
}

impl TrainSpec {
    /// A spec with the proposal's defaults for `zoo`.
    pub fn new(zoo: &str) -> Self {
        Self {
            zoo: zoo.to_owned(),
            ..Self::default()
        }
    }

    /// Checks the spec, naming the first bad field (as the proto names it).
    pub fn validate(&self) -> Result<(), SpecError> {
        let positive = |field: &str, x: f64| {
            if x.is_finite() && x > 0.0 {
                Ok(())
            } else {
                Err(invalid(field, format!("{x} is not a positive number")))
            }
        };
        let fraction = |field: &str, x: f64| {
            if (0.0..1.0).contains(&x) {
                Ok(())
            } else {
                Err(invalid(field, format!("{x} is not in [0, 1)")))
            }
        };
        if self.zoo.is_empty() {
            return Err(invalid("train_denoiser.zoo", "required"));
        }
        if let Some(id) = &self.denoiser_id {
            crate::train::check_denoiser_id(id)
                .map_err(|e| invalid("train_denoiser.denoiser_id", e))?;
        }
        if matches!(self.latent, LatentChoice::Autoencoder(_)) && self.latent_steps == 0 {
            return Err(invalid("train_denoiser.latent_steps", "must be positive"));
        }
        if self.steps == 0 {
            return Err(invalid("train_denoiser.steps", "must be positive"));
        }
        if self.batch_size <= 0 {
            return Err(invalid("train_denoiser.batch_size", "must be positive"));
        }
        positive("train_denoiser.learning_rate", self.learning_rate)?;
        if !(self.weight_decay >= 0.0 && self.learning_rate * self.weight_decay < 1.0) {
            return Err(invalid(
                "train_denoiser.weight_decay",
                format!(
                    "{} must be ≥ 0 with learning_rate × weight_decay < 1",
                    self.weight_decay
                ),
            ));
        }
        fraction("train_denoiser.cond_dropout", self.cond_dropout)?;
        fraction("train_denoiser.feature_dropout", self.feature_dropout)?;
        fraction("train_denoiser.support_dropout", self.support_dropout)?;
        if self.feature_dropout + self.support_dropout >= 1.0 {
            return Err(invalid(
                "train_denoiser.support_dropout",
                format!(
                    "feature_dropout + support_dropout = {} leaves no row with both inputs",
                    self.feature_dropout + self.support_dropout
                ),
            ));
        }
        self.net()?;
        within(
            "train_denoiser.blocks_per_level",
            self.blocks_per_level as i128,
            1,
            64,
        )?;
        within(
            "train_denoiser.timesteps",
            self.timesteps as i128,
            2,
            100_000,
        )?;
        within(
            "train_denoiser.encoder_hidden",
            self.encoder_hidden as i128,
            1,
            4096,
        )?;
        within("train_denoiser.embed_dim", self.embed_dim as i128, 1, 4096)?;
        within(
            "train_denoiser.transformer_width",
            self.transformer_width as i128,
            1,
            4096,
        )?;
        within(
            "train_denoiser.transformer_depth",
            self.transformer_depth as i128,
            1,
            64,
        )?;
        if self.transformer_heads <= 0 || self.transformer_width % self.transformer_heads != 0 {
            return Err(invalid(
                "train_denoiser.transformer_heads",
                format!(
                    "{} must be ≥ 1 and divide the transformer width {}",
                    self.transformer_heads, self.transformer_width
                ),
            ));
        }
        if self.max_models.is_some_and(|n| n < 2) {
            return Err(invalid("train_denoiser.max_models", "at least 2"));
        }
        fraction("train_denoiser.ema_decay", self.ema_decay)?;
        fraction("train_denoiser.val_fraction", self.val_fraction)?;
        if self.widths.is_empty() || self.widths.iter().any(|&w| w <= 0 || w > 65_536) {
            return Err(invalid(
                "train_denoiser.widths",
                format!("{:?} must be widths in [1, 65536]", self.widths),
            ));
        }
        if self.data_parallel == 0
            || self.data_parallel > MAX_DATA_PARALLEL
            || self.data_parallel as i64 > self.batch_size
        {
            return Err(invalid(
                "train_denoiser.data_parallel",
                format!(
                    "{} is not in [1, {MAX_DATA_PARALLEL}] or exceeds the batch size {}",
                    self.data_parallel, self.batch_size
                ),
            ));
        }
        if self
            .train_windows
            .is_some_and(|n| n == 0 || n > MAX_TRAIN_WINDOWS)
        {
            return Err(invalid(
                "train_denoiser.train_windows",
                format!("must be in [1, {MAX_TRAIN_WINDOWS}]"),
            ));
        }
        if self.kind == DenoiserKind::UnitTransformer {
            if self.latent != LatentChoice::None {
                return Err(invalid(
                    "train_denoiser.latent",
                    "the unit transformer makes tokens of the weights themselves: latent must be none",
                ));
            }
            if !self.also_zoos.is_empty() {
                return Err(invalid(
                    "train_denoiser.also_zoos",
                    "the unit transformer learns one architecture",
                ));
            }
        }
        if !self.also_zoos.is_empty() {
            if self.latent != LatentChoice::None {
                return Err(invalid(
                    "train_denoiser.also_zoos",
                    "a denoiser of several architectures diffuses their weights: latent must be none",
                ));
            }
            if let Some(zoo) = self
                .also_zoos
                .iter()
                .find(|z| z.is_empty() || **z == self.zoo)
            {
                return Err(invalid(
                    "train_denoiser.also_zoos",
                    format!("{zoo:?} is empty or the zoo itself"),
                ));
            }
        }
        if self.eval_guidance.is_nan() || self.eval_guidance < 0.0 {
            return Err(invalid("train_denoiser.eval_guidance", "must be ≥ 0"));
        }
        Ok(())
    }

    /// What the network predicts: as asked, else the kind's default (ε,
    /// the proposal's, for the MLP U-Net; v for the layer transformer).
    pub fn prediction(&self) -> Prediction {
        self.prediction.unwrap_or(match self.kind {
            DenoiserKind::MlpUnet => Prediction::Epsilon,
            DenoiserKind::LayerTransformer | DenoiserKind::UnitTransformer => Prediction::V,
        })
    }

    /// The layer transformer's default config at the spec's sizes.
    fn transformer(&self) -> LayerTransformerConfig {
        LayerTransformerConfig {
            hidden: self.transformer_width,
            depth: self.transformer_depth,
            heads: self.transformer_heads,
            ..Default::default()
        }
    }

    /// The denoiser network the spec names.
    fn net(&self) -> Result<NetConfig, SpecError> {
        match (self.kind, self.conditioning) {
            (DenoiserKind::MlpUnet, conditioning) => Ok(NetConfig::MlpUnet(MlpUnetConfig {
                widths: self.widths.clone(),
                blocks_per_level: self.blocks_per_level,
                conditioning,
                ..Default::default()
            })),
            (DenoiserKind::LayerTransformer, Conditioning::Film) => {
                Ok(NetConfig::LayerTransformer(self.transformer()))
            }
            (DenoiserKind::UnitTransformer, Conditioning::Film) => {
                Ok(NetConfig::LayerTransformer(LayerTransformerConfig {
                    tokens: TokenLayout::Units,
                    window: 0,
                    ..self.transformer()
                }))
            }
            (DenoiserKind::LayerTransformer | DenoiserKind::UnitTransformer, _) => Err(invalid(
                "train_denoiser.conditioning",
                "the layer transformer conditions by adaLN; only film applies",
            )),
        }
    }

    /// The trainer's config for the denoiser `denoiser_id` on `device`.
    pub fn to_config(
        &self,
        denoiser_id: &str,
        device: Device,
        resume: bool,
        cancel: CancelFlag,
    ) -> Result<TrainDenoiserConfig, SpecError> {
        self.validate()?;
        let precision = self
            .precision
            .resolve(device)
            .map_err(|e| invalid("train_denoiser.precision", e))?;
        Ok(TrainDenoiserConfig {
            zoo: self.zoo.clone(),
            also_zoos: self.also_zoos.clone(),
            denoiser_id: denoiser_id.to_owned(),
            architecture: self.architecture.clone(),
            net: self.net()?,
            timesteps: self.timesteps,
            schedule: self.schedule.kind(),
            prediction: self.prediction(),
            latent: self.latent,
            latent_steps: self.latent_steps,
            load: LoadOptions {
                align: self.align,
                max_models: self.max_models,
            },
            fit: FitConfig {
                steps: self.steps,
                batch_size: self.batch_size,
                learning_rate: self.learning_rate,
                lr_schedule: self.lr_schedule,
                weight_decay: self.weight_decay,
                cond_dropout: self.cond_dropout,
                feature_dropout: self.feature_dropout,
                support_dropout: self.support_dropout,
                seed: self.seed,
                precision,
                data_parallel: self.data_parallel,
                train_windows: self.train_windows,
                ..Default::default()
            },
            ema_decay: self.ema_decay,
            val_fraction: self.val_fraction,
            encoder_hidden: self.encoder_hidden,
            embed_dim: self.embed_dim,
            log_every: self.log_every,
            eval_tasks: self.eval_tasks,
            eval_guidance: self.eval_guidance,
            device,
            activate: self.activate,
            checkpoint_every: self.checkpoint_every,
            resume,
            cancel,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags<T: Args> {
        #[command(flatten)]
        spec: T,
    }

    #[test]
    fn an_unset_prediction_is_the_kinds_default() {
        let mut spec = TrainSpec::new("z");
        assert_eq!(spec.prediction(), Prediction::Epsilon);
        spec.kind = DenoiserKind::LayerTransformer;
        assert_eq!(spec.prediction(), Prediction::V);
        spec.prediction = Some(Prediction::Epsilon);
        assert_eq!(spec.prediction(), Prediction::Epsilon);
        // Stored specs from before name it and keep it.
        let old: TrainSpec = serde_json::from_value(serde_json::json!({
            "zoo": "z", "kind": "layer_transformer", "prediction": "epsilon"
        }))
        .unwrap();
        assert_eq!(old.prediction(), Prediction::Epsilon);
    }

    #[test]
    fn transformer_sizes_reach_both_transformer_kinds() {
        let mut spec = TrainSpec::new("z");
        spec.transformer_width = 96;
        spec.transformer_depth = 2;
        spec.transformer_heads = 8;
        spec.latent = LatentChoice::None;
        for kind in [
            DenoiserKind::LayerTransformer,
            DenoiserKind::UnitTransformer,
        ] {
            spec.kind = kind;
            let NetConfig::LayerTransformer(net) = spec.net().unwrap() else {
                panic!("{kind:?} is not a transformer");
            };
            assert_eq!((net.hidden, net.depth, net.heads), (96, 2, 8));
            assert_eq!(
                net.tokens == TokenLayout::Units,
                kind == DenoiserKind::UnitTransformer
            );
        }
        // Left out of stored specs at their defaults: workers from before the
        // options read them.
        let stored = serde_json::to_value(TrainSpec::new("z")).unwrap();
        assert!(stored.get("transformer_width").is_none());
        assert!(stored.get("weight_decay").is_none());
    }

    #[test]
    fn a_train_spec_gets_the_proposal_defaults() {
        let spec = TrainSpec::new("digits");
        assert_eq!(spec.steps, 200_000);
        assert_eq!(spec.batch_size, 64);
        assert_eq!(spec.learning_rate, 1e-4);
        assert_eq!(spec.widths, vec![512, 256]);
        let config = spec
            .to_config("d", Device::Cpu, true, CancelFlag::new())
            .unwrap();
        assert!(config.resume);
        assert_eq!(config.fit.precision, crate::model::Precision::Fp32);
    }

    #[test]
    fn flags_json_and_default_agree() {
        // The flags' defaults, a job row's missing fields and `Default` are one set.
        let flags = Flags::<TrainSpec>::try_parse_from(["x", "--zoo", "z"]).unwrap();
        assert_eq!(flags.spec, TrainSpec::new("z"));
        let json: TrainSpec = serde_json::from_value(serde_json::json!({"zoo": "z"})).unwrap();
        assert_eq!(json, TrainSpec::new("z"));
        // Every field round-trips through JSON.
        let spec = TrainSpec {
            latent: LatentChoice::Pca(64),
            precision: PrecisionChoice::Fixed(crate::model::Precision::Fp16),
            prediction: Some(Prediction::V),
            kind: DenoiserKind::LayerTransformer,
            align: AlignChoice::Never,
            max_models: Some(9),
            ..TrainSpec::new("z")
        };
        let text = serde_json::to_value(&spec).unwrap();
        assert_eq!(text["latent"], "pca:64");
        assert_eq!(text["precision"], "fp16");
        assert_eq!(serde_json::from_value::<TrainSpec>(text).unwrap(), spec);
        let zoo = Flags::<ZooSpec>::try_parse_from(["x", "--family", "digits", "--models", "5"])
            .unwrap()
            .spec;
        let json: ZooSpec =
            serde_json::from_value(serde_json::json!({"family": "digits", "num_models": 5}))
                .unwrap();
        assert_eq!(zoo, json);
    }

    #[test]
    fn job_rows_stored_before_the_typed_spec_still_read() {
        let old = serde_json::json!({
            "zoo": "digits", "steps": 300, "kind": "mlp_unet", "schedule": "linear",
            "prediction": "v", "conditioning": "concat", "align": "always",
            "precision": "fp32", "latent": "pca:auto", "lr_schedule": "cosine",
            "denoiser_id": null, "max_models": null
        });
        let spec: TrainSpec = serde_json::from_value(old).unwrap();
        assert_eq!(spec.schedule, NoiseSchedule::Linear);
        assert_eq!(spec.conditioning, Conditioning::Concat);
        assert_eq!(spec.lr_schedule, LrSchedule::Cosine);
        assert_eq!(spec.latent, LatentChoice::PcaAuto);
        let zoo: ZooSpec = serde_json::from_value(serde_json::json!({
            "zoo": "", "family": "sinusoid", "num_models": 3, "steps": null
        }))
        .unwrap();
        assert_eq!(zoo.zoo_name(), "sinusoid");
    }

    #[test]
    fn bad_fields_are_named() {
        let mut spec = TrainSpec::new("digits");
        spec.learning_rate = -1.0;
        assert_eq!(
            spec.validate().unwrap_err().field,
            "train_denoiser.learning_rate"
        );
        let mut spec = TrainSpec::new("digits");
        spec.transformer_heads = 3;
        assert_eq!(
            spec.validate().unwrap_err().field,
            "train_denoiser.transformer_heads"
        );
        spec.transformer_heads = 4;
        spec.transformer_depth = 0;
        assert_eq!(
            spec.validate().unwrap_err().field,
            "train_denoiser.transformer_depth"
        );
        for decay in [-0.1, f64::NAN, 1e4] {
            let mut spec = TrainSpec::new("digits");
            spec.weight_decay = decay;
            assert_eq!(
                spec.validate().unwrap_err().field,
                "train_denoiser.weight_decay",
                "{decay}"
            );
        }
        for (field, spec) in [
            ("train_denoiser.zoo", TrainSpec::default()),
            (
                "train_denoiser.steps",
                TrainSpec {
                    steps: 0,
                    ..TrainSpec::new("z")
                },
            ),
            (
                "train_denoiser.conditioning",
                TrainSpec {
                    kind: DenoiserKind::LayerTransformer,
                    conditioning: Conditioning::Concat,
                    ..TrainSpec::new("z")
                },
            ),
            (
                "train_denoiser.latent",
                TrainSpec {
                    kind: DenoiserKind::UnitTransformer,
                    ..TrainSpec::new("z")
                },
            ),
            (
                "train_denoiser.also_zoos",
                TrainSpec {
                    kind: DenoiserKind::UnitTransformer,
                    latent: LatentChoice::None,
                    also_zoos: vec!["y".into()],
                    ..TrainSpec::new("z")
                },
            ),
            (
                "train_denoiser.timesteps",
                TrainSpec {
                    timesteps: 1,
                    ..TrainSpec::new("z")
                },
            ),
            (
                "train_denoiser.feature_dropout",
                TrainSpec {
                    feature_dropout: 1.5,
                    ..TrainSpec::new("z")
                },
            ),
            (
                "train_denoiser.encoder_hidden",
                TrainSpec {
                    encoder_hidden: 0,
                    ..TrainSpec::new("z")
                },
            ),
            (
                "train_denoiser.widths",
                TrainSpec {
                    widths: vec![],
                    ..TrainSpec::new("z")
                },
            ),
            (
                "train_denoiser.data_parallel",
                TrainSpec {
                    data_parallel: 0,
                    ..TrainSpec::new("z")
                },
            ),
            (
                "train_denoiser.data_parallel",
                TrainSpec {
                    batch_size: 4,
                    data_parallel: 5,
                    ..TrainSpec::new("z")
                },
            ),
            (
                "train_denoiser.train_windows",
                TrainSpec {
                    train_windows: Some(0),
                    ..TrainSpec::new("z")
                },
            ),
            (
                "train_denoiser.train_windows",
                TrainSpec {
                    train_windows: Some(MAX_TRAIN_WINDOWS + 1),
                    ..TrainSpec::new("z")
                },
            ),
            // Several architectures diffuse raw weights, other zoos only.
            (
                "train_denoiser.also_zoos",
                TrainSpec {
                    also_zoos: vec!["y".into()],
                    ..TrainSpec::new("z")
                },
            ),
            (
                "train_denoiser.also_zoos",
                TrainSpec {
                    also_zoos: vec!["z".into()],
                    latent: LatentChoice::None,
                    ..TrainSpec::new("z")
                },
            ),
        ] {
            assert_eq!(spec.validate().unwrap_err().field, field);
        }
        let unknown: Result<TrainSpec, _> =
            serde_json::from_value(serde_json::json!({"zoo": "z", "stepz": 3}));
        assert!(unknown.unwrap_err().to_string().contains("stepz"));
        let bad_enum: Result<TrainSpec, _> =
            serde_json::from_value(serde_json::json!({"zoo": "z", "schedule": "sigmoid"}));
        assert!(bad_enum.unwrap_err().to_string().contains("sigmoid"));
        let zoo = ZooSpec {
            zoo: None,
            family: "sinusoid".into(),
            architecture: String::new(),
            num_models: 0,
            shared_init: false,
            seed: 0,
            steps: None,
            learning_rate: None,
            keep_snapshots: 0,
            base_steps: None,
        };
        assert_eq!(zoo.validate().unwrap_err().field, "build_zoo.num_models");
        let stray_base = ZooSpec {
            num_models: 3,
            base_steps: Some(10),
            ..zoo.clone()
        };
        let refused = stray_base.validate().unwrap_err();
        assert_eq!(refused.field, "build_zoo.base_steps", "{refused}");
        let words = ZooSpec {
            family: "words".into(),
            ..stray_base
        };
        assert_eq!(words.validate().unwrap(), Family::Words);
        let bad = ZooSpec {
            family: "cifar".into(),
            num_models: 3,
            ..zoo.clone()
        };
        assert_eq!(bad.validate().unwrap_err().field, "build_zoo.family");
        let bad = ZooSpec {
            num_models: 3,
            keep_snapshots: MAX_KEEP_SNAPSHOTS + 1,
            ..zoo
        };
        assert_eq!(
            bad.validate().unwrap_err().field,
            "build_zoo.keep_last_checkpoints"
        );
    }
}
