//! An optional linear (PCA) latent of the standardized weights: diffusion
//! can run on z = ((w̃ − m) Vₖᵀ)/s instead of w̃ ∈ R^D. Components come from
//! an exact SVD, or a randomized one (Halko et al. 2011) when D is large.
//! Each latent coordinate is scaled to unit variance over the zoo, but a
//! component whose spread is negligible is not blown up: its scale is
//! floored at `RELATIVE_SCALE_FLOOR` times the largest.
//!
//! The latent size is chosen by what matters — how well the *reconstructed*
//! zoo models still perform their tasks — not by variance explained: see
//! [`choose_latent_size`].

use tch::{Kind, Tensor};

use crate::rng::SeededNoise;

/// Floor of a component's scale relative to the largest one.
pub const RELATIVE_SCALE_FLOOR: f64 = 1e-3;
/// Above this D (with N > k) the randomized SVD is used.
pub const RANDOMIZED_SVD_MIN_DIM: i64 = 20_000;
/// Extra random directions of the randomized SVD.
const OVERSAMPLING: i64 = 10;
/// Power iterations of the randomized SVD.
const POWER_ITERATIONS: i64 = 4;

/// A fitted PCA latent.
#[derive(Debug)]
pub struct PcaLatent {
    /// Mean of the standardized zoo [D].
    pub mean: Tensor,
    /// Principal directions [k, D], orthonormal rows.
    pub components: Tensor,
    /// Per-coordinate scale [k] (floored standard deviation).
    pub scales: Tensor,
    /// Share of the zoo's variance each component explains.
    pub explained: Vec<f64>,
}

impl PcaLatent {
    /// Fits k components to a standardized zoo [N, D] (f32, CPU or GPU).
    pub fn fit(zoo: &Tensor, k: i64, seed: u64) -> Self {
        let zoo = zoo.to_kind(Kind::Float);
        let (n, d) = (zoo.size()[0], zoo.size()[1]);
        let k = k.min(n).min(d).max(1);
        let mean = zoo.mean_dim(0, false, Kind::Float);
        let centered = &zoo - &mean;
        let total = centered
            .square()
            .sum(Kind::Double)
            .double_value(&[])
            .max(f64::MIN_POSITIVE);
        let (singular, vt) = if d >= RANDOMIZED_SVD_MIN_DIM && k + OVERSAMPLING < n.min(d) {
            randomized_svd(&centered, k, seed)
        } else {
            let (_, s, vt) = thin_svd(&centered);
            (s.narrow(0, 0, k), vt.narrow(0, 0, k))
        };
        let std = &singular / (n as f64).sqrt();
        let largest = std.max().double_value(&[]).max(f64::MIN_POSITIVE);
        let explained = Vec::<f64>::try_from(singular.square().to_kind(Kind::Double) / total)
            .unwrap_or_default();
        Self {
            mean,
            components: vt.contiguous(),
            scales: std.clamp_min(largest * RELATIVE_SCALE_FLOOR),
            explained,
        }
    }

    /// Latent size k.
    pub fn dim(&self) -> i64 {
        self.components.size()[0]
    }

    /// Share of the zoo's variance the k components explain together.
    pub fn explained_total(&self) -> f64 {
        self.explained.iter().sum()
    }

    /// w̃ [B, D] → z [B, k].
    pub fn encode(&self, w: &Tensor) -> Tensor {
        let device = w.device();
        (w.to_kind(Kind::Float) - self.mean.to_device(device))
            .matmul(&self.components.to_device(device).tr())
            / self.scales.to_device(device)
    }

    /// z [B, k] → w̃ [B, D].
    pub fn decode(&self, z: &Tensor) -> Tensor {
        let device = z.device();
        (z * self.scales.to_device(device)).matmul(&self.components.to_device(device))
            + self.mean.to_device(device)
    }

