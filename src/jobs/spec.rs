//! What a job asks for, as stored (JSON) in the catalog's `jobs.spec_json`,
//! with the defaults of the proposal, and its translation into the zoo
//! builder's and the trainer's configs. `weightgen-worker train` builds its
//! config through [`TrainJob`] too, so a job and the command train alike.

use serde::{Deserialize, Serialize};
use tch::Device;

use crate::cancel::CancelFlag;
use crate::diffusion::objective::Prediction;
use crate::diffusion::schedule::{DEFAULT_TIMESTEPS, ScheduleKind};
use crate::model::fit::{DEFAULT_BATCH_SIZE, DEFAULT_COND_DROPOUT, DEFAULT_LEARNING_RATE};
use crate::model::{
    Conditioning, FitConfig, LayerTransformerConfig, LrSchedule, MlpUnetConfig, NetConfig,
    PrecisionChoice,
};
use crate::tasks::{Family, TrainConfig};
use crate::train::{
    DEFAULT_CHECKPOINT_EVERY, DEFAULT_EMA_DECAY, DEFAULT_VAL_FRACTION, LatentChoice,
    TrainDenoiserConfig,
};
use crate::zoo::ZooBuildConfig;
use crate::zoo::{AlignChoice, LoadOptions};

/// Training iterations of the proposal.
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
/// Default space of diffusion (see `LatentChoice`).
pub const DEFAULT_LATENT: &str = "pca:auto";
/// Learning-rate schedule of a training job: "constant" (the proposal's)
/// or "cosine" (down to `COSINE_FINAL_FRACTION` of the rate).
pub const DEFAULT_LR_SCHEDULE: &str = "constant";
/// Default share of rows trained on the support set alone (features
/// withheld), where the zoo's descriptors have both.
pub const DEFAULT_FEATURE_DROPOUT: f64 = 0.25;
/// Default share of rows trained on the features alone (support set
/// withheld), where the zoo's descriptors have both.
pub const DEFAULT_SUPPORT_DROPOUT: f64 = 0.25;
/// Most zoo models one job may ask for.
pub const MAX_ZOO_MODELS: u64 = 1_000_000;

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

/// Build (or finish) a zoo of a built-in task family.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildZooJob {
    /// Zoo name ("" = the family's name).
    #[serde(default)]
    pub zoo: String,
    /// Task family.
    pub family: String,
    /// Architecture ("" = the family's default).
    #[serde(default)]
    pub architecture: String,
    /// Models the zoo has when the job ends.
    pub num_models: u64,
    /// One initialization for the whole zoo.
    #[serde(default)]
    pub shared_init: bool,
    /// Base seed.
    #[serde(default)]
    pub seed: u64,
    /// Training steps per model (None = the family's default).
    #[serde(default)]
    pub steps: Option<usize>,
    /// Learning rate of each model (None = the family's default).
    #[serde(default)]
    pub learning_rate: Option<f64>,
    /// Snapshots kept per model.
    #[serde(default)]
    pub keep_snapshots: usize,
}

impl BuildZooJob {
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
        })
    }

    /// The zoo's name.
    pub fn zoo_name(&self) -> String {
        if self.zoo.is_empty() {
            self.family.clone()
        } else {
            self.zoo.clone()
        }
    }
}

fn default_steps() -> usize {
    DEFAULT_TRAIN_STEPS
}
fn default_batch_size() -> i64 {
    DEFAULT_BATCH_SIZE
}
fn default_learning_rate() -> f64 {
    DEFAULT_LEARNING_RATE
}
fn default_cond_dropout() -> f64 {
    DEFAULT_COND_DROPOUT
}
fn default_ema_decay() -> f64 {
    DEFAULT_EMA_DECAY
}
fn default_val_fraction() -> f64 {
    DEFAULT_VAL_FRACTION
}
fn default_widths() -> Vec<i64> {
    DEFAULT_WIDTHS.to_vec()
}
fn default_eval_tasks() -> usize {
    DEFAULT_EVAL_TASKS
}
fn default_eval_guidance() -> f64 {
    DEFAULT_EVAL_GUIDANCE
}
fn default_log_every() -> usize {
    DEFAULT_LOG_EVERY
}
fn default_checkpoint_every() -> usize {
    DEFAULT_CHECKPOINT_EVERY
}
fn default_precision() -> String {
    "auto".to_owned()
}
fn default_kind() -> String {
    "mlp_unet".to_owned()
}
fn default_prediction() -> String {
    "epsilon".to_owned()
}
fn default_blocks_per_level() -> usize {
    crate::model::mlp_unet::DEFAULT_BLOCKS_PER_LEVEL
}
fn default_conditioning() -> String {
    "film".to_owned()
}
fn default_timesteps() -> usize {
    DEFAULT_TIMESTEPS
}
fn default_schedule() -> String {
    "cosine".to_owned()
}
fn default_embed_dim() -> i64 {
    DEFAULT_EMBED_DIM
}
fn default_align() -> String {
    "auto".to_owned()
}
fn default_latent() -> String {
    DEFAULT_LATENT.to_owned()
}
fn default_lr_schedule() -> String {
    DEFAULT_LR_SCHEDULE.to_owned()
}
fn default_feature_dropout() -> f64 {
    DEFAULT_FEATURE_DROPOUT
}
fn default_support_dropout() -> f64 {
    DEFAULT_SUPPORT_DROPOUT
}
fn default_data_parallel() -> usize {
    1
}
fn default_encoder_hidden() -> i64 {
    DEFAULT_ENCODER_HIDDEN
}

