//! The inits the harness compares: made once per seed (weightgen's
//! samples, the meta-learned inits, the hypernetwork's predictions, with
//! the hypernetwork's encoder chosen on the validation tasks) and picked
//! per held-out task, and what making one costs.

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};

use super::baselines::{Hypernetwork, fomaml, reptile};
use super::learner::test_metric;
use super::protocol::{
    EvalConfig, HYPERNETWORK_BATCH, HYPERNETWORK_LR, HeldOutTask, Method, better,
};
use super::summary::HypernetworkChoice;
use crate::diffusion::SamplerKind;
use crate::model::{DenoiserCheckpoint, TaskBatch};
use crate::tasks::Descriptor;
use crate::train::quality::condition_of;
use crate::weights::unflatten;
use crate::zoo::ZooDataset;

pub(super) fn params(data: &ZooDataset, flat: &Tensor) -> Vec<Tensor> {
    unflatten(&data.network.spec, flat)
        .map(|named| named.into_iter().map(|(_, t)| t).collect())
        .unwrap_or_default()
}

pub(super) fn flat_of(params: &[Tensor]) -> Tensor {
    Tensor::cat(
        &params.iter().map(|p| p.flatten(0, -1)).collect::<Vec<_>>(),
        0,
    )
}

/// Trains the hypernetwork once per encoder variant with `config.seed` and
/// keeps the variant with the best mean zero-shot score on `validation`
/// (the trained model comes back too: it is the first seed's).
pub(super) fn choose_hypernetwork(
    checkpoint: &DenoiserCheckpoint,
    data: &ZooDataset,
    validation: &[HeldOutTask],
    config: &EvalConfig,
) -> Result<(HypernetworkChoice, Hypernetwork), tch::TchError> {
    let objective = data.family.objective();
    let descriptors: Vec<Descriptor> = validation.iter().map(|(_, _, d)| d.clone()).collect();
    let condition = condition_of(checkpoint, data, &descriptors);
    let mut scores = Vec::new();
    let mut best: Option<(f64, bool, Hypernetwork)> = None;
    for prototypes in Hypernetwork::encoder_variants(checkpoint) {
        let hypernetwork = train_hypernetwork(checkpoint, data, config, config.seed, prototypes)?;
        let weights = hypernetwork.predict(&condition, descriptors.len() as i64);
        let total: f64 = validation
            .iter()
            .enumerate()
            .map(|(i, (_, task_data, _))| {
                let init = params(data, &weights.get(i as i64));
                test_metric(data, &init, task_data)
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

pub(super) fn train_hypernetwork(
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

/// The conditions weightgen's rows sample from.
pub(super) struct Conditions<'a> {
    /// The task's features and support set.
    pub both: &'a TaskBatch,
    /// The features alone.
    pub features_only: &'a TaskBatch,
    /// Another held-out task's descriptor (the control).
    pub wrong_task: &'a TaskBatch,
    /// This seed's K support examples alone, where the denoiser reads them.
    pub support_only: Option<&'a TaskBatch>,
}

/// What one seed's inits are made from, for every held-out task at once.
pub(super) struct SeedInits {
    /// weightgen's samples [tasks, D] per generated method.
    pub samples: BTreeMap<Method, Tensor>,
    /// Seconds of sampling per init, per generated method.
    pub seconds: BTreeMap<Method, f64>,
    /// Reptile's init (one for every task).
    pub reptile: Option<Vec<Tensor>>,
    /// First-order MAML's init (one for every task).
    pub fomaml: Option<Vec<Tensor>>,
    /// The hypernetwork's weights [tasks, D].
    pub hypernetwork: Option<Tensor>,
}

/// Makes one seed's inits for the `wanted` methods. `first_hypernetwork`
/// (trained while choosing its encoder, with the first seed) is used for
/// that seed instead of training it again.
#[allow(clippy::too_many_arguments)]
pub(super) fn seed_inits(
    checkpoint: &DenoiserCheckpoint,
    data: &ZooDataset,
    config: &EvalConfig,
    conditions: &Conditions,
    seeds: &[u64],
    seed: u64,
    wanted: impl Fn(Method) -> bool,
    hypernetwork_choice: Option<&HypernetworkChoice>,
    first_hypernetwork: &mut Option<Hypernetwork>,
) -> Result<SeedInits, tch::TchError> {
    let ddim = config.sampler.kind();
    let mut to_sample: Vec<(Method, &TaskBatch, SamplerKind, f64)> = vec![
        (Method::WeightgenDdim, conditions.both, ddim, 1.0),
        (
            Method::WeightgenDdimGuided,
            conditions.both,
            ddim,
            config.guidance,
        ),
        (
            Method::WeightgenDdpm,
            conditions.both,
            SamplerKind::Ddpm,
            1.0,
        ),
        (
            Method::WeightgenDdpmGuided,
            conditions.both,
            SamplerKind::Ddpm,
            config.guidance,
        ),
        (
            Method::WeightgenFeaturesOnly,
            conditions.features_only,
            ddim,
            config.guidance,
        ),
        (
            Method::WeightgenWrongTask,
            conditions.wrong_task,
            ddim,
            config.guidance,
        ),
    ];
    if let Some(support_only) = conditions.support_only {
        to_sample.push((
            Method::WeightgenSupportOnly,
            support_only,
            ddim,
            config.guidance,
        ));
    }
    let mut samples = BTreeMap::new();
    let mut seconds = BTreeMap::new();
    for (method, condition, kind, guidance) in to_sample {
        if wanted(method) {
            let began = std::time::Instant::now();
            let w = checkpoint
                .generate(condition, seeds, kind, guidance)
                .to_device(Device::Cpu)
                .to_kind(Kind::Float);
            seconds.insert(
                method,
                began.elapsed().as_secs_f64() / seeds.len().max(1) as f64,
            );
            samples.insert(method, w);
        }
    }
    let reptile = wanted(Method::Reptile).then(|| reptile(data, &config.meta, seed));
    let fomaml = wanted(Method::Fomaml).then(|| fomaml(data, &config.meta, seed));
    let hypernetwork = if wanted(Method::Hypernetwork) {
        let prototypes = hypernetwork_choice.is_some_and(|c| c.prototypes);
        let trained = match first_hypernetwork.take().filter(|_| seed == config.seed) {
            Some(first) => first,
            None => train_hypernetwork(checkpoint, data, config, seed, prototypes)?,
        };
        Some(trained.predict(conditions.both, seeds.len() as i64))
    } else {
        None
    };
    Ok(SeedInits {
        samples,
        seconds,
        reptile,
        fomaml,
        hypernetwork,
    })
}

/// The zoo-derived starting points of one held-out run.
pub(super) struct Retrieved<'a> {
    /// The nearest zoo model by descriptor (flat).
    pub nearest: &'a Tensor,
    /// Noise of `noise_scale` × the zoo's per-weight spread.
    pub noise: &'a Tensor,
    /// Noise placing the nearest model as far from the zoo as the DDPM
    /// sample (None without that sample).
    pub noise_matched: Option<&'a Tensor>,
    /// The zoo's mean (flat).
    pub center: &'a Tensor,
}

/// `method`'s init for held-out task `t` (parameters in `ArchSpec` order),
/// or None where this evaluation has none for it.
pub(super) fn init_of(
    method: Method,
    data: &ZooDataset,
    random: &[Tensor],
    retrieved: &Retrieved,
    made: &SeedInits,
    t: i64,
) -> Option<Vec<Tensor>> {
    let copy =
        |p: &Option<Vec<Tensor>>| -> Vec<Tensor> { p.iter().flatten().map(Tensor::copy).collect() };
    Some(match method {
        Method::Random => random.iter().map(Tensor::copy).collect(),
        Method::NearestZoo => params(data, retrieved.nearest),
        Method::NearestZooNoise => params(data, &(retrieved.nearest + retrieved.noise)),
        Method::NearestZooNoiseMatched => {
            params(data, &(retrieved.nearest + retrieved.noise_matched?))
        }
        Method::ZooAverage => params(data, retrieved.center),
        Method::Reptile => copy(&made.reptile),
        Method::Fomaml => copy(&made.fomaml),
        Method::Hypernetwork => params(data, &made.hypernetwork.as_ref()?.get(t)),
        generated => params(data, &made.samples.get(&generated)?.get(t)),
    })
}

/// FLOPs of sampling one init by `method`: one dense forward of the
/// denoiser (2 per parameter) per reverse step, twice with guidance
/// (conditional and unconditional); 0 for stored inits. `steps` is the
/// configured sampler's (DDPM rows take all `timesteps`).
pub(super) fn sampling_flops(
    method: Method,
    guidance: f64,
    steps: usize,
    denoiser_params: f64,
    timesteps: f64,
) -> f64 {
    let forward = 2.0 * denoiser_params;
    let guided = if guidance == 1.0 { 1.0 } else { 2.0 };
    let steps = steps as f64;
    match method {
        Method::WeightgenDdim => forward * steps,
        Method::WeightgenDdimGuided => forward * guided * steps,
        Method::WeightgenDdpm => forward * timesteps,
        Method::WeightgenDdpmGuided => forward * guided * timesteps,
        Method::WeightgenSupportOnly
        | Method::WeightgenFeaturesOnly
        | Method::WeightgenWrongTask => forward * guided * steps,
        _ => 0.0,
    }
}