    /// The first `k` components only (k ≤ dim).
    pub fn truncated(&self, k: i64) -> Self {
        let k = k.clamp(1, self.dim());
        Self {
            mean: self.mean.shallow_clone(),
            components: self.components.narrow(0, 0, k),
            scales: self.scales.narrow(0, 0, k),
            explained: self.explained[..k as usize].to_vec(),
        }
    }
}

/// Thin SVD: (U, S, Vᵀ) with S [min(N, D)] and Vᵀ [min(N, D), D].
fn thin_svd(a: &Tensor) -> (Tensor, Tensor, Tensor) {
    let (u, s, v) = a.svd(true, true);
    (u, s, v.tr())
}

/// Randomized SVD of A [N, D]: top-k singular values [k] and right vectors
/// [k, D], with oversampling and power iterations.
fn randomized_svd(a: &Tensor, k: i64, seed: u64) -> (Tensor, Tensor) {
    let d = a.size()[1];
    let l = k + OVERSAMPLING;
    let omega = SeededNoise::new(&[seed], 0x5bd)
        .draw(&[d, l], a.device())
        .squeeze_dim(0);
    let (mut q, _) = Tensor::linalg_qr(&a.matmul(&omega), "reduced");
    for _ in 0..POWER_ITERATIONS {
        let (z, _) = Tensor::linalg_qr(&a.tr().matmul(&q), "reduced");
        q = Tensor::linalg_qr(&a.matmul(&z), "reduced").0;
    }
    let b = q.tr().matmul(a); // [l, D]
    let (_, s, vt) = thin_svd(&b);
    (s.narrow(0, 0, k), vt.narrow(0, 0, k))
}

/// The function-space quality of one latent size.
#[derive(Debug, Clone, PartialEq)]
pub struct LatentSizeReport {
    /// k, the latent size tried.
    pub size: i64,
    /// Share of variance explained.
    pub explained_variance: f64,
    /// The task metric of the zoo models rebuilt from the latent.
    pub metric: f64,
}

/// Which way the metric improves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricGoal {
    /// Accuracy-like metrics.
    HigherIsBetter,
    /// Loss-like metrics (MSE).
    LowerIsBetter,
}