/// Train a denoiser on a zoo and publish it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainJob {
    /// The zoo to learn.
    pub zoo: String,
    /// Id of the published version (None = derived from the job id, so a
    /// retried job resumes the same run).
    #[serde(default)]
    pub denoiser_id: Option<String>,
    /// Optimizer steps.
    #[serde(default = "default_steps")]
    pub steps: usize,
    /// Rows per step.
    #[serde(default = "default_batch_size")]
    pub batch_size: i64,
    /// Adam learning rate.
    #[serde(default = "default_learning_rate")]
    pub learning_rate: f64,
    /// Learning-rate schedule: "constant" or "cosine".
    #[serde(default = "default_lr_schedule")]
    pub lr_schedule: String,
    /// Share of rows trained with the null condition.
    #[serde(default = "default_cond_dropout")]
    pub cond_dropout: f64,
    /// Decay of the weights' exponential moving average, which is what gets
    /// published.
    #[serde(default = "default_ema_decay")]
    pub ema_decay: f64,
    /// Share of zoo models held out for validation.
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
    /// Widths of the MLP U-Net levels.
    #[serde(default = "default_widths")]
    pub widths: Vec<i64>,
    /// Seed of initialization, batches and noise.
    #[serde(default)]
    pub seed: u64,
    /// Held-out tasks of the quality gate.
    #[serde(default = "default_eval_tasks")]
    pub eval_tasks: usize,
    /// Guidance of the quality gate.
    #[serde(default = "default_eval_guidance")]
    pub eval_guidance: f64,
    /// Steps between log points.
    #[serde(default = "default_log_every")]
    pub log_every: usize,
    /// Steps between resumable checkpoints.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: usize,
    /// "auto", "fp32" or "fp16".
    #[serde(default = "default_precision")]
    pub precision: String,
    /// Parts of each batch computed on threads of their own (CPU; 1: none).
    #[serde(default = "default_data_parallel")]
    pub data_parallel: usize,
    /// Hidden width of the task encoder's paths.
    #[serde(default = "default_encoder_hidden")]
    pub encoder_hidden: i64,
    /// Make the result the active denoiser of its architecture.
    #[serde(default)]
    pub activate: bool,
    /// Denoiser network: "mlp_unet" (the proposal) or "layer_transformer".
    #[serde(default = "default_kind")]
    pub kind: String,
    /// How the MLP U-Net takes in the condition: "film" or "concat".
    #[serde(default = "default_conditioning")]
    pub conditioning: String,
    /// Diffusion steps T.
    #[serde(default = "default_timesteps")]
    pub timesteps: usize,
    /// Noise schedule: "cosine" or "linear".
    #[serde(default = "default_schedule")]
    pub schedule: String,
    /// What the network predicts: "epsilon" (the proposal), "x0" or "v".
    #[serde(default = "default_prediction")]
    pub prediction: String,
    /// Residual blocks per MLP U-Net level on each side.
    #[serde(default = "default_blocks_per_level")]
    pub blocks_per_level: usize,
    /// Size E of the task embedding.
    #[serde(default = "default_embed_dim")]
    pub embed_dim: i64,
    /// Share of rows whose descriptor features are withheld (support set
    /// kept), so the denoiser can be conditioned on a support set alone.
    #[serde(default = "default_feature_dropout")]
    pub feature_dropout: f64,
    /// Share of rows whose support set is withheld (features kept), so the
    /// denoiser can be conditioned on the features alone.
    #[serde(default = "default_support_dropout")]
    pub support_dropout: f64,
    /// Space of diffusion: "none" (the standardized weights), "pca:K" or
    /// "pca:auto" (a PCA latent fitted on the training zoo).
    #[serde(default = "default_latent")]
    pub latent: String,
    /// Permutation alignment of the zoo: "auto" (unless built from one
    /// shared init), "always" or "never".
    #[serde(default = "default_align")]
    pub align: String,
    /// Train on the first N zoo models only (by id; None = all).
    #[serde(default)]
    pub max_models: Option<usize>,
}

