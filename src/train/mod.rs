//! Turning a zoo into a denoiser: load the zoo (aligned), standardize the
//! weights and the task features, train the denoiser and task encoder with
//! an EMA of the weights and a held-out validation split of zoo models,
//! write the checkpoint, score generated weights zero-shot against chance
//! and the nearest zoo model (the quality gate), and publish it.

pub mod ema;
pub mod latent;
pub mod members;
mod prepare;
pub mod quality;
pub mod report;
pub mod run_state;
mod union;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tch::{Device, Kind, Tensor};

pub use crate::zoo::ZooDataset;
pub use ema::Ema;
pub use latent::LatentChoice;
pub use members::{UNSEEN_ARCHITECTURE_KEY, publish_for_architecture};
pub use quality::{QualityReport, evaluate_quality};
pub use run_state::RunState;

use crate::blobs::{BlobError, BlobStore};
use crate::catalog::{Catalog, CatalogError, DenoiserRecord};
use crate::diffusion::ClipRange;
use crate::model::{
    CheckpointError, ConditionalDenoiser, DenoiserCheckpoint, FitConfig, LrSchedule, NetConfig,
    TaskBatch, Trainer,
};
use crate::weights::pool_over_units;

/// Default EMA decay of the published weights.
pub const DEFAULT_EMA_DECAY: f64 = 0.999;
/// Default share of zoo models held out for validation.
pub const DEFAULT_VAL_FRACTION: f64 = 0.1;
/// Margin of the x̂₀ clip range, as a share of the zoo's range.
pub const CLIP_MARGIN: f64 = 0.1;
/// Default number of steps between training checkpoints.
pub const DEFAULT_CHECKPOINT_EVERY: usize = 5000;