/// Fits latents of each candidate size to the whole zoo, rebuilds its first
/// `probe` models through each, scores them with `evaluate` (standardized
/// weights [probe, D] → metric, e.g. mean test accuracy after
/// denormalizing), and picks the smallest size whose metric is within
/// `tolerance` (absolute) of the original models'. Returns `None` when no
/// candidate qualifies: diffuse the weights directly.
pub fn choose_latent_size(
    zoo: &Tensor,
    probe: i64,
    candidates: &[i64],
    mut evaluate: impl FnMut(&Tensor) -> f64,
    goal: MetricGoal,
    tolerance: f64,
    seed: u64,
) -> (Option<i64>, f64, Vec<LatentSizeReport>) {
    let probed = zoo.narrow(0, 0, probe.clamp(1, zoo.size()[0]));
    let original = evaluate(&probed);
    let largest = candidates.iter().copied().max().unwrap_or(1);
    let full = PcaLatent::fit(zoo, largest, seed);
    let zoo = &probed;
    let mut sizes: Vec<i64> = candidates.to_vec();
    sizes.sort_unstable();
    sizes.dedup();
    let reports: Vec<LatentSizeReport> = sizes
        .iter()
        .map(|&k| {
            let latent = full.truncated(k);
            let rebuilt = latent.decode(&latent.encode(zoo));
            LatentSizeReport {
                size: latent.dim(),
                explained_variance: latent.explained_total(),
                metric: evaluate(&rebuilt),
            }
        })
        .collect();
    let acceptable = |m: f64| match goal {
        MetricGoal::HigherIsBetter => m >= original - tolerance,
        MetricGoal::LowerIsBetter => m <= original + tolerance,
    };
    let chosen = reports
        .iter()
        .find(|r| acceptable(r.metric))
        .map(|r| r.size);
    (chosen, original, reports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn low_rank_zoo(n: i64, d: i64, rank: i64, seed: u64) -> Tensor {
        let mut noise = SeededNoise::new(&[seed], 1);
        let factors = noise.draw(&[n, rank], Device::Cpu).squeeze_dim(0);
        let basis = noise.draw(&[rank, d], Device::Cpu).squeeze_dim(0);
        factors.matmul(&basis) + noise.draw(&[n, d], Device::Cpu).squeeze_dim(0) * 1e-3
    }

    #[test]
    fn a_low_rank_zoo_round_trips_through_its_latent_with_unit_scales() {
        let zoo = low_rank_zoo(200, 50, 5, 1);
        let latent = PcaLatent::fit(&zoo, 5, 0);
        assert!(latent.explained_total() > 0.999);
        let z = latent.encode(&zoo);
        let var = z.var_dim([0].as_slice(), false, false);
        assert!((var - 1.0).abs().max().double_value(&[]) < 1e-3);
        let err = (latent.decode(&z) - &zoo).abs().max().double_value(&[]);
        assert!(err < 0.02, "{err}");
    }

    #[test]
    fn randomized_svd_finds_the_same_subspace() {
        let zoo = low_rank_zoo(100, 300, 4, 2);
        let centered = &zoo - zoo.mean_dim(0, true, Kind::Float);
        let (s_rand, v_rand) = randomized_svd(&centered, 4, 3);
        let (_, s, vt) = thin_svd(&centered);
        assert!((s_rand - s.narrow(0, 0, 4)).abs().max().double_value(&[]) < 1e-2);
        // Same span: projecting the exact vectors onto the randomized ones keeps them.
        let projected = vt.narrow(0, 0, 4).matmul(&v_rand.tr()).matmul(&v_rand);
        assert!(
            (projected - vt.narrow(0, 0, 4))
                .abs()
                .max()
                .double_value(&[])
                < 1e-3
        );
    }

    #[test]
    fn negligible_components_are_not_whitened_into_huge_values() {
        let zoo = low_rank_zoo(50, 20, 2, 4);
        let latent = PcaLatent::fit(&zoo, 10, 0);
        let largest = latent.scales.max().double_value(&[]);
        assert!(latent.scales.min().double_value(&[]) >= largest * RELATIVE_SCALE_FLOOR * 0.999);
        assert!(latent.encode(&zoo).abs().max().double_value(&[]) < 1e3 * 5.0);
    }

    #[test]
    fn size_is_chosen_by_function_not_variance() {
        // 40 loud dimensions that the "task" ignores, and 10 quiet ones it uses.
        let mut noise = SeededNoise::new(&[5], 2);
        let loud = noise.draw(&[300, 40], Device::Cpu).squeeze_dim(0) * 10.0;
        let quiet = noise.draw(&[300, 10], Device::Cpu).squeeze_dim(0) * 0.3;
        let zoo = Tensor::cat(&[loud, quiet.shallow_clone()], 1);
        // Metric: mean squared error of the quiet part (what the models compute).
        let evaluate = |w: &Tensor| {
            (w.narrow(1, 40, 10) - &quiet)
                .square()
                .mean(Kind::Double)
                .double_value(&[])
        };
        let (chosen, original, reports) = choose_latent_size(
            &zoo,
            300,
            &[10, 40, 45, 50],
            evaluate,
            MetricGoal::LowerIsBetter,
            0.01,
            0,
        );
        assert!(original < 1e-12);
        let at_40 = reports.iter().find(|r| r.size == 40).unwrap();
        assert!(at_40.explained_variance > 0.99, "{reports:?}");
        assert!(
            at_40.metric > 0.05,
            "40 components explain the variance but lose the function: {reports:?}"
        );
        assert_eq!(chosen, Some(50), "{reports:?}");
    }
}
