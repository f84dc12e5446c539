//! Per-dimension standardization over a zoo, as in the proposal:
//! w̃_ij = (w_ij − μ_j)/σ_j with μ_j = (1/N) Σ_i w_ij and the population
//! σ_j² = (1/N) Σ_i (w_ij − μ_j)², floored so that dimensions that never vary
//! do not divide by zero. Computed and applied in f64, so that
//! denormalize(normalize(w)) gives back f32 weights bit for bit.

use tch::{Kind, Tensor};

use super::arch::ArchSpec;

/// Default floor on σ_j: a dimension whose spread over the zoo is below it
/// (e.g. identical in every model of a shared-init zoo) is treated as having
/// σ_j = 1e-6, so it normalizes to ~0 and denormalizes back to μ_j.
pub const DEFAULT_STD_FLOOR: f64 = 1e-6;

/// Which statistics are pooled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StatsMode {
    /// μ_j, σ_j per dimension (the proposal).
    #[default]
    PerDimension,
    /// One μ, σ per layer, shared by its dimensions.
    PerLayer,
    /// Per dimension, then pooled over each hidden layer's units slot by
    /// slot (`NeuronLayout`): units share their statistics, so permuting
    /// them commutes with standardizing — what a permutation-equivariant
    /// denoiser needs to stay equivariant in weight space.
    PerUnitSlot,
}

/// μ and σ (each [D], f64, CPU).
#[derive(Debug)]
pub struct Stats {
    /// Mean per dimension.
    pub mean: Tensor,
    /// Floored population standard deviation per dimension.
    pub std: Tensor,
    /// How they were pooled.
    pub mode: StatsMode,
    /// The floor applied to σ.
    pub floor: f64,
}

impl Clone for Stats {
    fn clone(&self) -> Self {
        Self {
            mean: self.mean.copy(),
            std: self.std.copy(),
            mode: self.mode,
            floor: self.floor,
        }
    }
}

impl Stats {
    /// Fits μ, σ to a zoo `[N, D]` (N ≥ 1).
    pub fn fit(zoo: &Tensor, mode: StatsMode, spec: &ArchSpec, floor: f64) -> Self {
        let zoo = zoo.to_kind(Kind::Double).to_device(tch::Device::Cpu);
        let per_dimension = || {
            let mean = zoo.mean_dim(0, false, Kind::Double);
            let var = (&zoo - &mean).square().mean_dim(0, false, Kind::Double);
            (mean, var)
        };
        let (mean, std) = match mode {
            StatsMode::PerDimension => {
                let (mean, var) = per_dimension();
                (mean, var.sqrt())
            }
            StatsMode::PerUnitSlot => {
                let (mean, var) = per_dimension();
                match super::NeuronLayout::new(spec) {
                    Ok(layout) => {
                        let average = |t: &Tensor| t.mean_dim(0, true, Kind::Double);
                        let pooled_mean = super::pool_over_units(&layout.groups, &mean, average);
                        let second =
                            super::pool_over_units(&layout.groups, &(var + mean.square()), average);
                        let var = (second - pooled_mean.square()).clamp_min(0.0);
                        (pooled_mean, var.sqrt())
                    }
                    // An architecture without hidden units keeps per-dimension statistics.
                    Err(_) => (mean, var.sqrt()),
                }
            }
            StatsMode::PerLayer => {
                let d = zoo.size()[1];
                let mean = Tensor::zeros([d], (Kind::Double, tch::Device::Cpu));
                let std = Tensor::zeros([d], (Kind::Double, tch::Device::Cpu));
                for (_, ranges) in spec.layer_ranges() {
                    let parts: Vec<Tensor> = ranges
                        .iter()
                        .map(|r| zoo.narrow(1, r.start as i64, (r.end - r.start) as i64))
                        .collect();
                    let values = Tensor::cat(&parts, 1);
                    let m = values.mean(Kind::Double);
                    let s = (&values - &m).square().mean(Kind::Double).sqrt();
                    for r in ranges {
                        let len = (r.end - r.start) as i64;
                        mean.narrow(0, r.start as i64, len)
                            .copy_(&m.expand([len], false));
                        std.narrow(0, r.start as i64, len)
                            .copy_(&s.expand([len], false));
                    }
                }
                (mean, std)
            }
        };
        Self {
            mean,
            std: std.clamp_min(floor),
            mode,
            floor,
        }
    }

    /// D, the number of weights standardized.
    pub fn dim(&self) -> i64 {
        self.mean.size()[0]
    }

    /// w̃ = (w − μ)/σ for `w` of shape [..., D], computed in f64 (returned in f64,
    /// on `w`'s device).
    pub fn normalize(&self, w: &Tensor) -> Tensor {
        let device = w.device();
        (w.to_kind(Kind::Double) - self.mean.to_device(device)) / self.std.to_device(device)
    }

