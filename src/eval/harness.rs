//! The evaluation harness: inits from weightgen and from baselines on
//! held-out tasks no zoo model saw, fine-tuned under one protocol
//! ([`super::protocol`]), made by [`super::inits`], summarized with means
//! and 95 % intervals over tasks × seeds and the novelty of the generated
//! weights against the zoo ([`super::summary`]). This module runs them:
//! for each seed and held-out task, every method's init is fine-tuned at
//! the proposal's and at random init's chosen learning rate and on the
//! few-shot subsets.

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};

use super::baselines::Hypernetwork;
use super::finetune::{
    DEFAULT_TARGET_FRACTION, FinetuneConfig, gain_target, steps_to_target, target_of,
};
use super::inits::{
    Conditions, Retrieved, choose_hypernetwork, flat_of, init_of, params, sampling_flops,
    seed_inits,
};
use super::learner::{self, Examples};
use super::novelty::{ZooFrame, agreement, nearest_zoo};
use super::protocol::{
    EvalConfig, Method, PROPOSAL_FINETUNE_LR, choose_lr, held_out, validation_tasks,
};
use super::summary::{EvalReport, Measured, Runs, summarize};
use crate::model::DenoiserCheckpoint;
use crate::tasks::Descriptor;
use crate::tasks::train::Objective;
use crate::train::quality::{
    asked_features, condition_of, nearest_by_features, one_input, support_condition, wrong_tasks,
};
use crate::zoo::ZooDataset;

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
    // Generated models are compared with an aligned zoo in its frame.
    let frame = data
        .aligned
        .then(|| ZooFrame::new(&data.network.spec, &zoo_weights.get(0)))
        .flatten();
    let nearest_to = |flat: &Tensor| {
        let flat = match &frame {
            Some(frame) => frame.align_flat(flat),
            None => flat.shallow_clone(),
        };
        nearest_zoo(&flat.unsqueeze(0), &zoo_weights, &center, None)[0]
    };
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
    let (hypernetwork_choice, mut first_hypernetwork) = if wanted(Method::Hypernetwork) && choose {
        let tasks = validation.get_or_insert_with(|| validation_tasks(data, config));
        let (choice, first) = choose_hypernetwork(checkpoint, data, tasks, config)?;
        (Some(choice), Some(first))
    } else {
        (None, None)
    };
    let zoo_std_norm = zoo_std.square().sum(Kind::Double).sqrt().double_value(&[]);
    let mut matched_scales = Vec::new();

    let denoiser_params: f64 = checkpoint
        .model
        .vs
        .variables()
        .values()
        .map(|t| t.numel() as f64)
        .sum();
    let timesteps = checkpoint.model.schedule().timesteps() as f64;
    let mut runs: BTreeMap<Method, Runs> = methods.iter().map(|&m| (m, Runs::default())).collect();
    let mut fully_trained = Vec::new();
    for seed_index in 0..config.seeds as u64 {
        let seed = config.seed.wrapping_add(seed_index * 1_000_003);
        let seeds: Vec<u64> = (0..tasks.len() as u64)
            .map(|i| seed.wrapping_add(i))
            .collect();
        // Support-only: each task's K examples of this seed's few-shot
        // draw (the same examples the few-shot runs fine-tune on).
        let support_only = support_only_k
            .filter(|_| wanted(Method::WeightgenSupportOnly))
            .map(|k| {
                let descriptors: Vec<Descriptor> = tasks
                    .iter()
                    .zip(&seeds)
                    .map(|((_, d, _), &s)| d.few_shot(k, s).support_descriptor(data))
                    .collect();
                support_condition(checkpoint, data, &descriptors)
            });
        let conditions = Conditions {
            both: &condition,
            features_only: &features_only,
            wrong_task: &wrong_task,
            support_only: support_only.as_ref(),
        };
        let made = seed_inits(
            checkpoint,
            data,
            config,
            &conditions,
            &seeds,
            seed,
            wanted,
            hypernetwork_choice.as_ref(),
            &mut first_hypernetwork,
        )?;
        for (t, (task, task_data, _)) in tasks.iter().enumerate() {
            tracing::info!(seed = seed_index, task = t, ?task, "held-out run");
            let run_seed = seeds[t];
            let step_flops = learner::step_flops(data, task_data);
            let random = net.init(run_seed, Device::Cpu);
            let measured = yardstick.runs.get(&(seed_index, t)).cloned();
            let full = match &measured {
                Some(m) => m.full,
                None => learner::curve(
                    data,
                    &random,
                    task_data,
                    &FinetuneConfig {
                        steps: config.full_steps,
                        learning_rate: chosen_lr,
                    },
                    config.full_steps,
                )?
                .last()
                .copied()
                .unwrap_or(f64::NAN),
            };
            fully_trained.push(full);
            let target = match objective {
                // Bits per byte: 90 % of the fully trained adapter's gain
                // over the base (random init is the base: B = 0).
                Objective::LanguageModel => gain_target(
                    learner::test_metric(data, &random, task_data),
                    full,
                    DEFAULT_TARGET_FRACTION,
                ),
                _ => target_of(objective, full, DEFAULT_TARGET_FRACTION),
            };
            let nearest = data.weights.get(nearest_rows[t]).to_kind(Kind::Float);
            // Noise from this run's seed (torch's global generator).
            tch::manual_seed(run_seed as i64);
            let noise = Tensor::randn_like(&nearest) * &zoo_std;
            // σ for which E[cos(a, a + n)] = c, with a the centered nearest
            // model and c the DDPM sample's cosine to its nearest zoo model:
            // cos ≈ ‖a‖ / sqrt(‖a‖² + s²·Σσ_i²)  ⇒  s = ‖a‖·sqrt(1/c² − 1) / sqrt(Σσ_i²).
            let noise_matched = made.samples.get(&Method::WeightgenDdpmGuided).map(|ddpm| {
                let c = nearest_to(&ddpm.get(t as i64)).cosine.clamp(0.01, 0.999);
                let a_norm = (&nearest - &center).norm().double_value(&[]);
                let scale = a_norm * (1.0 / (c * c) - 1.0).sqrt() / zoo_std_norm.max(1e-12);
                matched_scales.push(scale);
                &noise * scale
            });
            let noise = &noise * config.noise_scale;
            let retrieved = Retrieved {
                nearest: &nearest,
                noise: &noise,
                noise_matched: noise_matched.as_ref(),
                center: &center,
            };
            // The same K examples for every method.
            let few_shot: Vec<(usize, Examples)> = config
                .few_shot
                .iter()
                .map(|&k| (k, task_data.few_shot(k, run_seed)))
                .collect();
            let run = RunContext {
                data,
                config,
                chosen_lr,
                task_data,
                group: data.family.held_out_group(task),
                few_shot: &few_shot,
                full,
                target,
                step_flops,
                zoo_weights: &zoo_weights,
                center: &center,
                frame: frame.as_ref(),
            };
            for &method in &methods {
                let Some(init) = init_of(method, data, &random, &retrieved, &made, t as i64) else {
                    continue;
                };
                let r = runs.get_mut(&method).expect("every method has runs");
                // Random init's runs come from the yardstick when measured.
                let measured = measured.as_ref().filter(|_| method == Method::Random);
                let cost = (
                    sampling_flops(
                        method,
                        config.guidance,
                        config.sampler.steps(),
                        denoiser_params,
                        timesteps,
                    ),
                    made.seconds.get(&method).copied().unwrap_or(0.0),
                );
                let random_run = measure_run(&run, method, &init, measured, cost, r)?;
                if let Some(random_run) = random_run.filter(|_| measured.is_none()) {
                    yardstick.runs.insert((seed_index, t), random_run);
                }
            }
        }
    }
    let measured = Measured {
        chosen_lr,
        lr_scores,
        fully_trained,
        matched_scales,
        held_out: data.family.split_description(config.split),
        tasks: tasks.len(),
        seeds: config.seeds,
        support_only_k: support_only_k.filter(|_| wanted(Method::WeightgenSupportOnly)),
        hypernetwork_choice,
    };
    Ok(summarize(runs, data, &zoo_weights, &center, measured))
}

