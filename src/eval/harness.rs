//! The evaluation harness: inits from weightgen and from baselines on
//! held-out tasks no zoo model saw, fine-tuned under one protocol, with
//! means and 95 % intervals over tasks × seeds, and the novelty of the
//! generated weights against the zoo.
//!
//! Protocol. The learning rate for fine-tuning is chosen for *random
//! init* on separate validation tasks (held-out tasks, other seed) from
//! `lr_grid`, by the best mean test score after `finetune_steps`; every
//! method is then fine-tuned at that rate and at the proposal's 1e-4.
//! "Fully trained" is random init after `full_steps` at the chosen rate;
//! the target is 90 % of its test accuracy (or an MSE within 1/0.9 of it).
//! A run that does not reach the target counts as `finetune_steps` (a lower
//! bound), and the share that reached it is reported.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use tch::{Device, Kind, Tensor};

use super::baselines::{Hypernetwork, MetaConfig, fomaml, reptile};
use super::finetune::{
    DEFAULT_TARGET_FRACTION, FinetuneConfig, curve, steps_to_target, target_of, test_metric,
};
use super::novelty::{agreement, mean_pairwise_cosine, nearest_zoo};
use super::stats::MeanCi;
use crate::diffusion::SamplerKind;
use crate::model::{DenoiserCheckpoint, TaskBatch};
use crate::tasks::featurizer::describe;
use crate::tasks::featurizer::support_descriptor;
use crate::tasks::train::{Objective, TaskData};
use crate::tasks::{Descriptor, HeldOutSplit, TaskSpec};
use crate::train::dataset::ZooDataset;
use crate::train::quality::{
    EVAL_DDIM_STEPS, asked_features, condition_of, nearest_by_features, one_input,
    support_condition, wrong_tasks,
};
use crate::weights::unflatten;

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
    /// Fine-tuning budget in full-batch Adam steps.
    pub finetune_steps: usize,
    /// Steps that train random init "fully" (the reference).
    pub full_steps: usize,
    /// Support-set sizes K of the few-shot runs.
    pub few_shot: Vec<usize>,
    /// Fine-tuning steps of a few-shot run.
    pub few_shot_steps: usize,
    /// Guidance scale of the guided weightgen rows.
    pub guidance: f64,
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
            full_steps: 2000,
            few_shot: vec![10, 100],
            few_shot_steps: 100,
            guidance: 3.0,
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
            full_steps: 80,
            few_shot: vec![10, 100],
            few_shot_steps: 20,
            guidance: 3.0,
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

