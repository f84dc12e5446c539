//! From runs to the report: per method, means and 95 % intervals over
//! tasks × seeds, speed-ups and compute against random init, and novelty
//! against the zoo-to-zoo nearest-neighbour statistic.

use std::collections::BTreeMap;

use tch::Tensor;

use super::novelty::{mean_pairwise_cosine, nearest_zoo};
use super::protocol::Method;
use super::stats::MeanCi;
use crate::tasks::train::Objective;
use crate::zoo::ZooDataset;

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
    /// Per held-out group (`Family::held_out_group`; empty for families
    /// without groups) and method: zero-shot score and speed-up at the
    /// chosen rate over that group's runs.
    pub groups: BTreeMap<&'static str, BTreeMap<Method, GroupScores>>,
    /// The fully trained reference over each held-out group's runs.
    pub group_fully_trained: BTreeMap<&'static str, MeanCi>,
}

/// One method's figures over the runs of one held-out group.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupScores {
    /// Runs (tasks × seeds) in the group.
    pub runs: usize,
    /// Test score before fine-tuning.
    pub zero_shot: MeanCi,
    /// Speed-up over random init at the chosen rate.
    pub speedup_best_lr: MeanCi,
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

/// Per-run figures before aggregation.
#[derive(Default)]
pub(super) struct Runs {
    pub zero_shot: Vec<f64>,
    pub steps_proposal: Vec<f64>,
    pub reached_proposal: Vec<f64>,
    pub steps_best: Vec<f64>,
    pub reached_best: Vec<f64>,
    pub few_shot: BTreeMap<usize, Vec<f64>>,
    pub cosine: Vec<f64>,
    pub l2: Vec<f64>,
    pub agreement: Vec<f64>,
    pub inits: Vec<Tensor>,
    pub curve_sum: Vec<f64>,
    pub curves: usize,
    pub flops_best: Vec<f64>,
    pub init_seconds: Vec<f64>,
    /// Each run's held-out group, in run order.
    pub groups: Vec<Option<&'static str>>,
}

/// What the harness measured besides the per-method runs.
pub(super) struct Measured {
    /// The learning rate chosen for random init.
    pub chosen_lr: f64,
    /// Mean validation score per learning rate of the grid.
    pub lr_scores: Vec<(f64, f64)>,
    /// Fully trained references, one per run.
    pub fully_trained: Vec<f64>,
    /// Matched-noise scales, one per run that had a DDPM sample.
    pub matched_scales: Vec<f64>,
    /// What the held-out tasks are, in words.
    pub held_out: &'static str,
    /// Held-out tasks.
    pub tasks: usize,
    /// Seeds per task.
    pub seeds: usize,
    /// K of the support-only rows, where they ran.
    pub support_only_k: Option<usize>,
    /// The hypernetwork's encoder, where one was chosen.
    pub hypernetwork_choice: Option<HypernetworkChoice>,
}

/// The report: every method's runs summarized against random init's (which
/// must be among them), and the zoo-to-zoo statistic over up to 200 zoo
/// models against their nearest other. `zoo_weights` [N, D] (f32) and their
/// mean `center` are the frame novelty is measured in.
pub(super) fn summarize(
    runs: BTreeMap<Method, Runs>,
    data: &ZooDataset,
    zoo_weights: &Tensor,
    center: &Tensor,
    measured: Measured,
) -> EvalReport {
    let objective = data.family.objective();
    let sample: Vec<i64> = (0..data.len().min(200) as i64).collect();
    let own = nearest_zoo(
        &zoo_weights.index_select(0, &Tensor::from_slice(&sample)),
        zoo_weights,
        center,
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
    let random = &runs[&Method::Random];
    // Random init runs on every run, so its groups are the runs' groups.
    let mut group_fully_trained: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    for (group, full) in random.groups.iter().zip(&measured.fully_trained) {
        if let Some(group) = group {
            group_fully_trained.entry(group).or_default().push(*full);
        }
    }
    let mut groups: BTreeMap<&'static str, BTreeMap<Method, GroupScores>> = BTreeMap::new();
    for (method, r) in &runs {
        let mut members: BTreeMap<&'static str, Vec<usize>> = BTreeMap::new();
        for (i, group) in r.groups.iter().enumerate() {
            if let Some(group) = group {
                members.entry(group).or_default().push(i);
            }
        }
        for (group, rows) in members {
            let pick = |xs: &[f64]| {
                rows.iter()
                    .filter_map(|&i| xs.get(i).copied())
                    .collect::<Vec<_>>()
            };
            let scores = GroupScores {
                runs: rows.len(),
                zero_shot: MeanCi::of(&pick(&r.zero_shot)),
                speedup_best_lr: speedup(&pick(&random.steps_best), &pick(&r.steps_best)),
            };
            groups.entry(group).or_default().insert(*method, scores);
        }
    }
    let methods = runs
        .into_iter()
        .map(|(method, r)| {
            let novelty = (!r.cosine.is_empty()).then(|| Novelty {
                cosine_to_nearest: MeanCi::of(&r.cosine),
                l2_to_nearest: MeanCi::of(&r.l2),
                agreement_with_nearest: MeanCi::of(&r.agreement),
                pairwise_cosine: mean_pairwise_cosine(&Tensor::stack(&r.inits, 0), center),
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
    EvalReport {
        metric: objective.label(),
        objective,
        chosen_lr: measured.chosen_lr,
        lr_scores: measured.lr_scores,
        fully_trained: MeanCi::of(&measured.fully_trained),
        methods,
        zoo_to_zoo_cosine,
        zoo_to_zoo_l2,
        held_out: measured.held_out,
        tasks: measured.tasks,
        seeds: measured.seeds,
        curves,
        steps_runs,
        cosine_runs,
        zoo_to_zoo_cosines,
        matched_noise_scale: MeanCi::of(&measured.matched_scales),
        support_only_k: measured.support_only_k,
        hypernetwork_choice: measured.hypernetwork_choice,
        groups,
        group_fully_trained: group_fully_trained
            .into_iter()
            .map(|(g, v)| (g, MeanCi::of(&v)))
            .collect(),
    }
}
