//! The harness's protocol: what it runs (`EvalConfig`, the full and quick
//! profiles), the methods it compares (`Method`), the held-out and
//! validation tasks it draws, and random init's learning rate.
//!
//! The learning rate for fine-tuning is chosen for *random init* on
//! separate validation tasks (held-out tasks, other seed) from `lr_grid`,
//! by the best mean test score after `finetune_steps`; every method is then
//! fine-tuned at that rate and at the proposal's 1e-4. "Fully trained" is
//! random init after `full_steps` at the chosen rate; the target is 90 % of
//! its test accuracy (or an MSE within 1/0.9 of it). A run that does not
//! reach the target counts as `finetune_steps` (a lower bound), and the
//! share that reached it is reported.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use tch::{Device, Tensor};

use super::baselines::MetaConfig;
use super::finetune::FinetuneConfig;
use super::learner::{self, Examples};
use crate::diffusion::SamplerKind;
use crate::serve::generate_init::DEFAULT_DDIM_STEPS;
use crate::tasks::train::{Objective, TaskData};
use crate::tasks::{Descriptor, Family, HeldOutSplit, TaskSpec};
use crate::train::quality::EVAL_DDIM_STEPS;
use crate::zoo::ZooDataset;

/// A held-out task: its spec, its examples and its descriptor.
pub type HeldOutTask = (TaskSpec, Examples, Descriptor);

/// The proposal's fine-tuning learning rate.
pub const PROPOSAL_FINETUNE_LR: f64 = 1e-4;

/// Batch size of the hypernetwork baseline's regression.
pub const HYPERNETWORK_BATCH: i64 = 64;

/// Adam learning rate of the hypernetwork baseline's regression.
pub const HYPERNETWORK_LR: f64 = 1e-3;

/// What the harness runs.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalConfig {
    /// Held-out tasks scored.
    pub tasks: usize,
    /// Seeds per task (sampling seeds and random-init seeds).
    pub seeds: usize,
    /// Held-out tasks (another draw) that choose the learning rate.
    pub validation_tasks: usize,
    /// Learning rates tried for random init.
    pub lr_grid: Vec<f64>,
    /// Fine-tuning budget in Adam steps (full batch; minibatches of words
    /// for adapters).
    pub finetune_steps: usize,
    /// Steps between measurements of the test metric while fine-tuning
    /// adapters (a words task's test set costs a forward pass of the base
    /// over thousands of words; networks that run alone are measured after
    /// every step).
    pub eval_every: usize,
    /// Steps that train random init "fully" (the reference).
    pub full_steps: usize,
    /// Support-set sizes K of the few-shot runs.
    pub few_shot: Vec<usize>,
    /// Fine-tuning steps of a few-shot run.
    pub few_shot_steps: usize,
    /// Guidance scale of the guided weightgen rows.
    pub guidance: f64,
    /// The sampler of weightgen's DDIM rows (the DDPM rows stay DDPM).
    pub sampler: EvalSampler,
    /// σ of the noise-added baseline, per weight, as a multiple of the
    /// zoo's per-weight standard deviation.
    pub noise_scale: f64,
    /// Reptile and first-order MAML training.
    pub meta: MetaConfig,
    /// Adam steps of the hypernetwork (batch [`HYPERNETWORK_BATCH`], lr
    /// [`HYPERNETWORK_LR`]).
    pub hypernetwork_steps: usize,
    /// Seed of task draws and everything else.
    pub seed: u64,
    /// Which held-out tasks are drawn (test and validation alike).
    pub split: HeldOutSplit,
    /// Evaluate only these methods (random init always runs: it is the
    /// yardstick); None = every method.
    pub only: Option<Vec<Method>>,
}

