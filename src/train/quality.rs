//! The quality gate: generated weights scored zero-shot on tasks, next to
//! chance, the zoo's own models and the nearest zoo model (retrieval by
//! task features). First on validation zoo tasks (does the condition steer
//! the sample at all?), then on held-out tasks no zoo contains. On the
//! validation tasks it also chooses the sampling the denoiser recommends
//! (`diffusion::recommended`).

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand::rngs::StdRng;
use tch::{Device, Kind, Tensor};

use crate::diffusion::{RecommendedSampling, SamplerKind};
use crate::model::{DenoiserCheckpoint, TaskBatch};
use crate::tasks::train::evaluate;
use crate::tasks::{Descriptor, Objective, TaskSpec};
use crate::weights::{ZooSpread, unflatten};
use crate::zoo::dataset::{ZooDataset, support_ways};

/// DDIM steps of the quality gate.
pub const EVAL_DDIM_STEPS: usize = 50;

/// Most validation zoo tasks the gate samples for (evenly spaced over the
/// validation rows): the gate's cost grows with them (DDPM runs all T
/// steps, every sampling candidate every request form), and a zoo of
/// 4,000 models holds 400. The validation loss still reads every row.
pub const GATE_VALIDATION_TASKS: usize = 100;

/// `rows` thinned to at most `cap`, evenly spaced, in order.
fn evenly_spaced(rows: &[i64], cap: usize) -> Vec<i64> {
    if rows.len() <= cap {
        return rows.to_vec();
    }
    (0..cap).map(|i| rows[i * rows.len() / cap]).collect()
}

/// Scores on one set of tasks (means over tasks).
#[derive(Debug, Clone, PartialEq)]
pub struct SplitScores {
    /// Tasks scored.
    pub tasks: usize,
    /// Generated with DDIM-50.
    pub ddim: f64,
    /// Generated with DDPM (all T steps).
    pub ddpm: f64,
    /// DDIM-50 conditioned on the features alone (no support set), when the
    /// denoiser reads both.
    pub ddim_features_only: Option<f64>,
    /// DDIM-50 conditioned on the support set alone (no features), when the
    /// denoiser reads both.
    pub ddim_support_only: Option<f64>,
    /// The control: DDIM-50 conditioned on another task's descriptor. Near
    /// the true descriptor's score means the condition is not used.
    pub ddim_wrong_task: f64,
    /// The zoo model whose task features are nearest.
    pub nearest_zoo: f64,
    /// The zoo's own models on their tasks (zoo tasks only).
    pub zoo_models: Option<f64>,
    /// Chance: 1/ways, or the MSE of predicting 0.
    pub chance: f64,
    /// Mean cosine of the DDIM samples to their nearest training zoo model
    /// (the memorization guard's measure), when the checkpoint carries a
    /// zoo reference. Compare with the zoo's own `ZooSpread::mean_cosine`.
    pub nearest_zoo_cosine: Option<f64>,
}

impl std::fmt::Display for SplitScores {
    /// "DDIM a (features only b, support only c, wrong task d) DDPM e nearest-zoo f chance g".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DDIM {:.3} (", self.ddim)?;
        if let Some(v) = self.ddim_features_only {
            write!(f, "features only {v:.3}, ")?;
        }
        if let Some(v) = self.ddim_support_only {
            write!(f, "support only {v:.3}, ")?;
        }
        write!(
            f,
            "wrong task {:.3}) DDPM {:.3} nearest-zoo {:.3} chance {:.3}",
            self.ddim_wrong_task, self.ddpm, self.nearest_zoo, self.chance
        )?;
        if let Some(c) = self.nearest_zoo_cosine {
            write!(f, "; samples' nearest-zoo cosine {c:.3}")?;
        }
        Ok(())
    }
}

