//! Novelty: how close generated models sit to the zoo they came from,
//! against how close zoo models sit to each other (Zeng et al. 2025). All
//! in the zoo's weight space — aligned to its first model when the zoo was
//! aligned, the shared initialization's frame otherwise — on weights
//! centered by the zoo mean. Generated models are brought into an aligned
//! zoo's frame first ([`ZooFrame`]): a sampler need not generate in it (the
//! unit transformer, equivariant to unit permutations, does not).

use tch::{Kind, Tensor};

use super::inits::flat_of;
use crate::weights::{ArchSpec, PermutationSpec, align, align::DEFAULT_MAX_SWEEPS, unflatten};

/// An aligned zoo's permutation frame: its first model, which every other
/// was aligned to.
pub struct ZooFrame {
    arch: ArchSpec,
    permutations: PermutationSpec,
    reference: Vec<Tensor>,
}

impl ZooFrame {
    /// The frame of `reference` (a flat model of `arch`); None where the
    /// architecture has no unit permutations.
    pub fn new(arch: &ArchSpec, reference: &Tensor) -> Option<Self> {
        Some(Self {
            permutations: PermutationSpec::new(arch).ok()?,
            reference: tensors(arch, reference)?,
            arch: arch.clone(),
        })
    }

    /// A model's tensors (in `ArchSpec` order) with its units permuted to
    /// match the reference (the same function), flat.
    pub fn align(&self, params: &[Tensor]) -> Tensor {
        let (aligned, _) = align(
            &self.permutations,
            &self.reference,
            params,
            DEFAULT_MAX_SWEEPS,
        );
        flat_of(&aligned)
    }

    /// [`Self::align`] for a flat `model` [D].
    pub fn align_flat(&self, model: &Tensor) -> Tensor {
        match tensors(&self.arch, model) {
            Some(params) => self.align(&params),
            None => model.shallow_clone(),
        }
    }
}

fn tensors(arch: &ArchSpec, flat: &Tensor) -> Option<Vec<Tensor>> {
    let named = unflatten(arch, &flat.to_kind(Kind::Float)).ok()?;
    Some(named.into_iter().map(|(_, t)| t).collect())
}

/// A model's nearest zoo model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Nearest {
    /// Row of the zoo model.
    pub row: i64,
    /// Cosine similarity of the centered weights.
    pub cosine: f64,
    /// Euclidean distance of the weights.
    pub l2: f64,
}

fn unit_rows(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2.0, [1], true).clamp_min(1e-12)
}

/// For each row of `models` [B, D], the zoo model (rows of `zoo` [N, D])
/// with the highest cosine similarity after subtracting `center` [D];
/// `exclude[i]` (zoo-to-zoo) is a row model i may not pick.
pub fn nearest_zoo(
    models: &Tensor,
    zoo: &Tensor,
    center: &Tensor,
    exclude: Option<&[i64]>,
) -> Vec<Nearest> {
    tch::no_grad(|| {
        let models = models.to_kind(Kind::Double);
        let zoo = zoo.to_kind(Kind::Double);
        let center = center.to_kind(Kind::Double);
        let sims = unit_rows(&(&models - &center)).matmul(&unit_rows(&(&zoo - &center)).tr());
        if let Some(exclude) = exclude {
            for (i, &row) in exclude.iter().enumerate() {
                let _ = sims.get(i as i64).get(row).fill_(f64::NEG_INFINITY);
            }
        }
        let (best, rows) = sims.max_dim(1, false);
        (0..models.size()[0])
            .map(|i| {
                let row = rows.int64_value(&[i]);
                Nearest {
                    row,
                    cosine: best.double_value(&[i]),
                    l2: (models.get(i) - zoo.get(row)).norm().double_value(&[]),
                }
            })
            .collect()
    })
}

/// Mean cosine similarity over distinct pairs of centered `models` [B, D]
/// (the proposal's diversity figure; NaN for fewer than two).
pub fn mean_pairwise_cosine(models: &Tensor, center: &Tensor) -> f64 {
    let b = models.size()[0];
    if b < 2 {
        return f64::NAN;
    }
    tch::no_grad(|| {
        let u = unit_rows(&(models.to_kind(Kind::Double) - center.to_kind(Kind::Double)));
        let sims = u.matmul(&u.tr());
        let off_diagonal = sims.sum(Kind::Double).double_value(&[]) - b as f64;
        off_diagonal / (b * (b - 1)) as f64
    })
}

/// Share of inputs on which two classifiers' outputs [B, C] pick the same
/// class.
pub fn agreement(outputs_a: &Tensor, outputs_b: &Tensor) -> f64 {
    outputs_a
        .argmax(1, false)
        .eq_tensor(&outputs_b.argmax(1, false))
        .to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn a_copy_is_nearest_to_its_original_and_zoo_rows_skip_themselves() {
        let zoo = Tensor::randn([20, 50], (Kind::Float, Device::Cpu));
        let center = zoo.mean_dim(0, false, Kind::Float);
        let copy = zoo.get(7).unsqueeze(0);
        let n = nearest_zoo(&copy, &zoo, &center, None);
        assert_eq!(n[0].row, 7);
        assert!((n[0].cosine - 1.0).abs() < 1e-9);
        assert!(n[0].l2 < 1e-5);
        let rows: Vec<i64> = (0..20).collect();
        let own = nearest_zoo(&zoo, &zoo, &center, Some(&rows));
        assert!(own.iter().enumerate().all(|(i, n)| n.row != i as i64));
        assert!(own.iter().all(|n| n.cosine < 0.9));
        // Identical models are perfectly similar; opposite ones are not.
        let same = Tensor::cat(&[&copy, &copy], 0);
        assert!((mean_pairwise_cosine(&same, &center) - 1.0).abs() < 1e-9);
        let a = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0]).reshape([2, 2]);
        let b = Tensor::from_slice(&[2.0f32, 0.0, 1.0, 0.0]).reshape([2, 2]);
        assert_eq!(agreement(&a, &b), 0.5);
    }

    #[test]
    fn a_model_in_another_frame_is_brought_into_the_zoos() {
        let spec = ArchSpec::sequential_mlp("m", "", &[4, 6, 2]).unwrap();
        let layout = crate::weights::NeuronLayout::new(&spec).unwrap();
        // Its own stream: torch's global generator is shared with other tests.
        let reference = crate::rng::SeededNoise::new(&[4], 0)
            .draw(&[spec.num_parameters() as i64], tch::Device::Cpu)
            .squeeze_dim(0);
        let frame = ZooFrame::new(&spec, &reference).unwrap();
        let permuted = layout.permute(&reference, 0, &[5, 3, 1, 0, 2, 4]);
        assert!(!permuted.equal(&reference));
        assert!(frame.align_flat(&permuted).equal(&reference));
    }
}