impl EvalConfig {
    /// The full profile.
    pub fn full() -> Self {
        Self {
            tasks: 20,
            seeds: 3,
            validation_tasks: 5,
            lr_grid: vec![1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
            finetune_steps: 500,
            eval_every: 1,
            full_steps: 2000,
            few_shot: vec![10, 100],
            few_shot_steps: 100,
            guidance: 3.0,
            sampler: EvalSampler::Ddim50,
            noise_scale: 0.1,
            meta: MetaConfig {
                meta_steps: 2000,
                inner_steps: 5,
                inner_lr: 0.05,
                outer_lr: 1.0,
                fomaml_lr: 0.01,
                batch_size: 0,
            },
            hypernetwork_steps: 3000,
            seed: 0,
            split: HeldOutSplit::Interpolation,
            only: None,
        }
    }

    /// A profile that checks the harness end to end in minutes (CI).
    pub fn quick() -> Self {
        Self {
            tasks: 3,
            seeds: 1,
            validation_tasks: 2,
            lr_grid: vec![1e-3, 1e-2],
            finetune_steps: 40,
            eval_every: 1,
            full_steps: 80,
            few_shot: vec![10, 100],
            few_shot_steps: 20,
            guidance: 3.0,
            sampler: EvalSampler::Ddim50,
            noise_scale: 0.1,
            meta: MetaConfig {
                meta_steps: 30,
                inner_steps: 5,
                inner_lr: 0.05,
                outer_lr: 1.0,
                fomaml_lr: 0.01,
                batch_size: 0,
            },
            hypernetwork_steps: 100,
            seed: 0,
            split: HeldOutSplit::Interpolation,
            only: None,
        }
    }
}

impl EvalConfig {
    /// The full or the quick profile as `family` runs it. A `words`
    /// adapter step costs a pass of the base over 64 words and a
    /// measurement a pass over the task's test words, so its runs are
    /// shorter (200 fine-tuning steps measured every 20, 1,000 to train
    /// fully — a zoo adapter trains 100), its learning rates larger
    /// (adapters start at B = 0) and its few-shot runs 50 steps; other
    /// families keep the profile.
    pub fn profile(quick: bool, family: Family) -> Self {
        let base = if quick { Self::quick() } else { Self::full() };
        if family != Family::Words {
            return base;
        }
        let pick = |full: usize, quick_value: usize| if quick { quick_value } else { full };
        Self {
            lr_grid: if quick {
                vec![3e-3, 1e-2]
            } else {
                vec![1e-3, 3e-3, 1e-2, 3e-2]
            },
            finetune_steps: pick(200, 20),
            eval_every: pick(20, 10),
            full_steps: pick(1000, 40),
            few_shot_steps: pick(50, 10),
            meta: MetaConfig {
                meta_steps: pick(300, 10),
                ..base.meta
            },
            ..base
        }
    }
}

/// The sampler of weightgen's rows other than DDPM (`eval --sampler`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum EvalSampler {
    /// DDIM with 50 steps (η = 0), the reports' sampler so far.
    #[default]
    #[value(name = "ddim-50")]
    Ddim50,
    /// DDIM with 10 steps (η = 0): the sampler serving recommends for a
    /// guided digits denoiser (`diffusion::recommended`), so the rows
    /// measure what a request that leaves the sampler unset gets.
    #[value(name = "ddim-10")]
    Ddim10,
    /// One DPM-Solver++ step from t = T: the denoiser's x̂₀ of pure noise,
    /// its estimate of the conditional mean (what `GenerateInit` returns for
    /// `SAMPLER_DPM_SOLVER` with one step). Meant for v-prediction denoisers.
    OneStep,
}

impl EvalSampler {
    /// The sampler.
    pub fn kind(self) -> SamplerKind {
        match self {
            Self::Ddim50 => SamplerKind::ddim(EVAL_DDIM_STEPS, 0.0),
            Self::Ddim10 => SamplerKind::ddim(DEFAULT_DDIM_STEPS, 0.0),
            Self::OneStep => SamplerKind::DpmSolver { steps: 1 },
        }
    }