/// The gate's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct QualityReport {
    /// "test_accuracy" or "test_mse".
    pub metric: String,
    /// Validation zoo tasks (their models were not trained on).
    pub zoo_tasks: SplitScores,
    /// Held-out tasks.
    pub held_out: SplitScores,
    /// The training zoo's own nearest-neighbour spread, when the checkpoint
    /// carries a zoo reference.
    pub zoo_spread: Option<ZooSpread>,
    /// Each sampling candidate's mean score on the validation tasks over
    /// the request forms (both inputs, features only, support set only;
    /// the geometric mean for MSE).
    pub sampling: Vec<(RecommendedSampling, f64)>,
    /// The candidate chosen from them (`None` without validation tasks).
    pub recommended: Option<RecommendedSampling>,
}

impl QualityReport {
    /// Flat figures for the checkpoint summary.
    pub fn summary(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (split, s) in [("zoo_tasks", &self.zoo_tasks), ("held_out", &self.held_out)] {
            let key = |what: &str| format!("quality.{split}.{what}_{}", self.metric);
            out.insert(format!("quality.{split}.tasks"), s.tasks as f64);
            out.insert(key("ddim"), s.ddim);
            out.insert(key("ddpm"), s.ddpm);
            out.insert(key("ddim_wrong_task"), s.ddim_wrong_task);
            if let Some(v) = s.ddim_features_only {
                out.insert(key("ddim_features_only"), v);
            }
            if let Some(v) = s.ddim_support_only {
                out.insert(key("ddim_support_only"), v);
            }
            out.insert(key("nearest_zoo"), s.nearest_zoo);
            out.insert(key("chance"), s.chance);
            if let Some(z) = s.zoo_models {
                out.insert(key("zoo_models"), z);
            }
            if let Some(c) = s.nearest_zoo_cosine {
                out.insert(format!("quality.{split}.ddim_nearest_zoo_cosine"), c);
            }
        }
        for (candidate, score) in &self.sampling {
            out.insert(
                format!(
                    "quality.zoo_tasks.sampling.{}_{}",
                    candidate.label(),
                    self.metric
                ),
                *score,
            );
        }
        if let Some(spread) = &self.zoo_spread {
            out.insert("novelty.zoo_nearest_cosine_mean".into(), spread.mean_cosine);
            out.insert("novelty.too_close_cosine".into(), spread.cosine);
            out.insert("novelty.too_close_l2".into(), spread.l2);
        }
        out
    }
}

/// The task metric of flat weights `flat` [D] on `task` (NaN if unusable).
pub fn score(data: &ZooDataset, task: &TaskSpec, flat: &Tensor) -> f64 {
    if let Some(words) = &data.words {
        return words.bits_per_byte(task, flat);
    }
    let objective = data.family.objective();
    match data.family.data(task, Device::Cpu) {
        Ok(task_data) => match unflatten(&data.network.spec, flat) {
            Ok(named) => {
                let params: Vec<Tensor> = named.into_iter().map(|(_, t)| t).collect();
                evaluate(&data.network, &params, &task_data, objective)
                    .ok()
                    .and_then(|scores| scores.get(objective.test_metric()).copied())
                    .unwrap_or(f64::NAN)
            }
            Err(_) => f64::NAN,
        },
        Err(_) => f64::NAN,
    }
}

fn chance(data: &ZooDataset, task: &TaskSpec) -> f64 {
    match data.family.objective() {
        Objective::Classification => 1.0 / support_ways(data.family) as f64,
        Objective::Regression => data
            .family
            .data(task, Device::Cpu)
            .map(|d| d.test_y.square().mean(Kind::Double).double_value(&[]))
            .unwrap_or(f64::NAN),
        // The base model alone: what an adapter starts from (uniform
        // next-token guesses without one).
        Objective::LanguageModel => data
            .words
            .as_ref()
            .map_or((crate::tasks::words::lm::VOCAB as f64).log2(), |words| {
                words.base_bits_per_byte(task)
            }),
    }
}

/// Raw feature vectors [B, F] of `descriptors` in the zoo's schema.
fn feature_matrix(data: &ZooDataset, descriptors: &[Descriptor]) -> Tensor {
    let rows: Vec<Tensor> = descriptors
        .iter()
        .map(|d| Tensor::from_slice(&d.feature_vector(&data.schema).unwrap_or_default()))
        .collect();
    Tensor::stack(&rows, 0)
}