/// One held-out run (task × seed) as every method sees it.
struct RunContext<'a> {
    data: &'a ZooDataset,
    config: &'a EvalConfig,
    chosen_lr: f64,
    task_data: &'a Examples,
    /// The task's held-out group, where its family has groups.
    group: Option<&'static str>,
    /// The same K examples for every method.
    few_shot: &'a [(usize, Examples)],
    /// Random init's fully trained score and the target derived from it.
    full: f64,
    target: f64,
    /// FLOPs of one full-batch training step.
    step_flops: f64,
    zoo_weights: &'a Tensor,
    center: &'a Tensor,
    /// An aligned zoo's frame, generated models are brought into.
    frame: Option<&'a ZooFrame>,
}

/// Fine-tunes `method`'s `init` on the run (at the proposal's rate, at the
/// chosen rate, and on each few-shot subset) and adds its figures to `r`;
/// `measured` are random init's curves when the yardstick has them, used
/// instead of running again. `cost` is the init's sampling FLOPs and
/// seconds. Returns random init's curves (to keep in the yardstick).
fn measure_run(
    run: &RunContext,
    method: Method,
    init: &[Tensor],
    measured: Option<&RandomRun>,
    cost: (f64, f64),
    r: &mut Runs,
) -> Result<Option<RandomRun>, tch::TchError> {
    let (data, config, net) = (run.data, run.config, &run.data.network);
    let objective = data.family.objective();
    let finetune = |lr: f64, steps: usize, d: &Examples, every: usize| {
        learner::curve(
            data,
            init,
            d,
            &FinetuneConfig {
                steps,
                learning_rate: lr,
            },
            every,
        )
    };
    let at_proposal = match measured {
        Some(m) => m.at_proposal.clone(),
        None => finetune(
            PROPOSAL_FINETUNE_LR,
            config.finetune_steps,
            run.task_data,
            config.eval_every,
        )?,
    };
    let at_best = match measured {
        Some(m) => m.at_best.clone(),
        None => finetune(
            run.chosen_lr,
            config.finetune_steps,
            run.task_data,
            config.eval_every,
        )?,
    };
    r.zero_shot.push(at_proposal[0]);
    r.groups.push(run.group);
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
        let hit = steps_to_target(curve, objective, run.target);
        steps.push(hit.unwrap_or(config.finetune_steps) as f64);
        reached.push(if hit.is_some() { 1.0 } else { 0.0 });
    }
    let steps_taken = r.steps_best.last().copied().unwrap_or(f64::NAN);
    r.flops_best.push(cost.0 + steps_taken * run.step_flops);
    r.init_seconds.push(cost.1);
    let mut few_shot_scores = Vec::new();
    for (i, (k, few)) in run.few_shot.iter().enumerate() {
        let score = match measured.and_then(|m| m.few_shot.get(i)) {
            Some(&score) => score,
            None => finetune(
                run.chosen_lr,
                config.few_shot_steps,
                few,
                config.few_shot_steps,
            )?
            .last()
            .copied()
            .unwrap_or(f64::NAN),
        };
        r.few_shot.entry(*k).or_default().push(score);
        few_shot_scores.push(score);
    }
    let has_novelty_row = method.is_generated()
        || matches!(
            method,
            Method::NearestZooNoise | Method::NearestZooNoiseMatched | Method::Hypernetwork
        );
    if has_novelty_row {
        // Brought into an aligned zoo's frame as its models were: aligned to its first.
        let flat = match (method.is_generated(), run.frame) {
            (true, Some(frame)) => frame.align(init),
            _ => flat_of(init),
        };
        let n = nearest_zoo(&flat.unsqueeze(0), run.zoo_weights, run.center, None)[0];
        r.cosine.push(n.cosine);
        r.l2.push(n.l2);
        if let (Objective::Classification, Examples::Tensors(task_data)) =
            (objective, run.task_data)
        {
            let mine = net.forward(init, &task_data.test_x);
            let theirs = net.forward(
                &params(data, &run.zoo_weights.get(n.row)),
                &task_data.test_x,
            );
            if let (Ok(mine), Ok(theirs)) = (mine, theirs) {
                r.agreement.push(agreement(&mine, &theirs));
            }
        }
        r.inits.push(flat);
    }
    Ok((method == Method::Random).then_some(RandomRun {
        full: run.full,
        at_proposal,
        at_best,
        few_shot: few_shot_scores,
    }))
}