    /// Denoiser calls per sample (without guidance).
    pub fn steps(self) -> usize {
        match self {
            Self::Ddim50 => EVAL_DDIM_STEPS,
            Self::Ddim10 => DEFAULT_DDIM_STEPS,
            Self::OneStep => 1,
        }
    }

    /// Its name in row labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim50 => "DDIM-50",
            Self::Ddim10 => "DDIM-10",
            Self::OneStep => "one-step x̂₀",
        }
    }
}

/// Where an init comes from. On the command line (`eval --methods`) by its
/// variant name in kebab case: `weightgen-features-only`, `hypernetwork`, ….
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Method {
    /// weightgen, the configured sampler (DDIM-50 unless `--sampler`),
    /// guidance 1, conditioned on the task metadata.
    WeightgenDdim,
    /// weightgen, the configured sampler and guidance.
    WeightgenDdimGuided,
    /// weightgen, DDPM with all T steps, guidance 1.
    WeightgenDdpm,
    /// weightgen, DDPM with all T steps, configured guidance.
    WeightgenDdpmGuided,
    /// weightgen, the configured sampler and guidance, conditioned on the
    /// smallest few-shot support set alone (no task metadata): exactly what
    /// Reptile and MAML see.
    WeightgenSupportOnly,
    /// weightgen, the configured sampler and guidance, conditioned on the
    /// task features alone (no support set): what a client with no
    /// examples sends (the README's `generate --feature` example).
    WeightgenFeaturesOnly,
    /// The control: weightgen, the configured sampler and guidance,
    /// conditioned on another held-out task's descriptor (features and
    /// support set). Scoring near the true descriptor means the condition
    /// is not used.
    WeightgenWrongTask,
    /// The network's PyTorch-default initialization.
    Random,
    /// The zoo model whose task features are nearest (retrieval).
    NearestZoo,
    /// That model plus Gaussian noise.
    NearestZooNoise,
    /// That model plus Gaussian noise whose size puts it as far from the
    /// zoo as weightgen's DDPM sample for the same run (Zeng et al.).
    NearestZooNoiseMatched,
    /// The mean of the (aligned) zoo.
    ZooAverage,
    /// Reptile's meta-learned init (one for every task).
    Reptile,
    /// First-order MAML's meta-learned init.
    Fomaml,
    /// A deterministic regression from the task to the weights.
    Hypernetwork,
}

impl Method {
    /// Every method, in report order.
    pub const ALL: [Method; 15] = [
        Method::WeightgenDdim,
        Method::WeightgenDdimGuided,
        Method::WeightgenDdpm,
        Method::WeightgenDdpmGuided,
        Method::WeightgenSupportOnly,
        Method::WeightgenFeaturesOnly,
        Method::WeightgenWrongTask,
        Method::Random,
        Method::NearestZoo,
        Method::NearestZooNoise,
        Method::NearestZooNoiseMatched,
        Method::ZooAverage,
        Method::Reptile,
        Method::Fomaml,
        Method::Hypernetwork,
    ];

    /// Its row label under `config` (sampler and guidance).
    pub fn label(self, config: &EvalConfig) -> String {
        let (guidance, sampler) = (config.guidance, config.sampler.name());
        match self {
            Self::WeightgenDdim => format!("weightgen {sampler}"),
            Self::WeightgenDdimGuided => format!("weightgen {sampler}, guidance {guidance}"),
            Self::WeightgenDdpm => "weightgen DDPM-1000".into(),
            Self::WeightgenDdpmGuided => format!("weightgen DDPM-1000, guidance {guidance}"),
            Self::WeightgenSupportOnly => {
                format!("weightgen {sampler}, guidance {guidance}, support set only")
            }
            Self::WeightgenFeaturesOnly => {
                format!("weightgen {sampler}, guidance {guidance}, features only")
            }
            Self::WeightgenWrongTask => {
                format!(
                    "control: weightgen {sampler}, guidance {guidance}, another task's descriptor"
                )
            }
            Self::Random => "random init (PyTorch default)".into(),
            Self::NearestZoo => "nearest zoo model (by descriptor)".into(),
            Self::NearestZooNoise => "nearest zoo model + noise".into(),
            Self::NearestZooNoiseMatched => {
                "nearest zoo model + noise as far as weightgen's sample".into()
            }
            Self::ZooAverage => "average of the zoo".into(),
            Self::Reptile => "Reptile (meta-learned on the zoo tasks)".into(),
            Self::Fomaml => "first-order MAML (meta-learned on the zoo tasks)".into(),
            Self::Hypernetwork => "hypernetwork (task → weights regression)".into(),
        }
    }