/// The denoiser's condition for `descriptors`, as training standardized it.
pub fn condition_of(
    checkpoint: &DenoiserCheckpoint,
    data: &ZooDataset,
    descriptors: &[Descriptor],
) -> TaskBatch {
    checkpoint.condition(
        Some(&feature_matrix(data, descriptors)),
        support_batch(data, descriptors),
    )
}

/// The denoiser's condition for support sets alone (descriptors without
/// features): what a few-shot learner sees.
pub fn support_condition(
    checkpoint: &DenoiserCheckpoint,
    data: &ZooDataset,
    descriptors: &[Descriptor],
) -> TaskBatch {
    checkpoint.condition(None, support_batch(data, descriptors))
}

/// Support tensors [B, K, X] / [B, K, Y] of `descriptors`, when every one
/// has a valid support set of the same size.
fn support_batch(data: &ZooDataset, descriptors: &[Descriptor]) -> Option<(Tensor, Tensor)> {
    let supports: Vec<(Tensor, Tensor)> = descriptors
        .iter()
        .filter_map(|d| {
            d.support_tensors(&data.schema, support_ways(data.family))
                .ok()
                .flatten()
        })
        .collect();
    let same_size = supports
        .windows(2)
        .all(|pair| pair[0].0.size() == pair[1].0.size());
    if supports.len() == descriptors.len() && !supports.is_empty() && same_size {
        let (xs, ys): (Vec<Tensor>, Vec<Tensor>) = supports.into_iter().unzip();
        Some((Tensor::stack(&xs, 0), Tensor::stack(&ys, 0)))
    } else {
        None
    }
}

/// For each asked task (`asked`: its features standardized as the
/// denoiser's training did, e.g. a condition's), the zoo row among `rows`
/// whose features are nearest (Euclidean): the retrieval baseline.
pub fn nearest_by_features(
    checkpoint: &DenoiserCheckpoint,
    data: &ZooDataset,
    rows: &[i64],
    asked: &Tensor,
) -> Vec<i64> {
    let count = asked.size().first().copied().unwrap_or(0);
    if rows.is_empty() || count == 0 {
        return Vec::new();
    }
    let zoo = checkpoint.standardize(&data.features.index_select(0, &Tensor::from_slice(rows)));
    let nearest =
        Tensor::cdist(&asked.to_device(zoo.device()), &zoo, 2.0, None::<i64>).argmin(1, false);
    (0..count)
        .map(|i| rows[nearest.int64_value(&[i]) as usize])
        .collect()
}

/// The standardized features of a condition built by `condition_of`, or of
/// `descriptors` when it has none.
pub fn asked_features(
    checkpoint: &DenoiserCheckpoint,
    data: &ZooDataset,
    condition: &TaskBatch,
    descriptors: &[Descriptor],
) -> Tensor {
    match &condition.features {
        Some(features) => features.shallow_clone(),
        None => checkpoint.standardize(&feature_matrix(data, descriptors)),
    }
}

/// The descriptors shifted by one: task i gets task i+1's (the last gets
/// the first's). A wrong descriptor for every task, from the same
/// distribution as the right ones.
pub fn wrong_tasks(descriptors: &[Descriptor]) -> Vec<Descriptor> {
    let mut shifted = descriptors.to_vec();
    if !shifted.is_empty() {
        shifted.rotate_left(1);
    }
    shifted
}

/// `condition` keeping only its features (`features`) or only its support set.
pub fn one_input(condition: &TaskBatch, features: bool) -> TaskBatch {
    let copy = |t: &Option<Tensor>| t.as_ref().map(Tensor::shallow_clone);
    TaskBatch {
        features: if features {
            copy(&condition.features)
        } else {
            None
        },
        support_x: if features {
            None
        } else {
            copy(&condition.support_x)
        },
        support_y: if features {
            None
        } else {
            copy(&condition.support_y)
        },
        features_dropped: None,
        support_dropped: None,
        arch_descriptor: copy(&condition.arch_descriptor),
        arch_mask: copy(&condition.arch_mask),
    }
}

