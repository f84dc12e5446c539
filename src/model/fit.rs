//! A plain training loop for a `ConditionalDenoiser` on in-memory data:
//! Adam on the proposal's loss with t ~ U{1..T}, condition dropout for
//! classifier-free guidance, optional gradient clipping and mixed precision
//! on CUDA. Deterministic given the seed, the initial weights and the number
//! of batch parts, and resumable from a saved position. On CPU a batch can be
//! split into parts computed on threads of their own (data parallelism; it
//! pays at larger batches, where a pass over the weights serves more rows:
//! BENCHMARKS.md).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::adam::Adam;
use super::batch_parts::{BatchParts, PartInput};
use super::conditional::ConditionalDenoiser;
use super::precision::{LossScale, Precision};
use super::task_encoder::TaskBatch;
use crate::rng::{SeededNoise, splitmix64};

/// Adam learning rate of the proposal.
pub const DEFAULT_LEARNING_RATE: f64 = 1e-4;
/// Batch size of the proposal.
pub const DEFAULT_BATCH_SIZE: i64 = 64;
/// Share of rows trained with the null condition.
pub const DEFAULT_COND_DROPOUT: f64 = 0.1;
/// Where the cosine schedule ends, as a share of the starting rate.
pub const COSINE_FINAL_FRACTION: f64 = 0.1;

/// How the learning rate moves over a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// The same rate at every step (the proposal).
    #[default]
    Constant,
    /// Half a cosine from the rate down to a tenth of it at the last step.
    Cosine,
}

impl LrSchedule {
    /// Its name in a training spec and a run's fingerprint.
    pub fn name(self) -> &'static str {
        match self {
            Self::Constant => "constant",
            Self::Cosine => "cosine",
        }
    }

    /// The factor on the learning rate at 0-based `step` of `steps`.
    pub fn factor(self, step: u64, steps: usize) -> f64 {
        match self {
            Self::Constant => 1.0,
            Self::Cosine => {
                let progress = (step as f64 / (steps.max(2) - 1) as f64).min(1.0);
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                COSINE_FINAL_FRACTION + (1.0 - COSINE_FINAL_FRACTION) * cosine
            }
        }
    }
}

/// Training settings.
#[derive(Debug, Clone, PartialEq)]
pub struct FitConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Rows per step.
    pub batch_size: i64,
    /// Adam learning rate (at the first step).
    pub learning_rate: f64,
    /// How the learning rate moves over the `steps`.
    pub lr_schedule: LrSchedule,
    /// Decoupled weight decay (AdamW's; 0: Adam, the proposal's optimizer).
    pub weight_decay: f64,
    /// Probability that a row's condition is replaced by the null one.
    pub cond_dropout: f64,
    /// Probability that a row's descriptor features are withheld (its
    /// support set kept), so the denoiser can also be conditioned on the
    /// support set alone. 0 draws nothing (the batch stream is unchanged).
    pub feature_dropout: f64,
    /// Probability that a row's support set is withheld (its features
    /// kept), so the denoiser can also be conditioned on the features alone.
    /// Drawn with the same number as feature dropout: a row loses its
    /// features with probability `feature_dropout`, else its support set with
    /// probability `support_dropout`, never both (that is `cond_dropout`).
    pub support_dropout: f64,
    /// Clip the gradient norm to this value.
    pub grad_clip: Option<f64>,
    /// Seed of batches, timesteps, noise and dropout.
    pub seed: u64,
    /// fp32, or fp16 autocast with loss scaling (CUDA).
    pub precision: Precision,
    /// K: when the condition's support sets hold more examples (a pool per
    /// row), each row of each batch sees a fresh random K-subset of its pool.
    pub support_examples: Option<usize>,
    /// Parts each batch is split into on CPU, each computed (forward and
    /// backward) on its own thread; their gradients are added in part order,
    /// so a run repeats exactly at the same count (1: no split; the sum of
    /// the parts' gradients is the batch's, up to floating-point order).
    /// Ignored off the CPU and under fp16.
    pub data_parallel: usize,
    /// Attention windows of the layer transformer each step trains on,
    /// drawn at random per step, when its vectors have more (None: all).
    /// What makes a step's memory independent of D.
    pub train_windows: Option<usize>,
}

