//! One batch on the model thread: each request's condition, one reverse
//! diffusion for all of them, the memorization guard's redraws, and each
//! request's samples encoded as safetensors and sent back. A failure of
//! one request (a support set that does not fit, a sample out of finite
//! arithmetic, a libtorch error) is answered to that request alone.

use std::collections::HashMap;
use std::time::Instant;

use bytes::Bytes;
use tch::{Device, Tensor};

use super::batcher::Pending;
use super::{GenerateJob, Generated, ModelError, SampleNearness};
use crate::diffusion::SamplerKind;
use crate::model::{DenoiserCheckpoint, TaskBatch};
use crate::rng::splitmix64;
use crate::tasks::featurizer::FeatureError;
use crate::weights::{DType, encode_tensors, unflatten};

/// Samples a batch in one reverse diffusion and answers each request with
/// its own samples. Requests whose client went away are dropped first;
/// one whose support set does not fit is answered with its error alone.
pub(super) fn run_batch(loaded: &HashMap<String, DenoiserCheckpoint>, batch: Vec<Pending>) {
    let began = Instant::now();
    let (live, gone): (Vec<Pending>, Vec<Pending>) =
        batch.into_iter().partition(|p| !p.reply.is_closed());
    if !gone.is_empty() {
        metrics::counter!("weightgen_generate_dropped_total").increment(gone.len() as u64);
    }
    let Some(first) = live.first() else {
        return;
    };
    let Some(checkpoint) = loaded.get(&first.id) else {
        let id = first.id.clone();
        for p in live {
            let _ = p.reply.send(Err(ModelError::NotLoaded(id.clone())));
        }
        return;
    };
    let mut members = Vec::with_capacity(live.len());
    let mut conditions = Vec::with_capacity(live.len());
    for p in live {
        match guarded(|| Ok(condition(checkpoint, &p.job, p.job.seeds.len() as i64)?)) {
            Ok(c) => {
                conditions.push(c);
                members.push(p);
            }
            Err(e) => {
                let _ = p.reply.send(Err(e));
            }
        }
    }
    if members.is_empty() {
        return;
    }
    let seeds: Vec<u64> = members
        .iter()
        .flat_map(|p| p.job.seeds.iter().copied())
        .collect();
    let rows = seeds.len();
    metrics::histogram!("weightgen_batch_samples").record(rows as f64);
    let (sampler, guidance) = (members[0].job.sampler, members[0].job.guidance);
    let budgets: Vec<u32> = members
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.job.max_redraws, p.job.seeds.len()))
        .collect();
    let sampled = guarded(|| {
        let condition = concat(&conditions);
        let flat = checkpoint
            .generate(&condition, &seeds, sampler, guidance)
            .to_device(Device::Cpu);
        Ok(redraw_near_copies(
            checkpoint, flat, &condition, &seeds, &budgets, sampler, guidance,
        ))
    });
    let sampled_ms = began.elapsed().as_secs_f64() * 1e3;
    metrics::histogram!("weightgen_sampling_seconds").record(sampled_ms / 1e3);
    let mut offset = 0i64;
    for p in members {
        let n = p.job.seeds.len() as i64;
        let queue_ms = began.duration_since(p.enqueued).as_secs_f64() * 1e3;
        metrics::histogram!("weightgen_queue_wait_seconds").record(queue_ms / 1e3);
        let result = match &sampled {
            Ok((flat, _)) if !finite(&flat.narrow(0, offset, n)) => {
                metrics::counter!("weightgen_generate_rejected_total", "reason" => "non_finite")
                    .increment(1);
                Err(ModelError::NonFinite)
            }
            Ok((flat, nearness)) => {
                guarded(|| encode(checkpoint, &flat.narrow(0, offset, n), p.job.dtype)).map(
                    |files| Generated {
                        files,
                        sampling_ms: sampled_ms,
                        queue_ms,
                        batch_size: rows,
                        nearness: nearness
                            .as_ref()
                            .map(|all| all[offset as usize..(offset + n) as usize].to_vec()),
                    },
                )
            }
            Err(e) => Err(ModelError::Torch(e.to_string())),
        };
        offset += n;
        let _ = p.reply.send(result);
    }
}