impl TrainJob {
    /// A job with the proposal's defaults for `zoo`.
    pub fn new(zoo: &str) -> Self {
        serde_json::from_value(serde_json::json!({ "zoo": zoo }))
            .expect("every other field has a default")
    }

    /// Checks the spec, naming the first bad field.
    pub fn validate(&self) -> Result<PrecisionChoice, SpecError> {
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
        if self.steps == 0 {
            return Err(invalid("train_denoiser.iterations", "must be positive"));
        }
        if self.batch_size <= 0 {
            return Err(invalid("train_denoiser.batch_size", "must be positive"));
        }
        positive("train_denoiser.learning_rate", self.learning_rate)?;
        self.lr_schedule_kind()?;
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
        self.latent_choice()?;
        self.net()?;
        self.schedule_kind()?;
        self.prediction_kind()?;
        if self.blocks_per_level == 0 || self.blocks_per_level > 64 {
            return Err(invalid(
                "train_denoiser.blocks_per_level",
                format!("{} is not in [1, 64]", self.blocks_per_level),
            ));
        }
        if self.timesteps < 2 || self.timesteps > 100_000 {
            return Err(invalid(
                "train_denoiser.timesteps",
                format!("{} is not in [2, 100000]", self.timesteps),
            ));
        }
        if self.encoder_hidden <= 0 || self.encoder_hidden > 4096 {
            return Err(invalid(
                "train_denoiser.encoder_hidden",
                format!("{} is not in [1, 4096]", self.encoder_hidden),
            ));
        }
        if self.embed_dim <= 0 || self.embed_dim > 4096 {
            return Err(invalid(
                "train_denoiser.embed_dim",
                format!("{} is not in [1, 4096]", self.embed_dim),
            ));
        }
        self.align
            .parse::<AlignChoice>()
            .map_err(|e| invalid("train_denoiser.align", e))?;
        if self.max_models.is_some_and(|n| n < 2) {
            return Err(invalid("train_denoiser.max_models", "at least 2"));
        }
        fraction("train_denoiser.ema_decay", self.ema_decay)?;
        fraction("train_denoiser.val_fraction", self.val_fraction)?;
        if self.widths.is_empty() || self.widths.iter().any(|&w| w <= 0) {
            return Err(invalid(
                "train_denoiser.widths",
                format!("{:?} must be positive widths", self.widths),
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
        if self.eval_guidance.is_nan() || self.eval_guidance < 0.0 {
            return Err(invalid("train_denoiser.eval_guidance", "must be ≥ 0"));
        }
        self.precision
            .parse()
            .map_err(|e: String| invalid("train_denoiser.precision", e))
    }

    /// The denoiser network the spec names.
    fn net(&self) -> Result<NetConfig, SpecError> {
        let conditioning: Conditioning = self
            .conditioning
            .parse()
            .map_err(|e| invalid("train_denoiser.conditioning", e))?;
        match self.kind.as_str() {
            "mlp_unet" => Ok(NetConfig::MlpUnet(MlpUnetConfig {
                widths: self.widths.clone(),
                blocks_per_level: self.blocks_per_level,
                conditioning,
                ..Default::default()
            })),
            "layer_transformer" if conditioning == Conditioning::Film => Ok(
                NetConfig::LayerTransformer(LayerTransformerConfig::default()),
            ),
            "layer_transformer" => Err(invalid(
                "train_denoiser.conditioning",
                "the layer transformer conditions by adaLN; only \"film\" applies",
            )),
            other => Err(invalid(
                "train_denoiser.kind",
                format!("{other:?} is not \"mlp_unet\" or \"layer_transformer\""),
            )),
        }
    }

    /// The learning-rate schedule the spec names.
    fn lr_schedule_kind(&self) -> Result<LrSchedule, SpecError> {
        LrSchedule::parse(&self.lr_schedule).ok_or_else(|| {
            invalid(
                "train_denoiser.lr_schedule",
                format!("{:?} is not \"constant\" or \"cosine\"", self.lr_schedule),
            )
        })
    }

    /// The latent the spec names.
    fn latent_choice(&self) -> Result<LatentChoice, SpecError> {
        self.latent
            .parse()
            .map_err(|e| invalid("train_denoiser.latent", e))
    }

    /// The output parametrization the spec names.
    fn prediction_kind(&self) -> Result<Prediction, SpecError> {
        self.prediction
            .parse()
            .map_err(|e| invalid("train_denoiser.prediction", e))
    }

    /// The noise schedule the spec names.
    fn schedule_kind(&self) -> Result<ScheduleKind, SpecError> {
        match self.schedule.as_str() {
            "cosine" => Ok(ScheduleKind::cosine()),
            "linear" => Ok(ScheduleKind::linear()),
            other => Err(invalid(
                "train_denoiser.schedule",
                format!("{other:?} is not \"cosine\" or \"linear\""),
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
        let precision = self
            .validate()?
            .resolve(device)
            .map_err(|e| invalid("train_denoiser.precision", e))?;
        Ok(TrainDenoiserConfig {
            zoo: self.zoo.clone(),
            denoiser_id: denoiser_id.to_owned(),
            net: self.net()?,
            timesteps: self.timesteps,
            schedule: self.schedule_kind()?,
            prediction: self.prediction_kind()?,
            latent: self.latent_choice()?,
            load: LoadOptions {
                align: self
                    .align
                    .parse()
                    .map_err(|e| invalid("train_denoiser.align", e))?,
                max_models: self.max_models,
            },
            fit: FitConfig {
                steps: self.steps,
                batch_size: self.batch_size,
                learning_rate: self.learning_rate,
                lr_schedule: self.lr_schedule_kind()?,
                cond_dropout: self.cond_dropout,
                feature_dropout: self.feature_dropout,
                support_dropout: self.support_dropout,
                seed: self.seed,
                precision,
                data_parallel: self.data_parallel,
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

    #[test]
    fn a_train_job_gets_the_proposal_defaults() {
        let job = TrainJob::new("digits");
        assert_eq!(job.steps, 200_000);
        assert_eq!(job.batch_size, 64);
        assert_eq!(job.learning_rate, 1e-4);
        assert_eq!(job.widths, vec![512, 256]);
        let config = job
            .to_config("d", Device::Cpu, true, CancelFlag::new())
            .unwrap();
        assert!(config.resume);
        assert_eq!(config.fit.precision, crate::model::Precision::Fp32);
    }

    #[test]
    fn bad_fields_are_named() {
        let mut job = TrainJob::new("digits");
        job.learning_rate = -1.0;
        assert_eq!(
            job.validate().unwrap_err().field,
            "train_denoiser.learning_rate"
        );
        for (field, job) in [
            (
                "train_denoiser.kind",
                TrainJob {
                    kind: "resnet".into(),
                    ..TrainJob::new("z")
                },
            ),
            (
                "train_denoiser.conditioning",
                TrainJob {
                    kind: "layer_transformer".into(),
                    conditioning: "concat".into(),
                    ..TrainJob::new("z")
                },
            ),
            (
                "train_denoiser.schedule",
                TrainJob {
                    schedule: "sigmoid".into(),
                    ..TrainJob::new("z")
                },
            ),
            (
                "train_denoiser.lr_schedule",
                TrainJob {
                    lr_schedule: "step".into(),
                    ..TrainJob::new("z")
                },
            ),
            (
                "train_denoiser.timesteps",
                TrainJob {
                    timesteps: 1,
                    ..TrainJob::new("z")
                },
            ),
            (
                "train_denoiser.align",
                TrainJob {
                    align: "maybe".into(),
                    ..TrainJob::new("z")
                },
            ),
            (
                "train_denoiser.feature_dropout",
                TrainJob {
                    feature_dropout: 1.5,
                    ..TrainJob::new("z")
                },
            ),
            (
                "train_denoiser.encoder_hidden",
                TrainJob {
                    encoder_hidden: 0,
                    ..TrainJob::new("z")
                },
            ),
            (
                "train_denoiser.data_parallel",
                TrainJob {
                    data_parallel: 0,
                    ..TrainJob::new("z")
                },
            ),
            (
                "train_denoiser.data_parallel",
                TrainJob {
                    batch_size: 4,
                    data_parallel: 5,
                    ..TrainJob::new("z")
                },
            ),
        ] {
            assert_eq!(job.validate().unwrap_err().field, field);
        }
        let unknown: Result<TrainJob, _> =
            serde_json::from_value(serde_json::json!({"zoo": "z", "stepz": 3}));
        assert!(unknown.unwrap_err().to_string().contains("stepz"));
        let zoo = BuildZooJob {
            zoo: String::new(),
            family: "sinusoid".into(),
            architecture: String::new(),
            num_models: 0,
            shared_init: false,
            seed: 0,
            steps: None,
            learning_rate: None,
            keep_snapshots: 0,
        };
        assert_eq!(zoo.validate().unwrap_err().field, "build_zoo.num_models");
        let zoo = BuildZooJob {
            family: "cifar".into(),
            num_models: 3,
            ..zoo
        };
        assert_eq!(zoo.validate().unwrap_err().field, "build_zoo.family");
    }
}