/// One sampling seed per task: seed, seed + 1, …
fn task_seeds(seed: u64, tasks: usize) -> Vec<u64> {
    (0..tasks as u64).map(|i| seed.wrapping_add(i)).collect()
}

/// The mean task metric of weights `w` [B, D], row i scored on `tasks[i]`.
fn mean_score(data: &ZooDataset, tasks: &[TaskSpec], w: &Tensor) -> f64 {
    let total: f64 = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| score(data, t, &w.get(i as i64)))
        .sum();
    total / tasks.len() as f64
}

/// What every split of the gate shares.
struct Gate<'a> {
    checkpoint: &'a DenoiserCheckpoint,
    data: &'a ZooDataset,
    train: &'a [i64],
    guidance: f64,
}

fn scores_for(
    gate: &Gate<'_>,
    tasks: &[TaskSpec],
    descriptors: &[Descriptor],
    own: Option<f64>,
    seed: u64,
) -> SplitScores {
    let Gate {
        checkpoint,
        data,
        train,
        guidance,
    } = *gate;
    if tasks.is_empty() {
        return SplitScores {
            tasks: 0,
            ddim: f64::NAN,
            ddpm: f64::NAN,
            ddim_features_only: None,
            ddim_support_only: None,
            ddim_wrong_task: f64::NAN,
            nearest_zoo: f64::NAN,
            zoo_models: own,
            chance: f64::NAN,
            nearest_zoo_cosine: None,
        };
    }
    let condition = condition_of(checkpoint, data, descriptors);
    let seeds = task_seeds(seed, tasks.len());
    let mean = |xs: Vec<f64>| xs.iter().sum::<f64>() / xs.len() as f64;
    let sampled = |condition: &TaskBatch, kind| {
        checkpoint
            .generate(condition, &seeds, kind, guidance)
            .to_device(Device::Cpu)
    };
    let scored = |w: &Tensor| mean_score(data, tasks, w);
    let generated = |condition: &TaskBatch, kind| scored(&sampled(condition, kind));
    // Retrieval baseline: the training zoo model with the nearest features.
    // The condition already holds the asked tasks' standardized features.
    let asked = asked_features(checkpoint, data, &condition, descriptors);
    let nearest = nearest_by_features(checkpoint, data, train, &asked);
    let nearest_zoo = mean(
        tasks
            .iter()
            .zip(&nearest)
            .map(|(t, &row)| score(data, t, &data.weights.get(row)))
            .collect(),
    );
    let ddim = SamplerKind::ddim(EVAL_DDIM_STEPS, 0.0);
    // Both inputs present: the single-input forms are measured too.
    let both = condition.features.is_some() && condition.support_x.is_some();
    let wrong = condition_of(checkpoint, data, &wrong_tasks(descriptors));
    let ddim_weights = sampled(&condition, ddim);
    let nearest_zoo_cosine = checkpoint.zoo_reference.as_ref().map(|reference| {
        mean(
            reference
                .nearest(&ddim_weights)
                .iter()
                .map(|n| n.cosine)
                .collect(),
        )
    });
    SplitScores {
        tasks: tasks.len(),
        ddim: scored(&ddim_weights),
        ddpm: generated(&condition, SamplerKind::Ddpm),
        ddim_features_only: both.then(|| generated(&one_input(&condition, true), ddim)),
        ddim_support_only: both.then(|| generated(&one_input(&condition, false), ddim)),
        ddim_wrong_task: generated(&wrong, ddim),
        nearest_zoo,
        zoo_models: own,
        chance: mean(tasks.iter().map(|t| chance(data, t)).collect()),
        nearest_zoo_cosine,
    }
}

