//! The sampling a denoiser recommends: which sampler, how many steps and
//! what guidance scale gave its best weights on its validation tasks. The
//! training gate chooses it among a few candidates ([`CANDIDATES`]) and the
//! checkpoint carries it; serving fills the fields a request leaves unset
//! from it. Denoisers differ here: a v-prediction denoiser of a zoo trained
//! from one shared init is best sampled by one x̂₀ step from pure noise
//! (its conditional mean), a digits denoiser by guided DDIM-10
//! (docs/RESULTS.md).

use serde::{Deserialize, Serialize};

use super::SamplerKind;

/// A recommendation's reverse process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecommendedSampler {
    /// Deterministic DDIM on its default (leading) grid.
    Ddim,
    /// DPM-Solver++(2M) on the trailing grid (one step: x̂₀ at t = T).
    DpmSolver,
}

/// Sampler, steps and guidance scale.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RecommendedSampling {
    /// The reverse process.
    pub sampler: RecommendedSampler,
    /// Its steps.
    pub steps: usize,
    /// Classifier-free guidance scale.
    pub guidance: f64,
}

/// What the gate tries, cheapest first (denoiser calls: 1, 10, 20, 20 when
/// guided; `None` stands for the gate's own guidance scale).
pub const CANDIDATES: [(RecommendedSampler, usize, Option<f64>); 4] = [
    (RecommendedSampler::DpmSolver, 1, Some(1.0)),
    (RecommendedSampler::Ddim, 10, Some(1.0)),
    (RecommendedSampler::Ddim, 10, None),
    (RecommendedSampler::DpmSolver, 10, None),
];

/// A more expensive candidate replaces a cheaper one only when it beats it
/// by more than this: accuracy points, or the log of the MSE ratio.
pub const IMPROVEMENT_MARGIN: f64 = 0.002;

impl RecommendedSampling {
    /// The sampler to run.
    pub fn kind(&self) -> SamplerKind {
        match self.sampler {
            RecommendedSampler::Ddim => SamplerKind::ddim(self.steps, 0.0),
            RecommendedSampler::DpmSolver => SamplerKind::DpmSolver { steps: self.steps },
        }
    }

    /// A short label for summaries and logs, e.g. "ddim10_g3".
    pub fn label(&self) -> String {
        let name = match self.sampler {
            RecommendedSampler::Ddim => "ddim",
            RecommendedSampler::DpmSolver => "dpm",
        };
        format!("{name}{}_g{}", self.steps, self.guidance)
    }

    /// The candidates with the gate's guidance scale filled in (and steps
    /// capped at T), without repeats.
    pub fn candidates(guidance: f64, timesteps: usize) -> Vec<Self> {
        let mut out: Vec<Self> = Vec::new();
        for (sampler, steps, scale) in CANDIDATES {
            let candidate = Self {
                sampler,
                steps: steps.min(timesteps).max(1),
                guidance: scale.unwrap_or(guidance),
            };
            // DDIM's one-step grid is t = 1 (see `DdimSpacing`): never a candidate.
            let usable = !(sampler == RecommendedSampler::Ddim && candidate.steps < 2);
            if usable && !out.contains(&candidate) {
                out.push(candidate);
            }
        }
        out
    }

    /// The best of scored candidates (in [`Self::candidates`]' order,
    /// cheapest first): a later one must beat the best so far by
    /// [`IMPROVEMENT_MARGIN`]. `higher_is_better` for accuracy; MSEs are
    /// compared by their logarithm. Non-finite scores never win.
    pub fn choose(scored: &[(Self, f64)], higher_is_better: bool) -> Option<Self> {
        let utility = |score: f64| {
            if higher_is_better {
                score
            } else {
                -score.max(f64::MIN_POSITIVE).ln()
            }
        };
        let mut best: Option<(Self, f64)> = None;
        for &(candidate, score) in scored {
            // (`f64::max` would turn a NaN MSE into the best possible one.)
            if !score.is_finite() {
                continue;
            }
            let u = utility(score);
            match best {
                Some((_, b)) if u <= b + IMPROVEMENT_MARGIN => {}
                _ => best = Some((candidate, u)),
            }
        }
        best.map(|(c, _)| c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_fill_in_the_gate_guidance_and_drop_repeats() {
        let labels = |g, t| {
            RecommendedSampling::candidates(g, t)
                .iter()
                .map(RecommendedSampling::label)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            labels(3.0, 1000),
            ["dpm1_g1", "ddim10_g1", "ddim10_g3", "dpm10_g3"]
        );
        assert_eq!(labels(1.0, 1000), ["dpm1_g1", "ddim10_g1", "dpm10_g1"]);
        // T = 1: DDIM's single step would start at t = 1 from pure noise.
        assert_eq!(labels(1.0, 1), ["dpm1_g1"]);
    }

    #[test]
    fn the_cheapest_wins_unless_beaten_by_the_margin() {
        let c = RecommendedSampling::candidates(3.0, 1000);
        let acc = [(c[0], 0.907), (c[1], 0.909), (c[2], 0.919), (c[3], 0.920)];
        assert_eq!(RecommendedSampling::choose(&acc, true), Some(c[2]));
        let mse = [(c[0], 0.55), (c[1], 3.05), (c[2], 3.92), (c[3], f64::NAN)];
        assert_eq!(RecommendedSampling::choose(&mse, false), Some(c[0]));
        let nothing = [(c[0], f64::NAN)];
        assert_eq!(RecommendedSampling::choose(&nothing, true), None);
        assert_eq!(
            c[0].kind(),
            SamplerKind::DpmSolver { steps: 1 },
            "one DPM-Solver step"
        );
    }
}
