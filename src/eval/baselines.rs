//! Learned baselines for the harness, trained on the same zoo tasks the
//! denoiser learned from: Reptile and first-order MAML meta-learned inits
//! (one init for every task), and a task-conditioned hypernetwork — a
//! deterministic regression from the task to the weights through the
//! denoiser's own task-encoder architecture.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use super::learner::{Examples, gradient};
use crate::model::fit::random_subsets;
use crate::model::task_encoder::TaskEncoder;
use crate::model::{DenoiserCheckpoint, TaskBatch};
use crate::tasks::TaskSpec;
use crate::train::quality::condition_of;
use crate::weights::{DEFAULT_STD_FLOOR, Stats, StatsMode};
use crate::zoo::ZooDataset;

/// How the meta-learners train.
#[derive(Debug, Clone, PartialEq)]
pub struct MetaConfig {
    /// Outer iterations (one task each).
    pub meta_steps: usize,
    /// Inner SGD steps per task.
    pub inner_steps: usize,
    /// Inner learning rate.
    pub inner_lr: f64,
    /// Reptile's outer step size ε (annealed linearly to 0).
    pub outer_lr: f64,
    /// First-order MAML's outer SGD step β.
    pub fomaml_lr: f64,
    /// Examples per inner step (0 = the task's whole training set).
    pub batch_size: usize,
}

/// Examples of zoo tasks, read once each.
struct TaskCache<'a> {
    data: &'a ZooDataset,
    cached: HashMap<String, Examples>,
}

impl<'a> TaskCache<'a> {
    fn new(data: &'a ZooDataset) -> Self {
        Self {
            data,
            cached: HashMap::new(),
        }
    }

    fn get(&mut self, task: &TaskSpec) -> Option<&Examples> {
        let key = task.key();
        if !self.cached.contains_key(&key) {
            let examples = Examples::of(self.data, task)?;
            self.cached.insert(key.clone(), examples);
        }
        self.cached.get(&key)
    }
}

/// `steps` of plain SGD from `init` on `examples`.
fn adapt(
    data: &ZooDataset,
    init: &[Tensor],
    examples: &Examples,
    config: &MetaConfig,
    rng: &mut StdRng,
) -> Vec<Tensor> {
    let mut phi: Vec<Tensor> = init
        .iter()
        .map(|t| t.detach().copy().set_requires_grad(true))
        .collect();
    for _ in 0..config.inner_steps {
        let grads = gradient(data, &phi, examples, config.batch_size, rng);
        phi = phi
            .iter()
            .zip(grads)
            .map(|(p, g)| (p.detach() - g * config.inner_lr).set_requires_grad(true))
            .collect();
    }
    phi.iter().map(Tensor::detach).collect()
}

/// The loop both meta-learners share: from a fresh init, `meta_steps`
/// times pick a random zoo task, adapt to it with SGD (φ), and let `outer`
/// turn (step, θ, φ, the task's examples) into the next θ.
fn meta_learn(
    data: &ZooDataset,
    config: &MetaConfig,
    seed: u64,
    mut outer: impl FnMut(usize, &[Tensor], Vec<Tensor>, &Examples, &mut StdRng) -> Vec<Tensor>,
) -> Vec<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cache = TaskCache::new(data);
    let mut theta = data.network.init(seed, Device::Cpu);
    let tasks = &data.tasks;
    for step in 0..config.meta_steps {
        let task = &tasks[rng.random_range(0..tasks.len())];
        let Some(examples) = cache.get(task) else {
            continue;
        };
        let phi = adapt(data, &theta, examples, config, &mut rng);
        theta = outer(step, &theta, phi, examples, &mut rng);
    }
    theta
}

/// Reptile (Nichol et al. 2018): θ ← θ + ε (φ − θ), φ = θ after SGD on a
/// random zoo task; ε annealed linearly to 0.
pub fn reptile(data: &ZooDataset, config: &MetaConfig, seed: u64) -> Vec<Tensor> {
    meta_learn(data, config, seed, |step, theta, phi, _, _| {
        let epsilon = config.outer_lr * (1.0 - step as f64 / config.meta_steps as f64);
        theta
            .iter()
            .zip(&phi)
            .map(|(t, p)| t + (p - t) * epsilon)
            .collect()
    })
}

/// First-order MAML (Finn et al. 2017, first-order): adapt on one batch of
/// a random zoo task, then θ ← θ − β ∇L(φ) on another batch of it.
pub fn fomaml(data: &ZooDataset, config: &MetaConfig, seed: u64) -> Vec<Tensor> {
    meta_learn(data, config, seed, |_, theta, phi, examples, rng| {
        let phi: Vec<Tensor> = phi.into_iter().map(|p| p.set_requires_grad(true)).collect();
        let grads = gradient(data, &phi, examples, config.batch_size, rng);
        theta
            .iter()
            .zip(grads)
            .map(|(t, g)| t - g * config.fomaml_lr)
            .collect()
    })
}