/// Why training failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A request or stored value is unusable.
    #[error("{field}: {reason}")]
    Input {
        /// Which input.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The zoo could not be loaded.
    #[error(transparent)]
    Dataset(#[from] crate::zoo::DatasetError),
    /// The catalog failed.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The blob store failed.
    #[error(transparent)]
    Blobs(#[from] BlobError),
    /// A file could not be encoded or decoded.
    #[error(transparent)]
    Codec(#[from] crate::weights::CodecError),
    /// Writing the checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// libtorch failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// Stopping was asked for (the run's last checkpoint stays resumable).
    #[error("training cancelled at step {step}")]
    Cancelled {
        /// Steps completed.
        step: usize,
    },
}

/// What to train.
#[derive(Debug, Clone)]
pub struct TrainDenoiserConfig {
    /// The zoo.
    pub zoo: String,
    /// Further zoos of other architectures the one denoiser also learns
    /// (see `union`); empty: one architecture.
    pub also_zoos: Vec<String>,
    /// Id of the new denoiser version.
    pub denoiser_id: String,
    /// The architecture the zoo must have, when the request names one.
    pub architecture: Option<String>,
    /// The network F.
    pub net: NetConfig,
    /// Diffusion steps T.
    pub timesteps: usize,
    /// Noise schedule.
    pub schedule: crate::diffusion::schedule::ScheduleKind,
    /// What the network predicts (ε in the proposal).
    pub prediction: crate::diffusion::objective::Prediction,
    /// The space diffusion runs in (standardized weights or a PCA latent).
    pub latent: LatentChoice,
    /// Adam steps of an autoencoder latent.
    pub latent_steps: usize,
    /// Alignment and zoo subset.
    pub load: crate::zoo::LoadOptions,
    /// Steps, batch, learning rate, condition dropout, clipping, seed.
    pub fit: FitConfig,
    /// EMA decay (0 = no EMA).
    pub ema_decay: f64,
    /// Share of zoo models held out for validation.
    pub val_fraction: f64,
    /// Task-encoder width and embedding size.
    pub encoder_hidden: i64,
    /// Size of e.
    pub embed_dim: i64,
    /// Log (and validate) every this many steps.
    pub log_every: usize,
    /// Held-out tasks the quality gate samples.
    pub eval_tasks: usize,
    /// Classifier-free guidance scale of the quality gate's samples.
    pub eval_guidance: f64,
    /// Device to train on.
    pub device: Device,
    /// Make it the active denoiser of its architecture once published.
    pub activate: bool,
    /// Save a resumable checkpoint every this many steps (0 = never).
    pub checkpoint_every: usize,
    /// Continue from the run's last checkpoint when it has one (without
    /// this, finding one is an error rather than a silent restart).
    pub resume: bool,
    /// Checked every step: once set, training stops with `Cancelled`.
    pub cancel: crate::cancel::CancelFlag,
}

impl TrainDenoiserConfig {
    /// The settings that shape training (not its length, logging cadence
    /// of checkpoints, or evaluation); a resumed run must match them.
    pub fn fingerprint(&self) -> serde_json::Value {
        let mut fingerprint = serde_json::json!({
            "zoo": self.zoo,
            "net": self.net,
            "timesteps": self.timesteps,
            "schedule": self.schedule,
            "load": self.load,
            "feature_dropout": self.fit.feature_dropout,
            "support_dropout": self.fit.support_dropout,
            "latent": self.latent.to_string(),
            "batch_size": self.fit.batch_size,
            "learning_rate": self.fit.learning_rate,
            "cond_dropout": self.fit.cond_dropout,
            "grad_clip": self.fit.grad_clip,
            "seed": self.fit.seed,
            "precision": self.fit.precision,
            "ema_decay": self.ema_decay,
            "val_fraction": self.val_fraction,
            "encoder_hidden": self.encoder_hidden,
            "embed_dim": self.embed_dim,
            "log_every": self.log_every,
        });
        // Recorded only when it is not the constant rate, so runs saved
        // before schedules existed still resume.
        if self.fit.lr_schedule != LrSchedule::Constant {
            fingerprint["lr_schedule"] = self.fit.lr_schedule.name().into();
        }
        // Recorded only for an autoencoder latent and off the default, so
        // runs saved before the option existed still resume.
        if matches!(self.latent, LatentChoice::Autoencoder(_))
            && self.latent_steps != crate::model::weight_autoencoder::DEFAULT_AE_STEPS
        {
            fingerprint["latent_steps"] = self.latent_steps.into();
        }
        // Recorded only when on, so runs saved before the option still resume.
        if self.fit.weight_decay != 0.0 {
            fingerprint["weight_decay"] = self.fit.weight_decay.into();
        }
        // Splitting batches changes floating-point sums; recorded only when
        // asked for, so runs saved before it existed still resume.
        if self.fit.data_parallel > 1 {
            fingerprint["data_parallel"] = self.fit.data_parallel.into();
        }
        if let Some(windows) = self.fit.train_windows {
            fingerprint["train_windows"] = windows.into();
        }
        if !self.also_zoos.is_empty() {
            fingerprint["also_zoos"] = self.also_zoos.clone().into();
        }
        if self.prediction != crate::diffusion::objective::Prediction::Epsilon {
            fingerprint["prediction"] = self.prediction.name().into();
        }
        fingerprint
    }
}

/// The first setting where a checkpoint's fingerprint and this run's differ.
fn fingerprint_mismatch(saved: &serde_json::Value, wanted: &serde_json::Value) -> Option<String> {
    let (Some(saved), Some(wanted)) = (saved.as_object(), wanted.as_object()) else {
        return Some("the checkpoint records no settings".to_owned());
    };
    wanted.iter().find_map(|(key, value)| {
        let before = saved.get(key).unwrap_or(&serde_json::Value::Null);
        (before != value).then(|| {
            format!("the checkpoint was trained with {key} = {before}, this run asks for {value}")
        })
    })
}

/// What training produced.
pub struct TrainOutcome {
    /// The checkpoint (EMA weights).
    pub checkpoint: DenoiserCheckpoint,
    /// Its catalog row.
    pub record: DenoiserRecord,
    /// Zero-shot scores (of the first zoo's architecture).
    pub quality: QualityReport,
    /// Those of every further architecture of a denoiser of several, by
    /// architecture, with their catalog rows' ids.
    pub further: Vec<(String, String, QualityReport)>,
    /// (step, train loss, validation loss) at each log point.
    pub curve: Vec<(usize, f64, f64)>,
    /// Step of the checkpoint the run resumed from, if it did.
    pub resumed_from: Option<usize>,
    /// Names of the metrics file and loss plot in the blob store.
    pub artifacts: Vec<String>,
}

/// Checks a denoiser id: 1 to 128 letters, digits, '.', '_' or '-' (it
/// names the run's objects in the blob store).
pub fn check_denoiser_id(id: &str) -> Result<(), String> {
    let ok = (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{id:?} must be 1 to 128 letters, digits, '.', '_' or '-' (not starting with '.')"
        ))
    }
}

/// Rows of the validation split: every model whose index is a multiple of
/// round(1 / fraction), at least one.
pub fn validation_rows(n: usize, fraction: f64) -> Vec<i64> {
    if fraction <= 0.0 {
        return Vec::new();
    }
    let every = (1.0 / fraction).round().max(2.0) as usize;
    (0..n)
        .filter(|i| i % every == every / 2)
        .map(|i| i as i64)
        .collect()
}

/// Mean loss on `rows` at fixed timesteps and noise (comparable across steps).
fn validation_loss(model: &ConditionalDenoiser, w: &Tensor, condition: &TaskBatch) -> f64 {
    let n = w.size()[0];
    if n == 0 {
        return f64::NAN;
    }
    tch::no_grad(|| {
        let device = model.device();
        let timesteps = model.schedule().timesteps() as i64;
        let t = (Tensor::arange(n, (Kind::Int64, device)) * 7919).remainder(timesteps) + 1;
        let noise = crate::rng::SeededNoise::new(&[0xBA1], 9)
            .draw(&[n, w.size()[1]], device)
            .squeeze_dim(0);
        model
            .loss(
                &w.to_device(device),
                &condition.to_device(device),
                &t,
                &noise,
                None,
            )
            .double_value(&[])
    })
}

/// Trains a denoiser on `zoo` and publishes it (blob, then catalog row,
/// then activation when asked).
#[tracing::instrument(
    name = "train.denoiser",
    skip_all,
    fields(zoo = %config.zoo, denoiser_id = %config.denoiser_id, steps = config.fit.steps as i64)
)]
pub async fn train_denoiser(
    catalog: Arc<dyn Catalog>,
    blobs: BlobStore,
    config: TrainDenoiserConfig,
    on_log: impl Fn(usize, f64, f64) + Send + 'static,
) -> Result<TrainOutcome, TrainError> {
    let started = Instant::now();
    check_denoiser_id(&config.denoiser_id).map_err(|reason| TrainError::Input {
        field: "denoiser_id",
        reason,
    })?;
    if catalog.denoiser(&config.denoiser_id).await?.is_some() {
        return Err(TrainError::Input {
            field: "denoiser_id",
            reason: format!("denoiser {:?} already exists", config.denoiser_id),
        });
    }
    if let Some(expected) = &config.architecture {
        let plan = catalog.zoo(&config.zoo).await?;
        if let Some(plan) = plan.filter(|p| &p.architecture != expected) {
            return Err(TrainError::Input {
                field: "architecture",
                reason: format!(
                    "zoo {:?} holds {:?} models, not {expected:?}",
                    config.zoo, plan.architecture
                ),
            });
        }
    }
    let resume_state = match run_state::latest_step(&blobs, &config.denoiser_id).await? {
        None => None,
        Some(step) if !config.resume => {
            return Err(TrainError::Input {
                field: "resume",
                reason: format!(
                    "run {:?} has a checkpoint at step {step}; pass --resume to continue it, or choose another denoiser id",
                    config.denoiser_id
                ),
            });
        }
        Some(_) => {
            let state = run_state::load(&blobs, &config.denoiser_id)
                .await?
                .ok_or_else(|| TrainError::Input {
                    field: "resume",
                    reason: "the run's checkpoint vanished while being read".to_owned(),
                })?;
            if let Some(reason) = fingerprint_mismatch(&state.fingerprint, &config.fingerprint()) {
                return Err(TrainError::Input {
                    field: "resume",
                    reason,
                });
            }
            tracing::info!(denoiser = %config.denoiser_id, step = state.step, "resuming from checkpoint");
            Some(state)
        }
    };
    let resumed_from = resume_state.as_ref().map(|s| s.step);
    let mut datasets = Vec::new();
    let mut splits = Vec::new();
    for zoo in std::iter::once(&config.zoo).chain(&config.also_zoos) {
        let data = ZooDataset::load_with(&catalog, &blobs, zoo, &config.load).await?;
        catalog.register_architecture(&data.network.spec).await?;
        let n = data.len();
        let val = validation_rows(n, config.val_fraction);
        let train: Vec<i64> = (0..n as i64).filter(|i| !val.contains(i)).collect();
        tracing::info!(
            zoo = %zoo, models = n, train = train.len(), validation = val.len(),
            aligned = data.aligned, dim = data.weights.size()[1], "zoo loaded"
        );
        datasets.push(data);
        splits.push((train, val));
    }
    let config_for_blocking = config.clone();
    let runtime = tokio::runtime::Handle::current();
    let (save_blobs, run_id) = (blobs.clone(), config.denoiser_id.clone());
    let save =
        move |state: &RunState| runtime.block_on(run_state::save(&save_blobs, &run_id, state));
    let (checkpoint, curve, mut qualities) = tokio::task::spawn_blocking(move || {
        train_blocking(
            datasets,
            splits,
            &config_for_blocking,
            resume_state,
            save,
            on_log,
        )
    })
    .await
    .map_err(|e| TrainError::Input {
        field: "training",
        reason: e.to_string(),
    })??;
    let bytes = Bytes::from(checkpoint.to_bytes()?);
    let stored = blobs.put(bytes).await?;
    let mut summary = checkpoint.summary.clone();
    summary.insert("train_seconds".into(), started.elapsed().as_secs_f64());
    let record = DenoiserRecord {
        id: config.denoiser_id.clone(),
        architecture: checkpoint.arch.name.clone(),
        sha256: stored.sha256,
        size_bytes: stored.size,
        config: serde_json::json!({
            "zoo": config.zoo,
            "denoiser": checkpoint.model.config(),
            "fit": {
                "steps": config.fit.steps, "batch_size": config.fit.batch_size,
                "learning_rate": config.fit.learning_rate, "cond_dropout": config.fit.cond_dropout,
                "feature_dropout": config.fit.feature_dropout,
                "support_dropout": config.fit.support_dropout,
                "seed": config.fit.seed, "ema_decay": config.ema_decay,
            },
            "zoo_load": config.load,
            "latent": config.latent.to_string(),
            "latent_steps": matches!(config.latent, LatentChoice::Autoencoder(_))
                .then_some(config.latent_steps),
            "recommended_sampling": checkpoint.recommended,
        }),
        summary,
        active: false,
        created_at_ms: 0,
    };
    catalog.insert_denoiser(&record).await?;
    // The other architectures of one checkpoint: a row each, the same blob
    // ("ID.ARCHITECTURE"), which the server loads for its architecture.
    let members = checkpoint
        .union
        .as_ref()
        .map_or(&[][..], |u| u.union.members());
    let mut further = Vec::new();
    let quality = qualities.remove(0).1;
    for (member, (_, member_quality)) in members.iter().skip(1).zip(qualities) {
        let row = DenoiserRecord {
            id: member_denoiser_id(&record.id, &member.name),
            architecture: member.name.clone(),
            summary: member_summary(&record.summary, &member.name),
            ..record.clone()
        };
        catalog.insert_denoiser(&row).await?;
        if config.activate {
            catalog.activate_denoiser(&row.id).await?;
        }
        tracing::info!(denoiser = %row.id, architecture = %member.name, "published for a further architecture");
        further.push((member.name.clone(), row.id, member_quality));
    }
    let record = if config.activate {
        catalog.activate_denoiser(&record.id).await?
    } else {
        catalog.denoiser(&record.id).await?.unwrap_or(record)
    };
    let artifacts = write_artifacts(&blobs, &record, &config.zoo, &curve).await?;
    run_state::clear(&blobs, &config.denoiser_id).await?;
    Ok(TrainOutcome {
        checkpoint,
        record,
        quality,
        further,
        curve,
        resumed_from,
        artifacts,
    })
}