/// Whether every value of `weights` is finite.
fn finite(weights: &Tensor) -> bool {
    weights.isfinite().all().int64_value(&[]) != 0
}

/// The seed of redraw `attempt` (1, 2, …) of the sample seeded `seed`: a
/// function of both, so a guarded request is as reproducible as any.
pub fn redraw_seed(seed: u64, attempt: u32) -> u64 {
    splitmix64(seed ^ splitmix64(0x9E37_79B9_7F4A_7C15 ^ u64::from(attempt)))
}

/// The memorization guard: scores each row of `flat` [B, D] against the
/// checkpoint's zoo reference and redraws the rows that are too close, as
/// long as their `budgets` allow (each round samples only those rows).
/// Without a zoo reference the weights are returned as they are.
fn redraw_near_copies(
    checkpoint: &DenoiserCheckpoint,
    mut flat: Tensor,
    condition: &TaskBatch,
    seeds: &[u64],
    budgets: &[u32],
    sampler: SamplerKind,
    guidance: f64,
) -> (Tensor, Option<Vec<SampleNearness>>) {
    let Some(reference) = &checkpoint.zoo_reference else {
        return (flat, None);
    };
    let spread = reference.spread;
    let mut scores = reference.nearest(&flat);
    let mut redraws = vec![0u32; seeds.len()];
    loop {
        let again: Vec<usize> = (0..seeds.len())
            .filter(|&i| spread.too_close(&scores[i]) && redraws[i] < budgets[i])
            .collect();
        if again.is_empty() {
            break;
        }
        metrics::counter!("weightgen_guard_redraws_total").increment(again.len() as u64);
        let fresh_seeds: Vec<u64> = again
            .iter()
            .map(|&i| {
                redraws[i] += 1;
                redraw_seed(seeds[i], redraws[i])
            })
            .collect();
        let rows: Vec<i64> = again.iter().map(|&i| i as i64).collect();
        let index = Tensor::from_slice(&rows);
        let fresh = checkpoint
            .generate(&condition.select(&index), &fresh_seeds, sampler, guidance)
            .to_device(Device::Cpu);
        for (k, n) in reference.nearest(&fresh).into_iter().enumerate() {
            scores[again[k]] = n;
        }
        flat = flat.index_copy(0, &index, &fresh);
    }
    let nearness: Vec<SampleNearness> = scores
        .into_iter()
        .zip(redraws)
        .map(|(nearness, redraws)| SampleNearness {
            too_close: spread.too_close(&nearness),
            nearness,
            redraws,
        })
        .collect();
    let close = nearness.iter().filter(|n| n.too_close).count();
    if close > 0 {
        metrics::counter!("weightgen_samples_too_close_total").increment(close as u64);
    }
    (flat, Some(nearness))
}

/// One condition of all rows of `parts`, in order.
fn concat(parts: &[TaskBatch]) -> TaskBatch {
    let cat = |pick: fn(&TaskBatch) -> Option<&Tensor>| -> Option<Tensor> {
        let tensors: Option<Vec<&Tensor>> = parts.iter().map(pick).collect();
        tensors.map(|t| Tensor::cat(&t, 0))
    };
    TaskBatch {
        features: cat(|b| b.features.as_ref()),
        support_x: cat(|b| b.support_x.as_ref()),
        support_y: cat(|b| b.support_y.as_ref()),
        features_dropped: None,
        support_dropped: None,
    }
}

/// Runs `work`, turning a libtorch panic (tch unwraps its errors) into an
/// error for this request instead of the end of the thread.
pub(super) fn guarded<T>(work: impl FnOnce() -> Result<T, ModelError>) -> Result<T, ModelError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)) {
        Ok(result) => result,
        Err(panic) => {
            let reason = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            let first_line = reason.lines().next().unwrap_or_default().to_owned();
            tracing::error!(reason = %first_line, "libtorch failed on the model thread");
            Err(ModelError::Torch(first_line))
        }
    }
}