impl Default for FitConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: DEFAULT_BATCH_SIZE,
            learning_rate: DEFAULT_LEARNING_RATE,
            lr_schedule: LrSchedule::Constant,
            weight_decay: 0.0,
            cond_dropout: DEFAULT_COND_DROPOUT,
            feature_dropout: 0.0,
            support_dropout: 0.0,
            grad_clip: Some(1.0),
            seed: 0,
            precision: Precision::Fp32,
            support_examples: None,
            data_parallel: 1,
            train_windows: None,
        }
    }
}

/// What training did.
#[derive(Debug, Clone)]
pub struct FitReport {
    /// Loss at every step.
    pub losses: Vec<f64>,
}

impl FitReport {
    /// Mean loss over the last `fraction` of steps.
    pub fn final_loss(&self, fraction: f64) -> f64 {
        let n = ((self.losses.len() as f64 * fraction).ceil() as usize)
            .clamp(1, self.losses.len().max(1));
        self.losses.iter().rev().take(n).sum::<f64>() / n as f64
    }
}

/// Where a `Trainer` stands, apart from tensors: saved with a training
/// checkpoint so a resumed run continues exactly where it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainerPosition {
    /// Batches drawn so far (the data-order position).
    pub batches: u64,
    /// Optimizer steps taken (fewer than batches when fp16 overflowed).
    pub optimizer_steps: u64,
    /// Loss scale of mixed precision.
    pub loss_scale: LossScale,
}

/// Training state that lives across steps: Adam with its moments, the
/// loss scale, and the data-order position. Every batch's rows, timesteps,
/// dropout mask and noise are a function of (seed, position), so a run
/// restored from a checkpoint draws exactly what the uninterrupted run drew.
#[derive(Debug)]
pub struct Trainer {
    adam: Adam,
    loss_scale: LossScale,
    batches: u64,
    noise: SeededNoise,
    config: FitConfig,
    /// The threads of batch parts 1.. (`data_parallel` > 1, made at the
    /// first step that splits).
    parts: Option<BatchParts>,
}

impl Trainer {
    /// Adam over `model`'s variables, seeded from `config.seed`.
    pub fn new(model: &ConditionalDenoiser, config: &FitConfig) -> Result<Self, tch::TchError> {
        let params: Vec<(String, Tensor)> = model.vs.variables().into_iter().collect();
        Ok(Self {
            adam: Adam::new(params, config.learning_rate).with_weight_decay(config.weight_decay),
            loss_scale: LossScale::for_precision(config.precision),
            batches: 0,
            noise: SeededNoise::new(&[config.seed], 1),
            config: config.clone(),
            parts: None,
        })
    }

    /// Where the trainer stands.
    pub fn position(&self) -> TrainerPosition {
        TrainerPosition {
            batches: self.batches,
            optimizer_steps: self.adam.steps(),
            loss_scale: self.loss_scale,
        }
    }