    /// Whether it is one of weightgen's.
    pub fn is_generated(self) -> bool {
        matches!(
            self,
            Self::WeightgenDdim
                | Self::WeightgenDdimGuided
                | Self::WeightgenDdpm
                | Self::WeightgenDdpmGuided
                | Self::WeightgenSupportOnly
                | Self::WeightgenFeaturesOnly
                | Self::WeightgenWrongTask
        )
    }
}

/// The first `k` training examples of `data` in a seeded shuffled order.
pub(super) fn few_shot_data(data: &TaskData, k: usize, seed: u64) -> TaskData {
    let n = data.train_x.size()[0] as usize;
    let mut order: Vec<i64> = (0..n as i64).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    order.truncate(k.min(n));
    let index = Tensor::from_slice(&order);
    TaskData {
        train_x: data.train_x.index_select(0, &index),
        train_y: data.train_y.index_select(0, &index),
        test_x: data.test_x.shallow_clone(),
        test_y: data.test_y.shallow_clone(),
    }
}

pub(super) fn better(objective: Objective, a: f64, b: f64) -> bool {
    match objective.lower_is_better() {
        false => a > b,
        true => a < b,
    }
}

/// The learning rate whose random-init runs score best on `tasks` after
/// `steps`, and every rate's mean score.
pub(super) fn choose_lr(
    data: &ZooDataset,
    tasks: &[HeldOutTask],
    config: &EvalConfig,
) -> Result<(f64, Vec<(f64, f64)>), tch::TchError> {
    let objective = data.family.objective();
    let mut scores = Vec::new();
    for &lr in &config.lr_grid {
        let mut total = 0.0;
        for (i, (_, examples, _)) in tasks.iter().enumerate() {
            let init = data
                .network
                .init(config.seed ^ (0xA11 + i as u64), Device::Cpu);
            let c = learner::curve(
                data,
                &init,
                examples,
                &FinetuneConfig {
                    steps: config.finetune_steps,
                    learning_rate: lr,
                },
                config.finetune_steps,
            )?;
            total += c.last().copied().unwrap_or(f64::NAN);
        }
        scores.push((lr, total / tasks.len().max(1) as f64));
    }
    let best = scores
        .iter()
        .copied()
        .reduce(|a, b| if better(objective, b.1, a.1) { b } else { a })
        .map_or(PROPOSAL_FINETUNE_LR, |(lr, _)| lr);
    Ok((best, scores))
}

/// The validation tasks: held-out tasks of another seed, on which random
/// init's learning rate and the hypernetwork's encoder are chosen.
pub(super) fn validation_tasks(data: &ZooDataset, config: &EvalConfig) -> Vec<HeldOutTask> {
    held_out(
        data,
        config.validation_tasks,
        config.seed ^ 0x5EED,
        config.split,
    )
}

pub(super) fn held_out(
    data: &ZooDataset,
    count: usize,
    seed: u64,
    split: HeldOutSplit,
) -> Vec<HeldOutTask> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .filter_map(|_| {
            let task = data.family.sample_held_out(&mut rng, split);
            let examples = Examples::of(data, &task)?;
            let descriptor = examples.describe(data, &task)?;
            Some((task, examples, descriptor))
        })
        .collect()
}