/// A task-conditioned hypernetwork: the denoiser's task-encoder
/// architecture plus a linear head, regressing the zoo's standardized
/// weights from its tasks (MSE, Adam).
pub struct Hypernetwork {
    vs: nn::VarStore,
    encoder: TaskEncoder,
    head: nn::Linear,
    /// The standardization of the weights it regresses.
    stats: Stats,
}

impl Hypernetwork {
    /// The encoder variants worth training for `checkpoint`, as values of
    /// the label-prototype switch: the denoiser's own encoder, and the same
    /// without its prototype branch where it has one (a regression may
    /// do better without it than a denoiser does).
    pub fn encoder_variants(checkpoint: &DenoiserCheckpoint) -> Vec<bool> {
        if checkpoint.model.config().encoder.has_prototypes() {
            vec![true, false]
        } else {
            vec![false]
        }
    }

    /// Trains it on every zoo model for `steps` Adam steps of `batch_size`,
    /// with the denoiser's encoder architecture, its label-prototype branch
    /// on or off.
    pub fn train(
        checkpoint: &DenoiserCheckpoint,
        data: &ZooDataset,
        steps: usize,
        batch_size: i64,
        learning_rate: f64,
        seed: u64,
        prototypes: bool,
    ) -> Result<Self, tch::TchError> {
        tch::manual_seed(seed as i64);
        let vs = nn::VarStore::new(Device::Cpu);
        let mut encoder_config = checkpoint.model.config().encoder.clone();
        encoder_config.prototypes = prototypes;
        let encoder = TaskEncoder::new(&(vs.root() / "encoder"), &encoder_config);
        let dim = data.weights.size()[1];
        let head = nn::linear(
            vs.root() / "head",
            encoder_config.embed_dim,
            dim,
            Default::default(),
        );
        let mut optimizer = nn::Adam::default().build(&vs, learning_rate)?;
        let mut condition =
            condition_of(checkpoint, data, &data.descriptors).to_device(Device::Cpu);
        // Like the denoiser's training: each row sees a fresh random K-subset
        // of its model's pool of training examples, not one fixed support set
        // it could memorize.
        let k = data.support.as_ref().map(|(x, _)| x.size()[1] as usize);
        if let (Some(_), Some((pool_x, pool_y))) = (k, &data.support_pool) {
            condition.support_x = Some(pool_x.shallow_clone());
            condition.support_y = Some(pool_y.shallow_clone());
        }
        let pool = condition
            .support_x
            .as_ref()
            .map_or(0, |x| x.size()[1] as usize);
        // The zoo's own standardization: a denoiser of several architectures
        // has the union's, fitted on other zoos when this width is unseen.
        let stats = match &checkpoint.union {
            Some(_) => Stats::fit(
                &data.weights.to_device(Device::Cpu),
                StatsMode::PerDimension,
                &data.network.spec,
                DEFAULT_STD_FLOOR,
            ),
            None => checkpoint.arch_stats(),
        };
        let targets = stats
            .normalize(&data.weights.to_device(Device::Cpu))
            .to_kind(Kind::Float);
        let n = targets.size()[0];
        let mut rng = StdRng::seed_from_u64(seed);
        for _ in 0..steps {
            let index: Vec<i64> = (0..batch_size.min(n))
                .map(|_| rng.random_range(0..n))
                .collect();
            let index = Tensor::from_slice(&index);
            let rows = index.size()[0];
            let mut batch = condition.select(&index);
            if let Some(k) = k.filter(|&k| pool > k) {
                let (k, pick) = random_subsets(&mut rng, rows as usize, pool, k);
                batch =
                    batch.with_support_subsets(&Tensor::from_slice(&pick).view([rows, k as i64]));
            }
            let embedded = encoder.forward(&batch, rows, None);
            let predicted = head.forward(&embedded);
            let l = predicted.mse_loss(&targets.index_select(0, &index), tch::Reduction::Mean);
            optimizer.backward_step(&l);
        }
        Ok(Self {
            vs,
            encoder,
            head,
            stats,
        })
    }

    /// Flat weights for `condition` rows (as `condition_of` builds them).
    pub fn predict(&self, condition: &TaskBatch, rows: i64) -> Tensor {
        tch::no_grad(|| {
            let embedded = self
                .encoder
                .forward(&condition.to_device(self.vs.device()), rows, None);
            self.stats
                .denormalize(&self.head.forward(&embedded))
                .to_device(Device::Cpu)
        })
    }
}