    /// Adam's moments, named "adam.m.<var>" / "adam.v.<var>".
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.adam
            .state_tensors()
            .into_iter()
            .map(|(name, t)| (format!("adam.{name}"), t))
            .collect()
    }

    /// Puts back a position and the moments saved by `state_tensors`.
    pub fn restore(
        &mut self,
        position: TrainerPosition,
        mut tensor: impl FnMut(&str) -> Option<Tensor>,
    ) -> Result<(), String> {
        self.adam.restore(position.optimizer_steps, |name| {
            tensor(&format!("adam.{name}"))
        })?;
        self.batches = position.batches;
        self.loss_scale = position.loss_scale;
        Ok(())
    }

    /// One optimizer step on a random batch of `data` [N, D] (on the model's
    /// device) with its `condition`; returns the loss. With fp16 it computes
    /// in the caller's autocast scope (`Precision::scope` around the run).
    pub fn step(
        &mut self,
        model: &ConditionalDenoiser,
        data: &Tensor,
        condition: &TaskBatch,
    ) -> f64 {
        let device = model.device();
        let (n, dim) = (data.size()[0], data.size()[1]);
        let timesteps = model.schedule().timesteps() as i64;
        let b = self.config.batch_size;
        let position = self.batches;
        self.batches += 1;
        let mut rng = StdRng::seed_from_u64(splitmix64(self.config.seed ^ splitmix64(position)));
        let index: Vec<i64> = (0..b).map(|_| rng.random_range(0..n)).collect();
        let t: Vec<i64> = (0..b).map(|_| rng.random_range(1..=timesteps)).collect();
        let drop: Vec<bool> = (0..b)
            .map(|_| rng.random::<f64>() < self.config.cond_dropout)
            .collect();
        let subsets = self.config.support_examples.and_then(|k| {
            let pool = condition.support_x.as_ref()?.size()[1] as usize;
            (pool > k).then(|| random_subsets(&mut rng, b as usize, pool, k))
        });
        let (feature_p, support_p) = (self.config.feature_dropout, self.config.support_dropout);
        // Which input each row keeps (0: both, 1: support only, 2: features only).
        let withheld: Option<Vec<u8>> =
            ((feature_p > 0.0 || support_p > 0.0) && condition.features.is_some()).then(|| {
                (0..b)
                    .map(|_| {
                        let u = rng.random::<f64>();
                        if u < feature_p {
                            1
                        } else if u < feature_p + support_p && condition.support_x.is_some() {
                            2
                        } else {
                            0
                        }
                    })
                    .collect()
            });
        // Drawn last, and only when asked for: other runs' streams stay as they were.
        let count = model.window_count();
        let windows = self
            .config
            .train_windows
            .filter(|&k| k < count)
            .map(|k| rand::seq::index::sample(&mut rng, count, k).into_vec());
        let index = Tensor::from_slice(&index).to_device(device);
        let t = Tensor::from_slice(&t).to_device(device);
        let drop = Tensor::from_slice(&drop).to_device(device);
        self.noise.seek(position);
        let eps = self.noise.draw(&[b, dim], device).squeeze_dim(0);
        let mut batch_condition = condition.select(&index);
        if let Some(subsets) = subsets {
            let pick = Tensor::from_slice(&subsets.1)
                .view([b, subsets.0 as i64])
                .to_device(device);
            batch_condition = batch_condition.with_support_subsets(&pick);
        }
        if let Some(withheld) = withheld {
            let mask = |which: u8| {
                let rows: Vec<bool> = withheld.iter().map(|&w| w == which).collect();
                Some(Tensor::from_slice(&rows).to_device(device))
            };
            batch_condition.features_dropped = mask(1);
            if batch_condition.support_x.is_some() {
                batch_condition.support_dropped = mask(2);
            }
        }
        let mixed = self.config.precision == Precision::Fp16;
        // The weights changed at the last step: no stale fp16 copies.
        self.config.precision.fresh_casts();
        let w0 = data.index_select(0, &index);
        self.adam.zero_grad();
        let parts = self.config.data_parallel.clamp(1, b as usize);
        if parts > 1 && device == tch::Device::Cpu && !mixed {
            let loss = self.parallel_backward(
                model,
                &w0,
                &batch_condition,
                &t,
                &eps,
                &drop,
                windows.as_deref(),
                parts,
            );
            return self.finish_step(position, false, loss);
        }
        let loss = model
            .loss_on(
                &w0,
                &batch_condition,
                &t,
                &eps,
                Some(&drop),
                windows.as_deref(),
            )
            .to_kind(Kind::Float);
        let scale = self.loss_scale.scale;
        if scale == 1.0 {
            loss.backward();
        } else {
            (&loss * scale).backward();
            self.adam.scale_gradients(1.0 / scale);
        }
        self.finish_step(position, mixed, loss.double_value(&[]))
    }

    /// Clips (and for fp16 checks) the gradients in place and takes the Adam
    /// step; returns `loss`.
    fn finish_step(&mut self, position: u64, mixed: bool, loss: f64) -> f64 {
        // One norm serves the overflow check (fp16) and the clipping.
        let norm = (mixed || self.config.grad_clip.is_some()).then(|| self.adam.gradient_norm());
        let finite = !mixed || norm.is_some_and(f64::is_finite);
        if self.loss_scale.update(finite) {
            if let (Some(max_norm), Some(norm)) = (self.config.grad_clip, norm) {
                self.adam.clip_known_norm(max_norm, norm);
            }
            let factor = self.config.lr_schedule.factor(position, self.config.steps);
            self.adam
                .set_learning_rate(self.config.learning_rate * factor);
            self.adam.step();
        }
        loss
    }

    /// Forward and backward of the batch in `parts` row ranges (see
    /// `batch_parts`); the gradients of every part end up in `.grad`.
    /// Returns the batch's mean loss.
    #[allow(clippy::too_many_arguments)]
    fn parallel_backward(
        &mut self,
        model: &ConditionalDenoiser,
        w0: &Tensor,
        condition: &TaskBatch,
        t: &Tensor,
        eps: &Tensor,
        drop: &Tensor,
        windows: Option<&[usize]>,
        parts: usize,
    ) -> f64 {
        let threads = match &mut self.parts {
            Some(threads) if threads.parts() == parts => threads,
            slot => {
                // Gradients stay defined from here on (`zero_grad` zeroes
                // them in place), so the parts always have one to add to.
                self.adam.define_gradients();
                slot.insert(BatchParts::new(parts))
            }
        };
        let rows = w0.size()[0];
        let inputs = (0..parts as i64)
            .map(|p| {
                let (start, end) = (rows * p / parts as i64, rows * (p + 1) / parts as i64);
                let mut part = PartInput::rows(w0, condition, t, eps, drop, start, end);
                part.windows = windows.map(<[usize]>::to_vec);
                part
            })
            .collect();
        let params = self.adam.parameters();
        let (mut total, others) = threads.run(model, &params, inputs);
        for (loss, grads) in others {
            total += loss;
            self.adam.add_gradients(&grads);
        }
        total
    }
}