    /// w = μ + σ ⊙ w̃, computed in f64 and returned as f32.
    pub fn denormalize(&self, w_tilde: &Tensor) -> Tensor {
        let device = w_tilde.device();
        (w_tilde.to_kind(Kind::Double) * self.std.to_device(device) + self.mean.to_device(device))
            .to_kind(Kind::Float)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ArchSpec {
        ArchSpec::sequential_mlp("m", "", &[3, 2, 1]).unwrap()
    }

    #[test]
    fn fits_the_population_moments_and_floors_constant_dimensions() {
        let zoo = Tensor::from_slice2(&[
            [1.0f32, 2.0, 5.0, 0.5, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
            [3.0, 2.0, 7.0, 0.5, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        ]);
        let stats = Stats::fit(&zoo, StatsMode::PerDimension, &spec(), DEFAULT_STD_FLOOR);
        assert_eq!(stats.mean.double_value(&[0]), 2.0);
        assert_eq!(stats.std.double_value(&[0]), 1.0); // population σ, not sample
        assert_eq!(stats.std.double_value(&[1]), DEFAULT_STD_FLOOR);
        let normalized = stats.normalize(&zoo);
        assert_eq!(normalized.double_value(&[0, 0]), -1.0);
        assert_eq!(normalized.double_value(&[1, 1]), 0.0);
    }

    #[test]
    fn normalize_then_denormalize_is_bit_exact() {
        tch::manual_seed(7);
        let zoo = Tensor::randn([50, 11], (Kind::Float, tch::Device::Cpu)) * 3.7 + 0.25;
        for mode in [StatsMode::PerDimension, StatsMode::PerLayer] {
            let stats = Stats::fit(&zoo, mode, &spec(), DEFAULT_STD_FLOOR);
            let back = stats.denormalize(&stats.normalize(&zoo));
            assert!(back.equal(&zoo), "{mode:?}");
            // Normalized zoo has zero mean and unit population variance.
            let n = stats.normalize(&zoo);
            if mode == StatsMode::PerDimension {
                assert!(
                    n.mean_dim(0, false, Kind::Double)
                        .abs()
                        .max()
                        .double_value(&[])
                        < 1e-12
                );
                let var = n.square().mean_dim(0, false, Kind::Double);
                assert!((var - 1.0).abs().max().double_value(&[]) < 1e-12);
            }
        }
    }

    #[test]
    fn per_layer_stats_are_shared_within_a_layer() {
        tch::manual_seed(8);
        let zoo = Tensor::randn([20, 11], (Kind::Float, tch::Device::Cpu));
        let stats = Stats::fit(&zoo, StatsMode::PerLayer, &spec(), DEFAULT_STD_FLOOR);
        // Layer "0" holds dims 0..8 (weight 2x3 + bias 2), layer "2" dims 8..11.
        let m0 = stats.mean.double_value(&[0]);
        assert!((0..8).all(|j| stats.mean.double_value(&[j]) == m0));
        assert_ne!(stats.mean.double_value(&[8]), m0);
    }

    #[test]
    fn unit_slot_stats_pool_units_and_commute_with_their_permutation() {
        tch::manual_seed(9);
        // Units of [3, 2, 1]: unit 0 reads 0, 1, 2 (row), 6 (bias), 8 (out);
        // unit 1 reads 3, 4, 5, 7, 9; the output bias 10 is nobody's.
        let zoo = Tensor::randn([30, 11], (Kind::Double, tch::Device::Cpu))
            * Tensor::arange(11, (Kind::Double, tch::Device::Cpu))
            + 1.0;
        let stats = Stats::fit(&zoo, StatsMode::PerUnitSlot, &spec(), DEFAULT_STD_FLOOR);
        for (a, b) in [(0, 3), (2, 5), (6, 7), (8, 9)] {
            assert_eq!(stats.mean.double_value(&[a]), stats.mean.double_value(&[b]));
            assert_eq!(stats.std.double_value(&[a]), stats.std.double_value(&[b]));
            // The moments of both units' values together.
            let both = Tensor::cat(&[zoo.select(1, a), zoo.select(1, b)], 0);
            let gap =
                stats.std.double_value(&[a]) - both.std_dim(0, false, false).double_value(&[]);
            assert!(gap.abs() < 1e-9, "{a}, {b}: {gap}");
        }
        let per_dim = Stats::fit(&zoo, StatsMode::PerDimension, &spec(), DEFAULT_STD_FLOOR);
        assert_eq!(
            stats.std.double_value(&[10]),
            per_dim.std.double_value(&[10])
        );
        let layout = super::super::NeuronLayout::new(&spec()).unwrap();
        let swapped = layout.permute(&zoo, 0, &[1, 0]);
        let gap = (stats.normalize(&swapped) - layout.permute(&stats.normalize(&zoo), 0, &[1, 0]))
            .abs()
            .max()
            .double_value(&[]);
        assert_eq!(gap, 0.0);
        let back = stats.denormalize(&stats.normalize(&zoo.to_kind(Kind::Float)));
        assert!(back.equal(&zoo.to_kind(Kind::Float)));
    }
}
