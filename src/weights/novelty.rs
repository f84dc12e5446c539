//! The memorization guard: how near a generated weight vector lies to the
//! zoo it was learned from. A checkpoint carries a reference copy of its
//! training zoo (`ZooReference`) and the zoo's own nearest-neighbour spread;
//! every sample is scored by its cosine (to the zoo mean, as in the
//! p-diff / SANE novelty checks) and L2 distance to its nearest zoo model,
//! and flagged when it is closer than the zoo's models usually are to each
//! other — a near-copy rather than a new solution.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Quantile of the zoo's leave-one-out nearest-neighbour cosines (and the
/// complementary one of L2 distances) a sample must not pass: a sample
/// nearer to a zoo model than 95 % of zoo models are to theirs is flagged.
pub const DEFAULT_SPREAD_QUANTILE: f64 = 0.95;
/// Most bytes of zoo weights a checkpoint carries as its reference (f32);
/// larger zoos are subsampled evenly, which can only make samples look
/// farther from the zoo than they are (a fewer-models reference).
pub const MAX_REFERENCE_BYTES: i64 = 64 << 20;
/// Rows scored against the reference at once (bounds the [rows, N] matrix).
const SCORE_CHUNK: i64 = 1024;

/// How near one weight vector lies to its nearest zoo model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Nearness {
    /// Largest cosine between (w − μ) and a zoo model's (z − μ), μ the zoo
    /// mean: 1 is a copy up to scale.
    pub cosine: f64,
    /// Smallest L2 distance to a zoo model, in the architecture's units.
    pub l2: f64,
}

/// What "too close" means for one zoo: its models' leave-one-out
/// nearest-neighbour cosine and L2 at the spread quantile.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ZooSpread {
    /// A sample whose nearest-zoo cosine is above this is too close.
    pub cosine: f64,
    /// A sample whose nearest-zoo L2 is below this is too close.
    pub l2: f64,
    /// The quantile the bounds were taken at.
    pub quantile: f64,
    /// Mean leave-one-out nearest-neighbour cosine of the zoo (what the
    /// samples' mean is compared with).
    pub mean_cosine: f64,
}

impl ZooSpread {
    /// Whether `n` is closer to a zoo model than the zoo's spread allows.
    pub fn too_close(&self, n: &Nearness) -> bool {
        n.cosine > self.cosine || n.l2 < self.l2
    }
}

/// A zoo's weights kept to score samples against.
#[derive(Debug)]
pub struct ZooReference {
    /// Zoo weights [N, D] (f32, architecture units).
    pub weights: Tensor,
    /// The zoo mean [D] the cosines are centred on.
    pub mean: Tensor,
    /// The zoo's own nearest-neighbour spread.
    pub spread: ZooSpread,
}

impl ZooReference {
    /// A reference of `zoo` [N, D] (architecture units), at most
    /// `max_bytes` of f32 rows (evenly subsampled), with its spread at
    /// `quantile`. `None` for fewer than two models.
    pub fn fit(zoo: &Tensor, max_bytes: i64, quantile: f64) -> Option<Self> {
        let zoo = zoo.to_kind(Kind::Float).to_device(tch::Device::Cpu);
        let (n, d) = (zoo.size()[0], zoo.size()[1]);
        let keep = (max_bytes / (4 * d.max(1))).clamp(2, n.max(2));
        if n < 2 {
            return None;
        }
        let weights = if keep < n {
            let rows: Vec<i64> = (0..keep).map(|i| i * n / keep).collect();
            zoo.index_select(0, &Tensor::from_slice(&rows))
        } else {
            zoo
        };
        let mean = weights.mean_dim(0, false, Kind::Float);
        let mut reference = Self {
            weights,
            mean,
            spread: ZooSpread {
                cosine: 1.0,
                l2: 0.0,
                quantile,
                mean_cosine: 1.0,
            },
        };
        let own = reference.nearest_excluding_self();
        let mut cosines: Vec<f64> = own.iter().map(|n| n.cosine).collect();
        let mut l2s: Vec<f64> = own.iter().map(|n| n.l2).collect();
        cosines.sort_by(f64::total_cmp);
        l2s.sort_by(f64::total_cmp);
        reference.spread = ZooSpread {
            cosine: quantile_of(&cosines, quantile),
            l2: quantile_of(&l2s, 1.0 - quantile),
            quantile,
            mean_cosine: cosines.iter().sum::<f64>() / cosines.len() as f64,
        };
        Some(reference)
    }

    /// Models in the reference.
    pub fn len(&self) -> i64 {
        self.weights.size()[0]
    }

    /// Whether the reference holds no models.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Nearness of each row of `samples` [B, D] (architecture units).
    pub fn nearest(&self, samples: &Tensor) -> Vec<Nearness> {
        self.score(samples, None)
    }

    /// Each reference model's nearness to the others (leave-one-out).
    fn nearest_excluding_self(&self) -> Vec<Nearness> {
        self.score(&self.weights, Some(0))
    }