/// `rows` random K-subsets of 0..pool (distinct within a row), flattened.
pub(crate) fn random_subsets(
    rng: &mut StdRng,
    rows: usize,
    pool: usize,
    k: usize,
) -> (usize, Vec<i64>) {
    let mut picks = Vec::with_capacity(rows * k);
    let mut order: Vec<i64> = (0..pool as i64).collect();
    for _ in 0..rows {
        for j in 0..k {
            let r = rng.random_range(j..pool);
            order.swap(j, r);
        }
        picks.extend_from_slice(&order[..k]);
    }
    (k, picks)
}

/// Trains on rows of `data` [N, D] (standardized weights) with conditions
/// `condition` (N rows) for `config.steps` steps.
pub fn fit(
    model: &mut ConditionalDenoiser,
    data: &Tensor,
    condition: &TaskBatch,
    config: &FitConfig,
) -> FitReport {
    let device = model.device();
    let data = data.to_device(device).to_kind(Kind::Float);
    let condition = condition.to_device(device);
    let mut trainer = Trainer::new(model, config).expect("Adam over the model's variables");
    let losses = config.precision.scope(|| {
        (0..config.steps)
            .map(|_| trainer.step(model, &data, &condition))
            .collect()
    });
    FitReport { losses }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DenoiserConfig, MlpUnetConfig, NetConfig, TaskEncoderConfig};
    use tch::Device;

    /// A small model with fixed weights (not from the global RNG, which
    /// tests running in parallel share).
    fn small_model(seed: u64) -> ConditionalDenoiser {
        let encoder = TaskEncoderConfig {
            feature_dim: 2,
            support_x_dim: 1,
            support_y_dim: 1,
            hidden: 8,
            embed_dim: 8,
            prototypes: false,
        };
        let mut config = DenoiserConfig::new(6, encoder);
        config.net = NetConfig::MlpUnet(MlpUnetConfig {
            widths: vec![16],
            blocks_per_level: 1,
            time_dim: 8,
            ..Default::default()
        });
        let model = ConditionalDenoiser::new(config, Device::Cpu).unwrap();
        model.set_test_weights(seed);
        model
    }

    fn data() -> (Tensor, TaskBatch) {
        let w = Tensor::arange(60, (Kind::Float, Device::Cpu)).view([10, 6]) / 60.0;
        let features = Tensor::arange(20, (Kind::Float, Device::Cpu)).view([10, 2]) / 20.0;
        // A pool of 7 support examples per row; training keeps 3 of them.
        let pool = Tensor::arange(70, (Kind::Float, Device::Cpu)).view([10, 7, 1]) / 70.0;
        let condition = TaskBatch {
            features: Some(features),
            support_x: Some(pool.shallow_clone()),
            support_y: Some(pool),
            features_dropped: None,
            support_dropped: None,
            arch_descriptor: None,
            arch_mask: None,
        };
        (w, condition)
    }

    fn weights(model: &ConditionalDenoiser) -> Vec<Tensor> {
        let mut vars: Vec<(String, Tensor)> = model.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars.into_iter().map(|(_, t)| t.copy()).collect()
    }

    fn train(config: &FitConfig, steps: usize) -> Vec<Tensor> {
        let model = small_model(5);
        let (w, condition) = data();
        let mut trainer = Trainer::new(&model, config).unwrap();
        for _ in 0..steps {
            trainer.step(&model, &w, &condition);
        }
        weights(&model)
    }

    fn config() -> FitConfig {
        FitConfig {
            batch_size: 4,
            learning_rate: 1e-2,
            support_examples: Some(3),
            ..Default::default()
        }
    }

    #[test]
    fn the_cosine_schedule_falls_from_the_rate_to_its_final_fraction() {
        let cosine = LrSchedule::Cosine;
        assert_eq!(cosine.factor(0, 101), 1.0);
        assert!((cosine.factor(50, 101) - (1.0 + COSINE_FINAL_FRACTION) / 2.0).abs() < 1e-12);
        assert!((cosine.factor(100, 101) - COSINE_FINAL_FRACTION).abs() < 1e-12);
        assert!((cosine.factor(500, 101) - COSINE_FINAL_FRACTION).abs() < 1e-12);
        assert!((1..101).all(|s| cosine.factor(s, 101) < cosine.factor(s - 1, 101)));
        assert_eq!(LrSchedule::Constant.factor(77, 101), 1.0);
        for s in [LrSchedule::Constant, LrSchedule::Cosine] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
        }
        // A schedule changes the run; the same schedule repeats it.
        let decayed = FitConfig {
            steps: 15,
            lr_schedule: LrSchedule::Cosine,
            ..config()
        };
        let constant = FitConfig {
            steps: 15,
            ..config()
        };
        let (a, b) = (train(&decayed, 15), train(&decayed, 15));
        assert!(a.iter().zip(&b).all(|(x, y)| x.equal(y)));
        let c = train(&constant, 15);
        assert!(a.iter().zip(&c).any(|(x, y)| !x.equal(y)));
    }

    #[test]
    fn the_same_seed_trains_the_same_weights_and_another_does_not() {
        let a = train(&config(), 15);
        let b = train(&config(), 15);
        assert!(a.iter().zip(&b).all(|(x, y)| x.equal(y)));
        let other = FitConfig {
            seed: 1,
            ..config()
        };
        let c = train(&other, 15);
        assert!(a.iter().zip(&c).any(|(x, y)| !x.equal(y)));
    }

    #[test]
    fn a_batch_split_across_threads_has_the_whole_batchs_loss_and_gradients() {
        // Learning rate 0 and no clipping: the step leaves the weights and
        // keeps the gradients for a look.
        let step_once = |parts: usize| {
            let model = small_model(5);
            let (w, condition) = data();
            let config = FitConfig {
                learning_rate: 0.0,
                grad_clip: None,
                data_parallel: parts,
                ..config()
            };
            let mut trainer = Trainer::new(&model, &config).unwrap();
            let loss = trainer.step(&model, &w, &condition);
            let grads: Vec<Tensor> = trainer.adam.gradients().iter().map(Tensor::copy).collect();
            (loss, grads)
        };
        let (loss, whole) = step_once(1);
        assert!(!whole.is_empty());
        for parts in [2, 3, 4] {
            let (split_loss, split) = step_once(parts);
            assert!(
                (split_loss - loss).abs() < 1e-6,
                "{parts} parts: loss {split_loss} vs {loss}"
            );
            assert_eq!(split.len(), whole.len());
            for (a, b) in split.iter().zip(&whole) {
                assert!(
                    a.allclose(b, 1e-4, 1e-6, false),
                    "{parts} parts: {a:?} vs {b:?}"
                );
                assert!(b.abs().sum(Kind::Float).double_value(&[]) > 0.0);
            }
        }
        // More parts than rows: one row each.
        let (many_loss, _) = step_once(64);
        assert!((many_loss - loss).abs() < 1e-6);
    }

    #[test]
    fn split_batches_train_the_same_weights_every_time() {
        let split = FitConfig {
            data_parallel: 2,
            ..config()
        };
        let (a, b) = (train(&split, 15), train(&split, 15));
        assert!(a.iter().zip(&b).all(|(x, y)| x.equal(y)));
        // And they train: the weights moved from the start.
        let start = weights(&small_model(5));
        assert!(a.iter().zip(&start).any(|(x, y)| !x.equal(y)));
    }

    #[test]
    fn a_restored_trainer_continues_exactly() {
        let straight = train(&config(), 12);
        let model = small_model(5);
        let (w, condition) = data();
        let mut first = Trainer::new(&model, &config()).unwrap();
        for _ in 0..5 {
            first.step(&model, &w, &condition);
        }
        let saved: Vec<(String, Tensor)> = first
            .state_tensors()
            .into_iter()
            .map(|(k, t)| (k, t.copy()))
            .collect();
        let position = first.position();
        assert_eq!((position.batches, position.optimizer_steps), (5, 5));
        let mut second = Trainer::new(&model, &config()).unwrap();
        second
            .restore(position, |k| {
                saved.iter().find(|(n, _)| n == k).map(|(_, t)| t.copy())
            })
            .unwrap();
        for _ in 0..7 {
            second.step(&model, &w, &condition);
        }
        assert!(
            straight
                .iter()
                .zip(&weights(&model))
                .all(|(x, y)| x.equal(y))
        );
    }

    #[test]
    fn loss_scaling_by_a_power_of_two_changes_nothing_in_fp32() {
        // Off CUDA, autocast is a no-op, so the fp16 path differs from fp32
        // only by the loss scale, which must cancel exactly.
        let plain = train(&config(), 10);
        let scaled = FitConfig {
            precision: Precision::Fp16,
            ..config()
        };
        let model = small_model(5);
        let (w, condition) = data();
        let mut trainer = Trainer::new(&model, &scaled).unwrap();
        for _ in 0..10 {
            trainer.step(&model, &w, &condition);
        }
        assert_eq!(trainer.position().loss_scale.scale, 65_536.0);
        assert!(plain.iter().zip(&weights(&model)).all(|(x, y)| x.equal(y)));
    }
}