/// The condition of `job` for `rows` samples, standardized as in training.
fn condition(
    checkpoint: &DenoiserCheckpoint,
    job: &GenerateJob,
    rows: i64,
) -> Result<TaskBatch, FeatureError> {
    let support = job
        .descriptor
        .support_tensors(&checkpoint.feature_schema, job.ways)?;
    let repeat = |t: &Tensor| {
        let mut shape = vec![rows];
        shape.extend(std::iter::repeat_n(1, t.dim()));
        t.unsqueeze(0).repeat(shape.as_slice())
    };
    // No features: a support-only request.
    let features = (!job.features.is_empty()).then(|| repeat(&Tensor::from_slice(&job.features)));
    Ok(checkpoint.condition(
        features.as_ref(),
        support.map(|(x, y)| (repeat(&x), repeat(&y))),
    ))
}

/// Each row of `flat` [n, D] as a safetensors file of `dtype` tensors.
fn encode(
    checkpoint: &DenoiserCheckpoint,
    flat: &Tensor,
    dtype: DType,
) -> Result<Vec<Bytes>, ModelError> {
    let rows = flat.size()[0];
    let mut files = Vec::with_capacity(rows as usize);
    for i in 0..rows {
        let tensors = unflatten(&checkpoint.arch, &flat.get(i))
            .map_err(|e| ModelError::Checkpoint(e.to_string()))?
            .into_iter()
            .map(|(name, t)| (name, t.to_kind(dtype.kind()).contiguous()))
            .collect::<Vec<_>>();
        let bytes = encode_tensors(&tensors, &HashMap::new())
            .map_err(|e| ModelError::Checkpoint(e.to_string()))?;
        files.push(Bytes::from(bytes));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::batcher::tests::pending;
    use crate::tasks::schema::FeatureSchema;
    use crate::weights::ArchSpec;

    /// A small untrained digits-free checkpoint: what the guard does does
    /// not depend on how good the samples are.
    fn tiny_checkpoint() -> DenoiserCheckpoint {
        use crate::model::{ConditionalDenoiser, DenoiserConfig, TaskEncoderConfig};
        use crate::weights::{DEFAULT_STD_FLOOR, Stats, StatsMode};
        let arch = ArchSpec::sequential_mlp("mlp-4-3-2", "test", &[4, 3, 2]).unwrap();
        let d = arch.num_parameters() as i64;
        // Fixed values, not the global generator that parallel tests share.
        let zoo = crate::rng::SeededNoise::new(&[7], 1)
            .draw(&[30, d], Device::Cpu)
            .squeeze_dim(0);
        let encoder = TaskEncoderConfig {
            feature_dim: 2,
            support_x_dim: 0,
            support_y_dim: 0,
            hidden: 8,
            embed_dim: 4,
            prototypes: false,
        };
        let model = ConditionalDenoiser::new(DenoiserConfig::new(d, encoder), Device::Cpu).unwrap();
        model.set_test_weights(7);
        DenoiserCheckpoint {
            model,
            stats: Stats::fit(&zoo, StatsMode::PerDimension, &arch, DEFAULT_STD_FLOOR),
            arch,
            latent: None,
            clip: None,
            feature_schema: FeatureSchema::default(),
            feature_norm: None,
            summary: Default::default(),
            zoo_reference: None,
            recommended: None,
        }
    }

    #[test]
    fn a_sample_out_of_finite_arithmetic_fails_its_own_request_only() {
        let loaded = HashMap::from([("a".to_owned(), tiny_checkpoint())]);
        let (mut wild, wild_reply) = pending("a", 1);
        wild.job.features = vec![f32::MAX, -f32::MAX];
        let (mut fine, fine_reply) = pending("a", 2);
        fine.job.features = vec![0.5, -0.5];
        fine.job.seeds = vec![5, 6];
        run_batch(&loaded, vec![wild, fine]);
        let wild = wild_reply.blocking_recv().unwrap();
        assert!(matches!(wild, Err(ModelError::NonFinite)), "{wild:?}");
        let fine = fine_reply.blocking_recv().unwrap().unwrap();
        assert_eq!((fine.files.len(), fine.batch_size), (2, 3));
    }

    #[test]
    fn the_guard_redraws_near_copies_within_each_samples_budget() {
        use crate::weights::ZooReference;
        use crate::weights::novelty::{DEFAULT_SPREAD_QUANTILE, MAX_REFERENCE_BYTES};
        let mut checkpoint = tiny_checkpoint();
        let condition = TaskBatch::features(Tensor::zeros([3, 2], (tch::Kind::Float, Device::Cpu)));
        let seeds = [11u64, 12, 13];
        let sampler = SamplerKind::ddim(10, 0.0);
        let first = checkpoint.generate(&condition, &seeds, sampler, 1.0);
        // Without a zoo reference nothing is scored or redrawn.
        let (same, none) = redraw_near_copies(
            &checkpoint,
            first.copy(),
            &condition,
            &seeds,
            &[8; 3],
            sampler,
            1.0,
        );
        assert!(none.is_none() && same.equal(&first));
        // The reference holds a zoo and, among it, the first draw of sample 0:
        // that sample is a copy of a zoo model.
        let zoo = checkpoint.stats.denormalize(
            &crate::rng::SeededNoise::new(&[8], 1)
                .draw(&[30, first.size()[1]], Device::Cpu)
                .squeeze_dim(0),
        );
        let reference = Tensor::cat(&[zoo.to_kind(tch::Kind::Float), first.narrow(0, 0, 1)], 0);
        checkpoint.zoo_reference =
            ZooReference::fit(&reference, MAX_REFERENCE_BYTES, DEFAULT_SPREAD_QUANTILE);
        let spread = checkpoint.zoo_reference.as_ref().unwrap().spread;
        let scores = checkpoint.zoo_reference.as_ref().unwrap().nearest(&first);
        assert!(spread.too_close(&scores[0]), "{scores:?} {spread:?}");
        assert!(!spread.too_close(&scores[1]) && !spread.too_close(&scores[2]));

        // Budget 0 (the default): the copy is reported, not redrawn.
        let (kept, nearness) = redraw_near_copies(
            &checkpoint,
            first.copy(),
            &condition,
            &seeds,
            &[0; 3],
            sampler,
            1.0,
        );
        let nearness = nearness.unwrap();
        assert!(kept.equal(&first));
        assert!(nearness[0].too_close && nearness[0].redraws == 0);
        assert!((nearness[0].nearness.cosine - 1.0).abs() < 1e-4);

        // With a budget, sample 0 is redrawn once from its redraw seed; the
        // others are untouched.
        let (guarded_flat, nearness) = redraw_near_copies(
            &checkpoint,
            first.copy(),
            &condition,
            &seeds,
            &[2; 3],
            sampler,
            1.0,
        );
        let nearness = nearness.unwrap();
        assert_eq!(
            nearness
                .iter()
                .map(|n| (n.redraws, n.too_close))
                .collect::<Vec<_>>(),
            vec![(1, false), (0, false), (0, false)]
        );
        let redrawn = checkpoint.generate(
            &TaskBatch::features(Tensor::zeros([1, 2], (tch::Kind::Float, Device::Cpu))),
            &[redraw_seed(11, 1)],
            sampler,
            1.0,
        );
        assert!(
            guarded_flat
                .narrow(0, 0, 1)
                .allclose(&redrawn, 1e-6, 1e-6, false)
        );
        assert!(guarded_flat.narrow(0, 1, 2).equal(&first.narrow(0, 1, 2)));
        assert_ne!(redraw_seed(11, 1), redraw_seed(11, 2));
    }
}