/// Each sampling candidate's score on `tasks` (mean over the request
/// forms the descriptors allow; for regression the geometric mean of the
/// forms' MSEs, so that they weigh alike), in candidate order.
fn score_candidates(
    checkpoint: &DenoiserCheckpoint,
    data: &ZooDataset,
    tasks: &[TaskSpec],
    descriptors: &[Descriptor],
    guidance: f64,
    seed: u64,
) -> Vec<(RecommendedSampling, f64)> {
    if tasks.is_empty() {
        return Vec::new();
    }
    let condition = condition_of(checkpoint, data, descriptors);
    let mut forms = Vec::new();
    if condition.features.is_some() && condition.support_x.is_some() {
        forms.push(one_input(&condition, true));
        forms.push(one_input(&condition, false));
    }
    forms.push(condition);
    let seeds = task_seeds(seed, tasks.len());
    let regression = data.family.objective().lower_is_better();
    let timesteps = checkpoint.model.config().timesteps;
    RecommendedSampling::candidates(guidance, timesteps)
        .into_iter()
        .map(|candidate| {
            let mut total = 0.0;
            for form in &forms {
                let w = checkpoint
                    .generate(form, &seeds, candidate.kind(), candidate.guidance)
                    .to_device(Device::Cpu);
                let mean = mean_score(data, tasks, &w);
                // (A NaN mean stays NaN: such a candidate never wins.)
                total += if regression { mean.ln() } else { mean };
            }
            let mean = total / forms.len() as f64;
            (candidate, if regression { mean.exp() } else { mean })
        })
        .collect()
}

/// Scores `checkpoint` on the validation zoo tasks (`val` rows, at most
/// [`GATE_VALIDATION_TASKS`] of them) and on
/// `held_out_tasks` held-out tasks drawn from `seed`, and chooses the
/// sampling it recommends on the validation tasks.
pub fn evaluate_quality(
    checkpoint: &DenoiserCheckpoint,
    data: &ZooDataset,
    train: &[i64],
    val: &[i64],
    held_out_tasks: usize,
    guidance: f64,
    seed: u64,
) -> QualityReport {
    let metric = data.family.objective().test_metric().to_owned();
    let val = &evenly_spaced(val, GATE_VALIDATION_TASKS)[..];
    let val_tasks: Vec<TaskSpec> = val
        .iter()
        .map(|&i| data.tasks[i as usize].clone())
        .collect();
    let val_descriptors: Vec<Descriptor> = val
        .iter()
        .map(|&i| data.descriptors[i as usize].clone())
        .collect();
    let own = (!val.is_empty()).then(|| {
        val.iter()
            .map(|&i| {
                data.models[i as usize]
                    .metrics
                    .get(&metric)
                    .copied()
                    .unwrap_or(f64::NAN)
            })
            .sum::<f64>()
            / val.len() as f64
    });
    let gate = Gate {
        checkpoint,
        data,
        train,
        guidance,
    };
    let zoo_tasks = scores_for(&gate, &val_tasks, &val_descriptors, own, seed);
    let sampling = score_candidates(
        checkpoint,
        data,
        &val_tasks,
        &val_descriptors,
        guidance,
        seed,
    );
    let higher_is_better = data.family.objective() == Objective::Classification;
    let recommended = RecommendedSampling::choose(&sampling, higher_is_better);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x4E1D);
    let held: Vec<TaskSpec> = (0..held_out_tasks)
        .map(|_| data.family.sample_task(&mut rng, true))
        .collect();
    let held_descriptors: Vec<Descriptor> = held.iter().filter_map(|t| data.describe(t)).collect();
    let held_out = scores_for(&gate, &held, &held_descriptors, None, seed ^ 1);
    let report = QualityReport {
        metric,
        zoo_tasks,
        held_out,
        zoo_spread: checkpoint.zoo_reference.as_ref().map(|r| r.spread),
        sampling,
        recommended,
    };
    tracing::info!(?report, "quality gate");
    report
}

#[cfg(test)]
mod tests {
    use super::evenly_spaced;

    #[test]
    fn validation_rows_are_thinned_evenly_and_kept_below_the_cap() {
        let rows: Vec<i64> = (0..400).map(|i| 10 * i + 5).collect();
        let kept = evenly_spaced(&rows, 100);
        assert_eq!(kept.len(), 100);
        assert_eq!(kept[..3], [5, 45, 85]);
        assert!(kept.windows(2).all(|w| w[1] - w[0] == 40));
        assert_eq!(evenly_spaced(&rows[..60], 100), rows[..60]);
    }
}
