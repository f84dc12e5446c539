//! A plain training loop for a `ConditionalDenoiser` on in-memory data:
//! Adam on the proposal's loss with t ~ U{1..T}, condition dropout for
//! classifier-free guidance and optional gradient clipping. Deterministic
//! given the seed and the initial weights.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::nn::{self, OptimizerConfig};
use tch::{Kind, Tensor};

use super::conditional::ConditionalDenoiser;
use super::task_encoder::TaskBatch;
use crate::diffusion::SeededNoise;

/// Adam learning rate of the proposal.
pub const DEFAULT_LEARNING_RATE: f64 = 1e-4;
/// Batch size of the proposal.
pub const DEFAULT_BATCH_SIZE: i64 = 64;
/// Share of rows trained with the null condition.
pub const DEFAULT_COND_DROPOUT: f64 = 0.1;

/// Training settings.
#[derive(Debug, Clone, PartialEq)]
pub struct FitConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Rows per step.
    pub batch_size: i64,
    /// Adam learning rate.
    pub learning_rate: f64,
    /// Probability that a row's condition is replaced by the null one.
    pub cond_dropout: f64,
    /// Clip the gradient norm to this value.
    pub grad_clip: Option<f64>,
    /// Seed of batches, timesteps, noise and dropout.
    pub seed: u64,
}

impl Default for FitConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: DEFAULT_BATCH_SIZE,
            learning_rate: DEFAULT_LEARNING_RATE,
            cond_dropout: DEFAULT_COND_DROPOUT,
            grad_clip: Some(1.0),
            seed: 0,
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

/// Training state that lives across steps: the optimizer (with Adam's
/// moments), the batch/timestep/dropout RNG and the noise stream.
pub struct Trainer {
    optimizer: nn::Optimizer,
    rng: StdRng,
    noise: SeededNoise,
    config: FitConfig,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Trainer {
    /// Adam over `model`'s variables, seeded from `config.seed`.
    pub fn new(model: &ConditionalDenoiser, config: &FitConfig) -> Result<Self, tch::TchError> {
        Ok(Self {
            optimizer: nn::Adam::default().build(&model.vs, config.learning_rate)?,
            rng: StdRng::seed_from_u64(config.seed),
            noise: SeededNoise::new(&[config.seed], 1),
            config: config.clone(),
        })
    }

    /// One optimizer step on a random batch of `data` [N, D] (on the model's
    /// device) with its `condition`; returns the loss.
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
        let rng = &mut self.rng;
        let index: Vec<i64> = (0..b).map(|_| rng.random_range(0..n)).collect();
        let t: Vec<i64> = (0..b).map(|_| rng.random_range(1..=timesteps)).collect();
        let drop: Vec<bool> = (0..b)
            .map(|_| rng.random::<f64>() < self.config.cond_dropout)
            .collect();
        let index = Tensor::from_slice(&index).to_device(device);
        let t = Tensor::from_slice(&t).to_device(device);
        let drop = Tensor::from_slice(&drop).to_device(device);
        let eps = self.noise.draw(&[b, dim], device).squeeze_dim(0);
        let loss = model.loss(
            &data.index_select(0, &index),
            &condition.select(&index),
            &t,
            &eps,
            Some(&drop),
        );
        self.optimizer.zero_grad();
        loss.backward();
        if let Some(max_norm) = self.config.grad_clip {
            self.optimizer.clip_grad_norm(max_norm);
        }
        self.optimizer.step();
        loss.double_value(&[])
    }
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
    let losses = (0..config.steps)
        .map(|_| trainer.step(model, &data, &condition))
        .collect();
    FitReport { losses }
}