    /// Nearness of `samples`; with `self_offset`, row i of `samples` is
    /// reference row `self_offset + i` and is not its own neighbour.
    fn score(&self, samples: &Tensor, self_offset: Option<i64>) -> Vec<Nearness> {
        tch::no_grad(|| {
            // f64: the distance comes from |a|² + |b|² − 2a·b, which in f32
            // loses the small distances that matter here (a near-copy).
            let samples = samples
                .to_kind(Kind::Double)
                .to_device(self.weights.device());
            let mean = self.mean.to_kind(Kind::Double);
            let zoo = self.weights.to_kind(Kind::Double) - &mean;
            let zoo_norm = zoo.square().sum_dim_intlist(1, false, Kind::Double);
            let zoo_unit = &zoo / zoo_norm.sqrt().clamp_min(1e-12).unsqueeze(1);
            let rows = samples.size()[0];
            let mut out = Vec::with_capacity(rows as usize);
            let mut start = 0;
            while start < rows {
                let len = SCORE_CHUNK.min(rows - start);
                let chunk = samples.narrow(0, start, len) - &mean;
                let chunk_norm = chunk.square().sum_dim_intlist(1, false, Kind::Double);
                let dots = chunk.matmul(&zoo.tr());
                let mut cosine =
                    chunk.matmul(&zoo_unit.tr()) / chunk_norm.sqrt().clamp_min(1e-12).unsqueeze(1);
                let mut squared = chunk_norm.unsqueeze(1) + zoo_norm.unsqueeze(0) - dots * 2.0;
                if let Some(offset) = self_offset {
                    let own = Tensor::arange_start(
                        offset + start,
                        offset + start + len,
                        (Kind::Int64, cosine.device()),
                    )
                    .unsqueeze(1);
                    cosine = cosine.scatter_value(1, &own, f64::NEG_INFINITY);
                    squared = squared.scatter_value(1, &own, f64::INFINITY);
                }
                let best_cos =
                    Vec::<f64>::try_from(cosine.amax(&[1i64][..], false).to_kind(Kind::Double))
                        .unwrap_or_default();
                let best_l2 = Vec::<f64>::try_from(
                    squared
                        .amin(&[1i64][..], false)
                        .clamp_min(0.0)
                        .sqrt()
                        .to_kind(Kind::Double),
                )
                .unwrap_or_default();
                out.extend(
                    best_cos
                        .into_iter()
                        .zip(best_l2)
                        .map(|(cosine, l2)| Nearness { cosine, l2 }),
                );
                start += len;
            }
            out
        })
    }
}

/// The `q` quantile of sorted `values` (nearest rank).
fn quantile_of(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Draws of its own stream: torch's global generator is shared with
    /// tests running beside this one.
    fn zoo(n: i64, d: i64, seed: i64) -> Tensor {
        crate::rng::SeededNoise::new(&[seed as u64], 0)
            .draw(&[n, d], tch::Device::Cpu)
            .squeeze_dim(0)
            + 3.0
    }

    #[test]
    fn a_copy_of_a_zoo_model_is_too_close_and_a_fresh_draw_is_not() {
        let weights = zoo(64, 32, 1);
        let reference = ZooReference::fit(&weights, MAX_REFERENCE_BYTES, 0.95).unwrap();
        assert_eq!(reference.len(), 64);
        let spread = reference.spread;
        // Independent Gaussian models in 32 dimensions are far from each
        // other: the leave-one-out neighbour is never the model itself.
        assert!(spread.cosine < 0.9, "{spread:?}");
        assert!(spread.l2 > 1.0, "{spread:?}");
        assert!(spread.mean_cosine <= spread.cosine);

        let copy = weights.narrow(0, 5, 1);
        let near = reference.nearest(&copy)[0];
        assert!((near.cosine - 1.0).abs() < 1e-4, "{near:?}");
        assert!(near.l2 < 1e-3, "{near:?}");
        assert!(spread.too_close(&near));
        // A scaled copy (about the zoo mean) has the same cosine.
        let scaled = (&copy - &reference.mean) * 2.0 + &reference.mean;
        let near = reference.nearest(&scaled)[0];
        assert!(
            (near.cosine - 1.0).abs() < 1e-4 && near.l2 > 1.0,
            "{near:?}"
        );
        assert!(spread.too_close(&near));

        // Fresh draws from the zoo's own distribution are flagged about as
        // often as the spread quantile says (5 %), not as copies. A large zoo
        // keeps the mean's pull on its own members' cosines (1/N) small.
        let big = zoo(1000, 32, 2);
        let reference = ZooReference::fit(&big, MAX_REFERENCE_BYTES, 0.95).unwrap();
        let fresh = zoo(200, 32, 3);
        let scores = reference.nearest(&fresh);
        assert_eq!(scores.len(), 200);
        let flagged = scores
            .iter()
            .filter(|n| reference.spread.too_close(n))
            .count();
        assert!(
            (1..=30).contains(&flagged),
            "{flagged} of 200 fresh draws flagged"
        );
    }

    #[test]
    fn large_zoos_are_subsampled_to_the_byte_limit() {
        let weights = zoo(100, 50, 3);
        let reference = ZooReference::fit(&weights, 4 * 50 * 10, 0.95).unwrap();
        assert_eq!(reference.len(), 10);
        // Kept rows are zoo rows: the first (row 0) is found exactly.
        let near = reference.nearest(&weights.narrow(0, 0, 1))[0];
        assert!(near.l2 < 1e-3);
        assert!(ZooReference::fit(&weights.narrow(0, 0, 1), MAX_REFERENCE_BYTES, 0.95).is_none());
    }
}