/// Where an init comes from. On the command line (`eval --methods`) by its
/// variant name in kebab case: `weightgen-features-only`, `hypernetwork`, ….
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Method {
    /// weightgen, DDIM-50, guidance 1, conditioned on the task metadata.
    WeightgenDdim,
    /// weightgen, DDIM-50 with the configured guidance.
    WeightgenDdimGuided,
    /// weightgen, DDPM with all T steps, guidance 1.
    WeightgenDdpm,
    /// weightgen, DDPM with all T steps, configured guidance.
    WeightgenDdpmGuided,
    /// weightgen, DDIM-50 with the configured guidance, conditioned on the
    /// smallest few-shot support set alone (no task metadata): exactly what
    /// Reptile and MAML see.
    WeightgenSupportOnly,
    /// weightgen, DDIM-50 with the configured guidance, conditioned on the
    /// task features alone (no support set): what a client with no
    /// examples sends (the README's `generate --feature` example).
    WeightgenFeaturesOnly,
    /// The control: weightgen, DDIM-50 with the configured guidance,
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

    /// Its row label.
    pub fn label(self, guidance: f64) -> String {
        match self {
            Self::WeightgenDdim => "weightgen DDIM-50".into(),
            Self::WeightgenDdimGuided => format!("weightgen DDIM-50, guidance {guidance}"),
            Self::WeightgenDdpm => "weightgen DDPM-1000".into(),
            Self::WeightgenDdpmGuided => format!("weightgen DDPM-1000, guidance {guidance}"),
            Self::WeightgenSupportOnly => {
                format!("weightgen DDIM-50, guidance {guidance}, support set only")
            }
            Self::WeightgenFeaturesOnly => {
                format!("weightgen DDIM-50, guidance {guidance}, features only")
            }
            Self::WeightgenWrongTask => {
                format!(
                    "control: weightgen DDIM-50, guidance {guidance}, another task's descriptor"
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

/// One method's figures over tasks × seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodScores {
    /// Test score before fine-tuning.
    pub zero_shot: MeanCi,
    /// Steps to target at the proposal's learning rate.
    pub steps_proposal_lr: MeanCi,
    /// Share of runs that reached it.
    pub reached_proposal_lr: f64,
    /// Speed-up over random init (geometric mean of per-run ratios of
    /// steps + 1) at the proposal's rate.
    pub speedup_proposal_lr: MeanCi,
    /// Steps to target at the chosen learning rate.
    pub steps_best_lr: MeanCi,
    /// Share of runs that reached it.
    pub reached_best_lr: f64,
    /// Speed-up over random init at the chosen rate.
    pub speedup_best_lr: MeanCi,
    /// Compute to reach the target at the chosen rate, sampling included:
    /// random init's total FLOPs ÷ this method's over all runs (2 per
    /// weight per row for every dense forward pass, 3× that for a training
    /// step). A ratio of totals, so a stored init that needs no step does
    /// not make it infinite.
    pub compute_ratio_best_lr: f64,
    /// Wall time to produce one init (sampling; 0 for stored ones).
    pub init_seconds: f64,
    /// Test score after few-shot fine-tuning, per K.
    pub few_shot: BTreeMap<usize, MeanCi>,
    /// Novelty, for generated and retrieved inits.
    pub novelty: Option<Novelty>,
}

/// How close a method's inits are to the zoo.
#[derive(Debug, Clone, PartialEq)]
pub struct Novelty {
    /// Centered cosine similarity to the nearest zoo model.
    pub cosine_to_nearest: MeanCi,
    /// L2 distance to it.
    pub l2_to_nearest: MeanCi,
    /// Share of test inputs where its prediction equals the nearest zoo
    /// model's (classification).
    pub agreement_with_nearest: MeanCi,
    /// Mean centered cosine similarity between its inits (diversity).
    pub pairwise_cosine: f64,
}

/// Everything the harness measured.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    /// "accuracy" or "MSE".
    pub metric: &'static str,
    /// Classification or regression.
    pub objective: Objective,
    /// The learning rate chosen for random init, and the grid's scores.
    pub chosen_lr: f64,
    /// Mean validation score per learning rate.
    pub lr_scores: Vec<(f64, f64)>,
    /// Fully trained reference score (mean over tasks).
    pub fully_trained: MeanCi,
    /// Per method.
    pub methods: BTreeMap<Method, MethodScores>,
    /// Nearest-neighbour statistics between zoo models (the yardstick for
    /// novelty): centered cosine and L2.
    pub zoo_to_zoo_cosine: MeanCi,
    /// L2 between zoo models and their nearest other zoo model.
    pub zoo_to_zoo_l2: MeanCi,
    /// What the held-out tasks are (the family's split, in words).
    pub held_out: &'static str,
    /// Held-out tasks, seeds.
    pub tasks: usize,
    /// Seeds per task.
    pub seeds: usize,
    /// Mean test score per fine-tuning step at the chosen rate, per method.
    pub curves: BTreeMap<Method, Vec<f64>>,
    /// Steps to target at the chosen rate, per run and method.
    pub steps_runs: BTreeMap<Method, Vec<f64>>,
    /// Cosine to the nearest zoo model, per init, for the methods with a
    /// novelty row.
    pub cosine_runs: BTreeMap<Method, Vec<f64>>,
    /// Cosine of zoo models to their nearest other zoo model.
    pub zoo_to_zoo_cosines: Vec<f64>,
    /// Noise σ of the matched noise baseline, as a multiple of the zoo's
    /// per-weight standard deviation.
    pub matched_noise_scale: MeanCi,
    /// Support examples K the support-only rows were conditioned on.
    pub support_only_k: Option<usize>,
    /// The hypernetwork's encoder variant, chosen on the validation tasks
    /// (None when the hypernetwork was not evaluated or the denoiser's
    /// encoder has no label-prototype branch to leave out).
    pub hypernetwork_choice: Option<HypernetworkChoice>,
}

/// Which encoder the hypernetwork baseline used, chosen like random
/// init's learning rate: on the validation tasks, never the held-out ones.
#[derive(Debug, Clone, PartialEq)]
pub struct HypernetworkChoice {
    /// Whether the chosen encoder has the label-prototype branch.
    pub prototypes: bool,
    /// Mean zero-shot validation score per variant (prototypes on/off).
    pub validation: Vec<(bool, f64)>,
}

fn params(data: &ZooDataset, flat: &Tensor) -> Vec<Tensor> {
    unflatten(&data.network.spec, flat)
        .map(|named| named.into_iter().map(|(_, t)| t).collect())
        .unwrap_or_default()
}

fn flat_of(params: &[Tensor]) -> Tensor {
    Tensor::cat(
        &params.iter().map(|p| p.flatten(0, -1)).collect::<Vec<_>>(),
        0,
    )
}

/// The first `k` training examples of `data` in a seeded shuffled order.
fn few_shot_data(data: &TaskData, k: usize, seed: u64) -> TaskData {
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

fn better(objective: Objective, a: f64, b: f64) -> bool {
    match objective {
        Objective::Classification => a > b,
        Objective::Regression => a < b,
    }
}

/// The learning rate whose random-init runs score best on `tasks` after
/// `steps`, and every rate's mean score.
fn choose_lr(
    data: &ZooDataset,
    tasks: &[(TaskSpec, TaskData, Descriptor)],
    config: &EvalConfig,
) -> Result<(f64, Vec<(f64, f64)>), tch::TchError> {
    let objective = data.family.objective();
    let mut scores = Vec::new();
    for &lr in &config.lr_grid {
        let mut total = 0.0;
        for (i, (_, task_data, _)) in tasks.iter().enumerate() {
            let init = data
                .network
                .init(config.seed ^ (0xA11 + i as u64), Device::Cpu);
            let c = curve(
                &data.network,
                &init,
                task_data,
                objective,
                &FinetuneConfig {
                    steps: config.finetune_steps,
                    learning_rate: lr,
                },
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

/// Trains the hypernetwork once per encoder variant with `config.seed` and
/// keeps the variant with the best mean zero-shot score on `validation`
/// (the trained model comes back too: it is the first seed's).
fn choose_hypernetwork(
    checkpoint: &DenoiserCheckpoint,
    data: &ZooDataset,
    validation: &[(TaskSpec, TaskData, Descriptor)],
    config: &EvalConfig,
) -> Result<(HypernetworkChoice, Hypernetwork), tch::TchError> {
    let objective = data.family.objective();
    let descriptors: Vec<Descriptor> = validation.iter().map(|(_, _, d)| d.clone()).collect();
    let condition = condition_of(checkpoint, data, &descriptors);
    let mut scores = Vec::new();
    let mut best: Option<(f64, bool, Hypernetwork)> = None;
    for prototypes in Hypernetwork::encoder_variants(checkpoint) {
        let hypernetwork = train_hypernetwork(checkpoint, data, config, config.seed, prototypes)?;
        let weights = hypernetwork.predict(checkpoint, &condition, descriptors.len() as i64);
        let total: f64 = validation
            .iter()
            .enumerate()
            .map(|(i, (_, task_data, _))| {
                let init = params(data, &weights.get(i as i64));
                test_metric(&data.network, &init, task_data, objective)
            })
            .sum();
        let score = total / validation.len().max(1) as f64;
        scores.push((prototypes, score));
        if best
            .as_ref()
            .is_none_or(|(top, _, _)| better(objective, score, *top))
        {
            best = Some((score, prototypes, hypernetwork));
        }
    }
    let (_, prototypes, hypernetwork) = best.expect("at least one encoder variant");
    tracing::info!(prototypes, ?scores, "hypernetwork encoder");
    Ok((
        HypernetworkChoice {
            prototypes,
            validation: scores,
        },
        hypernetwork,
    ))
}

fn train_hypernetwork(
    checkpoint: &DenoiserCheckpoint,
    data: &ZooDataset,
    config: &EvalConfig,
    seed: u64,
    prototypes: bool,
) -> Result<Hypernetwork, tch::TchError> {
    Hypernetwork::train(
        checkpoint,
        data,
        config.hypernetwork_steps,
        HYPERNETWORK_BATCH,
        HYPERNETWORK_LR,
        seed,
        prototypes,
    )
}

/// The validation tasks: held-out tasks of another seed, on which random
/// init's learning rate and the hypernetwork's encoder are chosen.
fn validation_tasks(
    data: &ZooDataset,
    config: &EvalConfig,
) -> Vec<(TaskSpec, TaskData, Descriptor)> {
    held_out(
        data,
        config.validation_tasks,
        config.seed ^ 0x5EED,
        config.split,
    )
}

fn held_out(
    data: &ZooDataset,
    count: usize,
    seed: u64,
    split: HeldOutSplit,
) -> Vec<(TaskSpec, TaskData, Descriptor)> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .filter_map(|_| {
            let task = data.family.sample_held_out(&mut rng, split);
            let task_data = data.family.data(&task, Device::Cpu).ok()?;
            let descriptor = describe(data.family, &task, &task_data);
            Some((task, task_data, descriptor))
        })
        .collect()
}

/// Per-run figures before aggregation.
#[derive(Default)]
struct Runs {
    zero_shot: Vec<f64>,
    steps_proposal: Vec<f64>,
    reached_proposal: Vec<f64>,
    steps_best: Vec<f64>,
    reached_best: Vec<f64>,
    few_shot: BTreeMap<usize, Vec<f64>>,
    cosine: Vec<f64>,
    l2: Vec<f64>,
    agreement: Vec<f64>,
    inits: Vec<Tensor>,
    curve_sum: Vec<f64>,
    curves: usize,
    flops_best: Vec<f64>,
    init_seconds: Vec<f64>,
}

/// Random init's fine-tuning on one held-out run (task × seed).
#[derive(Debug, Clone)]
struct RandomRun {
    /// The fully trained reference's final score.
    full: f64,
    /// Curves at the proposal's and at the chosen learning rate.
    at_proposal: Vec<f64>,
    at_best: Vec<f64>,
    /// Final score after few-shot fine-tuning, per K in config order.
    few_shot: Vec<f64>,
}

/// What random init measures on a zoo's held-out tasks under one
/// configuration: the learning rate chosen for it, the fully trained
/// references and its own fine-tuning runs. They do not depend on the
/// denoiser, so evaluating several denoisers on one zoo (an ablation)
/// computes them once; see [`evaluate_with`]. Reused only for the same zoo
/// and configuration (`only` aside), recomputed otherwise.
#[derive(Debug, Default)]
pub struct Yardstick {
    /// The zoo and configuration the figures belong to.
    key: Option<(String, EvalConfig)>,
    lr: Option<(f64, Vec<(f64, f64)>)>,
    runs: BTreeMap<(u64, usize), RandomRun>,
}

impl Yardstick {
    /// Forgets everything measured for another zoo or configuration.
    fn keep_only_for(&mut self, data: &ZooDataset, config: &EvalConfig) {
        let zoo = format!(
            "{}:{}:{}",
            data.family.name(),
            data.network.spec.name,
            data.len()
        );
        let config = EvalConfig {
            only: None,
            ..config.clone()
        };
        let key = Some((zoo, config));
        if self.key != key {
            *self = Self {
                key,
                ..Self::default()
            };
        }
    }
}

/// Runs the harness for `checkpoint` on the zoo `data`.
pub fn evaluate(
    checkpoint: &DenoiserCheckpoint,
    data: &ZooDataset,
    config: &EvalConfig,
) -> Result<EvalReport, tch::TchError> {
    evaluate_with(checkpoint, data, config, &mut Yardstick::default())
}

/// [`evaluate`], taking random init's figures (learning rate, references,
/// its own runs) from `yardstick` where it has them and storing those it
/// measures: the same figures as a fresh evaluation, without redoing them
/// for every denoiser on one zoo.
pub fn evaluate_with(
    checkpoint: &DenoiserCheckpoint,
    data: &ZooDataset,
    config: &EvalConfig,
    yardstick: &mut Yardstick,
) -> Result<EvalReport, tch::TchError> {
    let objective = data.family.objective();
    let net = &data.network;
    yardstick.keep_only_for(data, config);
    // Drawn only when something is chosen on them (not for an ablation row
    // whose learning rate the yardstick already has).
    let mut validation = None;
    let (chosen_lr, lr_scores) = match &yardstick.lr {
        Some(chosen) => chosen.clone(),
        None => {
            let tasks = validation.get_or_insert_with(|| validation_tasks(data, config));
            let chosen = choose_lr(data, tasks, config)?;
            yardstick.lr = Some(chosen.clone());
            chosen
        }
    };
    tracing::info!(chosen_lr, ?lr_scores, "learning rate for random init");
    let tasks = held_out(data, config.tasks, config.seed, config.split);
    let all_rows: Vec<i64> = (0..data.len() as i64).collect();
    let zoo_weights = data.weights.to_kind(Kind::Float);
    let center = zoo_weights.mean_dim(0, false, Kind::Float);
    let zoo_std = zoo_weights.std_dim(0, false, false);
    let descriptors: Vec<Descriptor> = tasks.iter().map(|(_, _, d)| d.clone()).collect();
    let condition = condition_of(checkpoint, data, &descriptors);
    let features_only = one_input(&condition, true);
    let wrong_task = condition_of(checkpoint, data, &wrong_tasks(&descriptors));
    let asked = asked_features(checkpoint, data, &condition, &descriptors);
    let nearest_rows = nearest_by_features(checkpoint, data, &all_rows, &asked);
    // The support-only rows need a denoiser whose encoder reads support sets.
    let support_only_k = (checkpoint.model.config().encoder.support_x_dim > 0)
        .then(|| config.few_shot.iter().copied().min())
        .flatten();
    let asked = |m: &Method| {
        *m == Method::Random || config.only.as_ref().is_none_or(|only| only.contains(m))
    };
    let methods: Vec<Method> = Method::ALL
        .into_iter()
        .filter(|m| asked(m))
        .filter(|m| *m != Method::WeightgenSupportOnly || support_only_k.is_some())
        // Features only differs from the main rows where they carry a support set.
        .filter(|m| *m != Method::WeightgenFeaturesOnly || condition.support_x.is_some())
        // The matched noise is solved against the DDPM sample.
        .filter(|m| *m != Method::NearestZooNoiseMatched || asked(&Method::WeightgenDdpmGuided))
        .collect();
    let wanted = |m: Method| methods.contains(&m);
    // With a single encoder variant there is nothing to choose.
    let choose = Hypernetwork::encoder_variants(checkpoint).len() > 1;
    let (hypernetwork_choice, mut chosen_hypernetwork) = if wanted(Method::Hypernetwork) && choose {
        let tasks = validation.get_or_insert_with(|| validation_tasks(data, config));
        let (choice, first) = choose_hypernetwork(checkpoint, data, tasks, config)?;
        (Some(choice), Some(first))
    } else {
        (None, None)
    };
    let zoo_std_norm = zoo_std.square().sum(Kind::Double).sqrt().double_value(&[]);
    let mut matched_scales = Vec::new();

    let net_params = data.weights.size()[1] as f64;
    let denoiser_params: f64 = checkpoint
        .model
        .vs
        .variables()
        .values()
        .map(|t| t.numel() as f64)
        .sum();
    let timesteps = checkpoint.model.schedule().timesteps() as f64;
    // One reverse step: a dense forward of the denoiser per row, twice with
    // guidance (conditional and unconditional).
    let sampling_flops = |method: Method, guidance: f64| {
        let forward = 2.0 * denoiser_params;
        let guided = if guidance == 1.0 { 1.0 } else { 2.0 };
        match method {
            Method::WeightgenDdim => forward * EVAL_DDIM_STEPS as f64,
            Method::WeightgenDdimGuided => forward * guided * EVAL_DDIM_STEPS as f64,
            Method::WeightgenDdpm => forward * timesteps,
            Method::WeightgenDdpmGuided => forward * guided * timesteps,
            Method::WeightgenSupportOnly
            | Method::WeightgenFeaturesOnly
            | Method::WeightgenWrongTask => forward * guided * EVAL_DDIM_STEPS as f64,
            _ => 0.0,
        }
    };
    let mut runs: BTreeMap<Method, Runs> = methods.iter().map(|&m| (m, Runs::default())).collect();
    let mut fully_trained = Vec::new();
    for seed_index in 0..config.seeds as u64 {
        let seed = config.seed.wrapping_add(seed_index * 1_000_003);
        let seeds: Vec<u64> = (0..tasks.len() as u64)
            .map(|i| seed.wrapping_add(i))
            .collect();
        let ddim = SamplerKind::ddim(EVAL_DDIM_STEPS, 0.0);
        let mut sampling_seconds = BTreeMap::new();
        // Support-only: each task's K examples of this seed's few-shot
        // draw (the same examples the few-shot runs fine-tune on).
        let support_only = support_only_k
            .filter(|_| wanted(Method::WeightgenSupportOnly))
            .map(|k| {
                let descriptors: Vec<Descriptor> = tasks
                    .iter()
                    .zip(&seeds)
                    .map(|((_, d, _), &s)| support_descriptor(data.family, &few_shot_data(d, k, s)))
                    .collect();
                support_condition(checkpoint, data, &descriptors)
            });
        let mut generated = |method, condition: &TaskBatch, kind, guidance| {
            let began = std::time::Instant::now();
            let w = checkpoint
                .generate(condition, &seeds, kind, guidance)
                .to_device(Device::Cpu)
                .to_kind(Kind::Float);
            sampling_seconds.insert(
                method,
                began.elapsed().as_secs_f64() / seeds.len().max(1) as f64,
            );
            (method, w)
        };
        let mut samples: BTreeMap<Method, Tensor> = BTreeMap::new();
        let mut to_sample: Vec<(Method, &TaskBatch, SamplerKind, f64)> = vec![
            (Method::WeightgenDdim, &condition, ddim, 1.0),
            (
                Method::WeightgenDdimGuided,
                &condition,
                ddim,
                config.guidance,
            ),
            (Method::WeightgenDdpm, &condition, SamplerKind::Ddpm, 1.0),
            (
                Method::WeightgenDdpmGuided,
                &condition,
                SamplerKind::Ddpm,
                config.guidance,
            ),
            (
                Method::WeightgenFeaturesOnly,
                &features_only,
                ddim,
                config.guidance,
            ),
            (
                Method::WeightgenWrongTask,
                &wrong_task,
                ddim,
                config.guidance,
            ),
        ];
        if let Some(support_only) = &support_only {
            to_sample.push((
                Method::WeightgenSupportOnly,
                support_only,
                ddim,
                config.guidance,
            ));
        }
        for (method, condition, kind, guidance) in to_sample {
            if wanted(method) {
                let (method, w) = generated(method, condition, kind, guidance);
                samples.insert(method, w);
            }
        }
        let reptile_init = wanted(Method::Reptile).then(|| reptile(data, &config.meta, seed));
        let fomaml_init = wanted(Method::Fomaml).then(|| fomaml(data, &config.meta, seed));
        let hypernetwork = if wanted(Method::Hypernetwork) {
            let prototypes = hypernetwork_choice.as_ref().is_some_and(|c| c.prototypes);
            let trained = match chosen_hypernetwork.take().filter(|_| seed == config.seed) {
                Some(first) => first,
                None => train_hypernetwork(checkpoint, data, config, seed, prototypes)?,
            };
            Some(trained.predict(checkpoint, &condition, tasks.len() as i64))
        } else {
            None
        };
        for (t, (_, task_data, _)) in tasks.iter().enumerate() {
            let run_seed = seeds[t];
            // A full-batch training step: forward + backward ≈ 3 forwards.
            let step_flops = 3.0 * 2.0 * net_params * task_data.train_x.size()[0] as f64;
            let random = net.init(run_seed, Device::Cpu);
            let measured = yardstick.runs.get(&(seed_index, t)).cloned();
            let full = match &measured {
                Some(m) => m.full,
                None => curve(
                    net,
                    &random,
                    task_data,
                    objective,
                    &FinetuneConfig {
                        steps: config.full_steps,
                        learning_rate: chosen_lr,
                    },
                )?
                .last()
                .copied()
                .unwrap_or(f64::NAN),
            };
            fully_trained.push(full);
            let target = target_of(objective, full, DEFAULT_TARGET_FRACTION);
            let nearest = data.weights.get(nearest_rows[t]).to_kind(Kind::Float);
            // Noise from this run's seed (torch's global generator).
            tch::manual_seed(run_seed as i64);
            let noise = Tensor::randn_like(&nearest) * &zoo_std;
            // σ for which E[cos(a, a + n)] = c, with a the centered nearest
            // model and c the DDPM sample's cosine to its nearest zoo model:
            // cos ≈ ‖a‖ / sqrt(‖a‖² + s²·Σσ_i²)  ⇒  s = ‖a‖·sqrt(1/c² − 1) / sqrt(Σσ_i²).
            let noise_matched = samples.get(&Method::WeightgenDdpmGuided).map(|ddpm| {
                let reference = ddpm.get(t as i64).unsqueeze(0);
                let c = nearest_zoo(&reference, &zoo_weights, &center, None)[0]
                    .cosine
                    .clamp(0.01, 0.999);
                let a_norm = (&nearest - &center).norm().double_value(&[]);
                let scale = a_norm * (1.0 / (c * c) - 1.0).sqrt() / zoo_std_norm.max(1e-12);
                matched_scales.push(scale);
                &noise * scale
            });
            let noise = &noise * config.noise_scale;
            // The same K examples for every method.
            let few_shot: Vec<(usize, TaskData)> = config
                .few_shot
                .iter()
                .map(|&k| (k, few_shot_data(task_data, k, run_seed)))
                .collect();
            for &method in &methods {
                let copy = |p: &Option<Vec<Tensor>>| -> Vec<Tensor> {
                    p.iter().flatten().map(Tensor::copy).collect()
                };
                let init: Vec<Tensor> = match method {
                    Method::Random => random.iter().map(Tensor::copy).collect(),
                    Method::NearestZoo => params(data, &nearest),
                    Method::NearestZooNoise => params(data, &(&nearest + &noise)),
                    Method::NearestZooNoiseMatched => match &noise_matched {
                        Some(n) => params(data, &(&nearest + n)),
                        None => continue,
                    },
                    Method::ZooAverage => params(data, &center),
                    Method::Reptile => copy(&reptile_init),
                    Method::Fomaml => copy(&fomaml_init),
                    Method::Hypernetwork => match &hypernetwork {
                        Some(h) => params(data, &h.get(t as i64)),
                        None => continue,
                    },
                    generated => match samples.get(&generated) {
                        Some(w) => params(data, &w.get(t as i64)),
                        None => continue,
                    },
                };
                let r = runs.get_mut(&method).expect("every method has runs");
                let run = |lr: f64, steps: usize, d: &TaskData| {
                    curve(
                        net,
                        &init,
                        d,
                        objective,
                        &FinetuneConfig {
                            steps,
                            learning_rate: lr,
                        },
                    )
                };
                // Random init's runs come from the yardstick when measured.
                let measured = measured.as_ref().filter(|_| method == Method::Random);
                let at_proposal = match measured {
                    Some(m) => m.at_proposal.clone(),
                    None => run(PROPOSAL_FINETUNE_LR, config.finetune_steps, task_data)?,
                };
                let at_best = match measured {
                    Some(m) => m.at_best.clone(),
                    None => run(chosen_lr, config.finetune_steps, task_data)?,
                };
                r.zero_shot.push(at_proposal[0]);
                if r.curve_sum.len() < at_best.len() {
                    r.curve_sum.resize(at_best.len(), 0.0);
                }
                for (sum, v) in r.curve_sum.iter_mut().zip(&at_best) {
                    *sum += v;
                }
                r.curves += 1;
                for (curve, steps, reached) in [
                    (&at_proposal, &mut r.steps_proposal, &mut r.reached_proposal),
                    (&at_best, &mut r.steps_best, &mut r.reached_best),
                ] {
                    let hit = steps_to_target(curve, objective, target);
                    steps.push(hit.unwrap_or(config.finetune_steps) as f64);
                    reached.push(if hit.is_some() { 1.0 } else { 0.0 });
                }
                let steps_taken = r.steps_best.last().copied().unwrap_or(f64::NAN);
                r.flops_best
                    .push(sampling_flops(method, config.guidance) + steps_taken * step_flops);
                r.init_seconds
                    .push(sampling_seconds.get(&method).copied().unwrap_or(0.0));
                let mut few_shot_scores = Vec::new();
                for (i, (k, few)) in few_shot.iter().enumerate() {
                    let score = match measured.and_then(|m| m.few_shot.get(i)) {
                        Some(&score) => score,
                        None => run(chosen_lr, config.few_shot_steps, few)?
                            .last()
                            .copied()
                            .unwrap_or(f64::NAN),
                    };
                    r.few_shot.entry(*k).or_default().push(score);
                    few_shot_scores.push(score);
                }
                if method == Method::Random && measured.is_none() {
                    yardstick.runs.insert(
                        (seed_index, t),
                        RandomRun {
                            full,
                            at_proposal: at_proposal.clone(),
                            at_best: at_best.clone(),
                            few_shot: few_shot_scores,
                        },
                    );
                }
                if method.is_generated()
                    || matches!(
                        method,
                        Method::NearestZooNoise
                            | Method::NearestZooNoiseMatched
                            | Method::Hypernetwork
                    )
                {
                    let flat = flat_of(&init);
                    let n = nearest_zoo(&flat.unsqueeze(0), &zoo_weights, &center, None)[0];
                    r.cosine.push(n.cosine);
                    r.l2.push(n.l2);
                    if objective == Objective::Classification {
                        let mine = net.forward(&init, &task_data.test_x);
                        let theirs =
                            net.forward(&params(data, &zoo_weights.get(n.row)), &task_data.test_x);
                        r.agreement.push(agreement(&mine, &theirs));
                    }
                    r.inits.push(flat);
                }
            }
        }
    }

    // Zoo-to-zoo: each of up to 200 zoo models against its nearest other.
    let sample: Vec<i64> = (0..data.len().min(200) as i64).collect();
    let own = nearest_zoo(
        &zoo_weights.index_select(0, &Tensor::from_slice(&sample)),
        &zoo_weights,
        &center,
        Some(&sample),
    );
    let zoo_to_zoo_cosines: Vec<f64> = own.iter().map(|n| n.cosine).collect();
    let zoo_to_zoo_cosine = MeanCi::of(&zoo_to_zoo_cosines);
    let zoo_to_zoo_l2 = MeanCi::of(&own.iter().map(|n| n.l2).collect::<Vec<_>>());

    let random_runs = (
        runs[&Method::Random].steps_proposal.clone(),
        runs[&Method::Random].steps_best.clone(),
    );
    let random_flops = runs[&Method::Random].flops_best.clone();
    let speedup = |random: &[f64], mine: &[f64]| {
        MeanCi::geometric(
            &random
                .iter()
                .zip(mine)
                .map(|(r, m)| (r + 1.0) / (m + 1.0))
                .collect::<Vec<_>>(),
        )
    };
    let share = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    let curves = runs
        .iter()
        .map(|(m, r)| {
            let n = r.curves.max(1) as f64;
            (*m, r.curve_sum.iter().map(|v| v / n).collect())
        })
        .collect();
    let steps_runs = runs
        .iter()
        .map(|(m, r)| (*m, r.steps_best.clone()))
        .collect();
    let cosine_runs = runs
        .iter()
        .filter(|(_, r)| !r.cosine.is_empty())
        .map(|(m, r)| (*m, r.cosine.clone()))
        .collect();
    let methods = runs
        .into_iter()
        .map(|(method, r)| {
            let novelty = (!r.cosine.is_empty()).then(|| Novelty {
                cosine_to_nearest: MeanCi::of(&r.cosine),
                l2_to_nearest: MeanCi::of(&r.l2),
                agreement_with_nearest: MeanCi::of(&r.agreement),
                pairwise_cosine: mean_pairwise_cosine(&Tensor::stack(&r.inits, 0), &center),
            });
            let scores = MethodScores {
                zero_shot: MeanCi::of(&r.zero_shot),
                steps_proposal_lr: MeanCi::of(&r.steps_proposal),
                reached_proposal_lr: share(&r.reached_proposal),
                speedup_proposal_lr: speedup(&random_runs.0, &r.steps_proposal),
                steps_best_lr: MeanCi::of(&r.steps_best),
                reached_best_lr: share(&r.reached_best),
                speedup_best_lr: speedup(&random_runs.1, &r.steps_best),
                compute_ratio_best_lr: random_flops.iter().sum::<f64>()
                    / r.flops_best.iter().sum::<f64>(),
                init_seconds: share(&r.init_seconds),
                few_shot: r
                    .few_shot
                    .iter()
                    .map(|(k, v)| (*k, MeanCi::of(v)))
                    .collect(),
                novelty,
            };
            (method, scores)
        })
        .collect();
    Ok(EvalReport {
        metric: match objective {
            Objective::Classification => "accuracy",
            Objective::Regression => "MSE",
        },
        objective,
        chosen_lr,
        lr_scores,
        fully_trained: MeanCi::of(&fully_trained),
        methods,
        zoo_to_zoo_cosine,
        zoo_to_zoo_l2,
        held_out: data.family.split_description(config.split),
        tasks: tasks.len(),
        seeds: config.seeds,
        curves,
        steps_runs,
        cosine_runs,
        zoo_to_zoo_cosines,
        matched_noise_scale: MeanCi::of(&matched_scales),
        support_only_k: support_only_k.filter(|_| wanted(Method::WeightgenSupportOnly)),
        hypernetwork_choice,
    })
}