/// The id of a checkpoint's row for a further architecture it generates.
pub fn member_denoiser_id(denoiser_id: &str, architecture: &str) -> String {
    format!("{denoiser_id}.{architecture}")
}

/// A further architecture's training summary: the run's figures with that
/// architecture's gate figures in place of the first zoo's.
fn member_summary(summary: &BTreeMap<String, f64>, architecture: &str) -> BTreeMap<String, f64> {
    let prefix = format!("{architecture}/");
    let mut out = training_figures(summary);
    for (key, value) in summary {
        if let Some(own) = key.strip_prefix(&prefix) {
            out.insert(own.to_owned(), *value);
        }
    }
    out
}

/// A run's figures that describe its training, not one architecture's
/// gate (no `quality.…`, no `ARCH/…`).
fn training_figures(summary: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    summary
        .iter()
        .filter(|(k, _)| !k.starts_with("quality.") && !k.contains('/'))
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

/// Writes the metrics file and the loss plot beside the run; returns their names.
async fn write_artifacts(
    blobs: &BlobStore,
    record: &DenoiserRecord,
    zoo: &str,
    curve: &[(usize, f64, f64)],
) -> Result<Vec<String>, TrainError> {
    let metrics = report::metrics_json(&record.id, zoo, curve, &record.summary);
    let metrics_name = run_state::run_object(&record.id, "metrics.json");
    let bytes = serde_json::to_vec_pretty(&metrics).map_err(|e| TrainError::Input {
        field: "metrics",
        reason: e.to_string(),
    })?;
    blobs.put_named(&metrics_name, Bytes::from(bytes)).await?;
    let mut names = vec![metrics_name];
    let title = format!("{} on {zoo}", record.id);
    match report::loss_plot_png(&title, curve) {
        Ok(png) => {
            let plot_name = run_state::run_object(&record.id, "loss.png");
            blobs.put_named(&plot_name, Bytes::from(png)).await?;
            names.push(plot_name);
        }
        Err(e) => tracing::warn!(error = %e, "loss plot not drawn"),
    }
    Ok(names)
}

/// Puts a checkpoint's weights, EMA and optimizer state back.
fn restore_run(
    state: &RunState,
    model: &ConditionalDenoiser,
    ema: &mut Ema,
    trainer: &mut Trainer,
) -> Result<(), TrainError> {
    let broken = |reason: String| TrainError::Input {
        field: "resume",
        reason: format!("training checkpoint does not fit this model: {reason}"),
    };
    for (name, mut var) in model.vs.variables() {
        let saved = state
            .tensor("model", &name)
            .ok_or_else(|| broken(format!("missing model.{name}")))?;
        if saved.size() != var.size() {
            return Err(broken(format!("model.{name} has shape {:?}", saved.size())));
        }
        tch::no_grad(|| var.copy_(&saved));
    }
    ema.restore(|name| state.tensor("ema", name))
        .map_err(broken)?;
    trainer
        .restore(state.position, |name| {
            state.tensors.get(name).map(Tensor::shallow_clone)
        })
        .map_err(broken)
}

/// The checkpoint, its loss curve, and the gate's figures per architecture
/// (the first zoo's first).
type Trained = (
    DenoiserCheckpoint,
    Vec<(usize, f64, f64)>,
    Vec<(String, QualityReport)>,
);

fn train_blocking(
    datasets: Vec<ZooDataset>,
    splits: Vec<(Vec<i64>, Vec<i64>)>,
    config: &TrainDenoiserConfig,
    resume: Option<RunState>,
    mut save: impl FnMut(&RunState) -> Result<(), TrainError>,
    on_log: impl Fn(usize, f64, f64),
) -> Result<Trained, TrainError> {
    // This is a blocking-pool thread, not the one that set the count.
    crate::device::adopt_intra_op_threads();
    let device = config.device;
    let prepared = match datasets.len() {
        1 => prepare::prepare_one(&datasets[0], &splits[0].0, &splits[0].1, config)?,
        _ => prepare::prepare_union(&datasets, &splits, config)?,
    };
    let prepare::Prepared {
        stats,
        latent,
        latent_val_mse,
        mut denoiser_config,
        feature_norm,
        train_data,
        val_data,
        train_condition,
        val_condition,
        zoo_reference,
        union,
    } = prepared;
    let data = &datasets[0];
    denoiser_config.net = config.net.clone();
    denoiser_config.timesteps = config.timesteps;
    denoiser_config.schedule = config.schedule;
    denoiser_config.prediction = config.prediction;
    // The initial weights come from libtorch's global generator: seed it so
    // a run is reproducible (and a resumed run comparable to a fresh one).
    tch::manual_seed(config.fit.seed as i64);
    let model =
        ConditionalDenoiser::new(denoiser_config, device).map_err(|e| TrainError::Input {
            field: "schedule",
            reason: e.to_string(),
        })?;
    let train_condition = train_condition.to_device(device);
    let train_data = train_data.to_device(device);
    // Support-set conditioning sees a fresh random K-subset of each zoo
    // model's training examples at every step (K = the descriptors' K).
    let mut fit = config.fit.clone();
    fit.support_examples = data.support.as_ref().map(|(x, _)| x.size()[1] as usize);
    let mut trainer = Trainer::new(&model, &fit)?;
    let mut ema = Ema::new(&model.vs, config.ema_decay);
    let mut curve = Vec::new();
    let mut recent = Vec::new();
    let mut first_step = 1;
    if let Some(state) = resume {
        restore_run(&state, &model, &mut ema, &mut trainer)?;
        first_step = state.step + 1;
        curve = state.curve;
        recent = state.recent;
    }
    let fingerprint = config.fingerprint();
    // One autocast scope for the whole run (fp16 on CUDA): see `Precision::scope`.
    config.fit.precision.scope(|| -> Result<(), TrainError> {
        for step in first_step..=config.fit.steps {
            if config.cancel.is_cancelled() {
                return Err(TrainError::Cancelled { step: step - 1 });
            }
            recent.push(trainer.step(&model, &train_data, &train_condition));
            ema.update(&model.vs);
            if step % config.log_every.max(1) == 0 || step == config.fit.steps {
                let train_loss = recent.iter().sum::<f64>() / recent.len() as f64;
                recent.clear();
                let precision = config.fit.precision;
                let val_loss = ema.with_averaged(&model.vs, || {
                    // Casts of the EMA weights, not the training ones, and none
                    // left behind for the next training step.
                    precision.fresh_casts();
                    let loss = validation_loss(&model, &val_data, &val_condition);
                    precision.fresh_casts();
                    loss
                });
                tracing::info!(step, train_loss, val_loss, "denoiser training");
                on_log(step, train_loss, val_loss);
                curve.push((step, train_loss, val_loss));
            }
            if config.checkpoint_every > 0
                && step % config.checkpoint_every == 0
                && step < config.fit.steps
            {
                let mut tensors = std::collections::HashMap::new();
                for (name, t) in model.vs.variables() {
                    tensors.insert(format!("model.{name}"), t.detach());
                }
                for (name, t) in ema.state_tensors() {
                    tensors.insert(format!("ema.{name}"), t);
                }
                tensors.extend(trainer.state_tensors());
                save(&RunState {
                    step,
                    position: trainer.position(),
                    curve: curve.clone(),
                    recent: recent.clone(),
                    fingerprint: fingerprint.clone(),
                    tensors,
                })?;
                tracing::info!(step, "training checkpoint saved");
            }
        }
        Ok(())
    })?;
    ema.copy_into(&model.vs);
    let clip = ClipRange::from_zoo(&train_data.to_device(Device::Cpu), CLIP_MARGIN);
    let clip = match clip {
        ClipRange::Box { low, high } => Some((low, high)),
        ClipRange::Symmetric(_) => None,
    };
    // Units share their bounds, as they share their statistics (no units:
    // nothing pooled).
    let units = &model.config().units;
    let clip = clip.map(|(low, high)| {
        (
            pool_over_units(units, &low, |t| t.amin([0].as_slice(), true)),
            pool_over_units(units, &high, |t| t.amax([0].as_slice(), true)),
        )
    });
    let mut summary = BTreeMap::new();
    if let Some(&(_, train_loss, val_loss)) = curve.last() {
        summary.insert("final_train_loss".to_owned(), train_loss);
        summary.insert("final_val_loss".to_owned(), val_loss);
    }
    summary.insert(
        "zoo_models".to_owned(),
        datasets.iter().map(ZooDataset::len).sum::<usize>() as f64,
    );
    if let Some(mse) = latent_val_mse {
        summary.insert("latent_val_reconstruction_mse".to_owned(), mse);
    }
    let mut checkpoint = DenoiserCheckpoint {
        model,
        arch: data.network.spec.clone(),
        stats,
        latent,
        clip,
        feature_schema: data.schema.clone(),
        feature_norm: Some(feature_norm),
        summary,
        zoo_reference,
        recommended: None,
        union,
    };
    // A denoiser of several architectures is scored on each zoo in turn, as
    // it generates that architecture; the first zoo's figures are the
    // checkpoint's own, every zoo's are also kept under its architecture.
    let mut qualities = Vec::new();
    for (data, (train, val)) in datasets.iter().zip(&splits).rev() {
        checkpoint.select_architecture(&data.network.spec)?;
        let quality = evaluate_quality(
            &checkpoint,
            data,
            train,
            val,
            config.eval_tasks,
            config.eval_guidance,
            config.fit.seed,
        );
        for (key, value) in quality.summary() {
            if datasets.len() > 1 {
                let key = format!("{}/{key}", data.network.spec.name);
                checkpoint.summary.insert(key, value);
            }
            if std::ptr::eq(data, &datasets[0]) {
                checkpoint.summary.insert(key, value);
            }
        }
        qualities.push((data.network.spec.name.clone(), quality));
    }
    qualities.reverse();
    checkpoint.recommended = qualities[0].1.recommended;
    Ok((checkpoint, curve, qualities))
}
