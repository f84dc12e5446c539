//! Permutation alignment (weight matching, Ainsworth et al. 2023, "Git
//! Re-Basin"): hidden units of an MLP, and channels of a CNN, can be
//! permuted without changing the function. Aligning every zoo model to one
//! reference makes equivalent models look alike in weight space, which is
//! what the diffusion model learns.
//!
//! The permutations are read off the `ArchSpec`: its layers, in order, each
//! hold a weight (rank ≥ 2, outputs first) and optionally a bias; the
//! outputs of layer l are the inputs of layer l + 1, either one to one or,
//! after a flatten, in blocks of equal size (a conv's channels feeding a
//! linear layer). Each permutation is solved in turn as a linear assignment
//! maximizing ⟨reference, permuted model⟩ over the weights it touches, and
//! the sweep repeats until nothing changes.

use pathfinding::prelude::{Matrix, kuhn_munkres};
use tch::{Kind, Tensor};

use super::arch::ArchSpec;

/// Sweeps over all permutations at most.
pub const DEFAULT_MAX_SWEEPS: usize = 20;

/// Why an architecture cannot be aligned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot align architecture {arch:?}: {reason}")]
pub struct AlignError {
    /// The architecture that cannot be aligned.
    pub arch: String,
    /// Why.
    pub reason: String,
}

#[derive(Debug, Clone)]
struct Layer {
    weight: usize,
    bias: Option<usize>,
    outputs: i64,
    /// Inputs per unit of the previous layer (1, or a flattened block).
    block: i64,
}

/// Which tensors each hidden permutation acts on.
#[derive(Debug, Clone)]
pub struct PermutationSpec {
    layers: Vec<Layer>,
}

/// What an alignment did.
#[derive(Debug, Clone, PartialEq)]
pub struct AlignReport {
    /// Sweeps run.
    pub sweeps: usize,
    /// ‖model − reference‖ before and after.
    pub distance_before: f64,
    /// ‖model − reference‖ after the permutation.
    pub distance_after: f64,
}

impl PermutationSpec {
    /// Reads the layer chain off `spec`.
    pub fn new(spec: &ArchSpec) -> Result<Self, AlignError> {
        let error = |reason: String| AlignError {
            arch: spec.name.clone(),
            reason,
        };
        let index = |name: &str| spec.tensors.iter().position(|t| t.name == name);
        let mut layers: Vec<Layer> = Vec::new();
        for group in &spec.layers {
            let mut weight = None;
            let mut bias = None;
            for name in &group.tensors {
                let i = index(name).ok_or_else(|| error(format!("unknown tensor {name:?}")))?;
                match spec.tensors[i].shape.len() {
                    1 if bias.is_none() => bias = Some(i),
                    n if n >= 2 && weight.is_none() => weight = Some(i),
                    _ => {
                        return Err(error(format!(
                            "layer {:?} is not weight + bias",
                            group.name
                        )));
                    }
                }
            }
            let weight =
                weight.ok_or_else(|| error(format!("layer {:?} has no weight", group.name)))?;
            let shape = &spec.tensors[weight].shape;
            let block = match layers.last() {
                None => 1,
                Some(previous) => {
                    let inputs = shape[1] as i64;
                    if inputs % previous.outputs != 0 {
                        return Err(error(format!(
                            "layer {:?} takes {inputs} inputs from {} units",
                            group.name, previous.outputs
                        )));
                    }
                    inputs / previous.outputs
                }
            };
            layers.push(Layer {
                weight,
                bias,
                outputs: shape[0] as i64,
                block,
            });
        }
        if layers.len() < 2 {
            return Err(error("fewer than two layers: nothing to permute".into()));
        }
        Ok(Self { layers })
    }

    /// Number of hidden permutations.
    pub fn num_permutations(&self) -> usize {
        self.layers.len() - 1
    }

    /// The layer chain: per layer its weight's and bias's index in the
    /// spec's tensors, its output units and the inputs it takes per unit of
    /// the previous layer.
    pub(crate) fn chain(&self) -> impl Iterator<Item = (usize, Option<usize>, i64, i64)> + '_ {
        self.layers
            .iter()
            .map(|l| (l.weight, l.bias, l.outputs, l.block))
    }

    /// Weight of layer `l` as [outputs, input units, rest].
    fn units_view(&self, params: &[Tensor], l: usize) -> Tensor {
        let layer = &self.layers[l];
        let w = &params[layer.weight];
        let size = w.size();
        let rest: i64 = size[2..].iter().product::<i64>() * layer.block;
        w.reshape([size[0], size[1] / layer.block, rest])
    }

    /// Applies permutation `k` (`perm[i]` = old unit that becomes unit i)
    /// to the outputs of layer k and the inputs of layer k + 1.
    fn permute(&self, params: &mut [Tensor], k: usize, perm: &Tensor) {
        let layer = &self.layers[k];
        params[layer.weight] = params[layer.weight].index_select(0, perm);
        if let Some(b) = layer.bias {
            params[b] = params[b].index_select(0, perm);
        }
        let next = &self.layers[k + 1];
        let shape = params[next.weight].size();
        params[next.weight] = self
            .units_view(params, k + 1)
            .index_select(1, perm)
            .reshape(shape.as_slice());
    }

    /// Similarity S[i, j] of reference unit i and model unit j over every
    /// weight permutation k touches.
    fn similarity(&self, reference: &[Tensor], model: &[Tensor], k: usize) -> Tensor {
        let layer = &self.layers[k];
        let n = layer.outputs;
        let flat = |t: &Tensor| t.reshape([n, -1]).to_kind(Kind::Double);
        let mut s = flat(&reference[layer.weight]).matmul(&flat(&model[layer.weight]).tr());
        if let Some(b) = layer.bias {
            s += flat(&reference[b]).matmul(&flat(&model[b]).tr());
        }
        // Layer k + 1 seen from its input units: [units, outputs·rest].
        let inputs = |params: &[Tensor]| {
            self.units_view(params, k + 1)
                .transpose(0, 1)
                .reshape([n, -1])
                .to_kind(Kind::Double)
        };
        s + inputs(reference).matmul(&inputs(model).tr())
    }
}

fn distance(a: &[Tensor], b: &[Tensor]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            (x - y)
                .to_kind(Kind::Double)
                .square()
                .sum(Kind::Double)
                .double_value(&[])
        })
        .sum::<f64>()
        .sqrt()
}

/// The linear assignment maximizing Σ S[i, perm[i]].
fn best_assignment(s: &Tensor) -> Vec<i64> {
    let n = s.size()[0] as usize;
    let values = Vec::<f64>::try_from(s.reshape([-1])).unwrap_or_default();
    let scale = values
        .iter()
        .fold(0f64, |m, v| m.max(v.abs()))
        .max(f64::MIN_POSITIVE);
    // Integer weights (the solver needs Ord); 1e12 keeps ~12 digits.
    let weights = Matrix::from_fn(n, n, |(i, j)| {
        (values[i * n + j] / scale * 1e12).round() as i64
    });
    let (_, assignment) = kuhn_munkres(&weights);
    assignment.into_iter().map(|j| j as i64).collect()
}

/// Permutes `model`'s hidden units to match `reference` (both in `ArchSpec`
/// tensor order); the result computes the same function as `model`.
pub fn align(
    spec: &PermutationSpec,
    reference: &[Tensor],
    model: &[Tensor],
    max_sweeps: usize,
) -> (Vec<Tensor>, AlignReport) {
    tch::no_grad(|| {
        let mut params: Vec<Tensor> = model.iter().map(Tensor::shallow_clone).collect();
        let distance_before = distance(reference, &params);
        let mut sweeps = 0;
        while sweeps < max_sweeps {
            sweeps += 1;
            let mut changed = false;
            for k in 0..spec.num_permutations() {
                let perm = best_assignment(&spec.similarity(reference, &params, k));
                if perm.iter().enumerate().any(|(i, &j)| i as i64 != j) {
                    changed = true;
                    let perm = Tensor::from_slice(&perm).to_device(params[0].device());
                    spec.permute(&mut params, k, &perm);
                }
            }
            if !changed {
                break;
            }
        }
        let distance_after = distance(reference, &params);
        (
            params,
            AlignReport {
                sweeps,
                distance_before,
                distance_after,
            },
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::{Family, Network};
    use tch::Device;

    fn max_output_difference(net: &Network, a: &[Tensor], b: &[Tensor], x: &Tensor) -> f64 {
        (net.forward(a, x).unwrap() - net.forward(b, x).unwrap())
            .abs()
            .max()
            .double_value(&[])
    }

    fn check(net: &Network, input: &[i64]) {
        let spec = PermutationSpec::new(&net.spec).unwrap();
        let reference = net.init(1, Device::Cpu);
        let model = net.init(2, Device::Cpu);
        let x = Tensor::randn(input, (Kind::Float, Device::Cpu));
        let (aligned, report) = align(&spec, &reference, &model, DEFAULT_MAX_SWEEPS);
        let diff = max_output_difference(net, &model, &aligned, &x);
        assert!(diff < 1e-5, "{}: function changed by {diff}", net.spec.name);
        assert!(
            report.distance_after <= report.distance_before,
            "{}: {report:?}",
            net.spec.name
        );
        // A permuted copy of the reference aligns back onto it exactly.
        let mut shuffled: Vec<Tensor> = reference.iter().map(Tensor::copy).collect();
        for k in 0..spec.num_permutations() {
            let n = spec.layers[k].outputs;
            spec.permute(
                &mut shuffled,
                k,
                &Tensor::randperm(n, (Kind::Int64, Device::Cpu)),
            );
        }
        assert!(distance(&reference, &shuffled) > 1.0);
        let (back, _) = align(&spec, &reference, &shuffled, DEFAULT_MAX_SWEEPS);
        assert!(distance(&reference, &back) < 1e-5, "{}", net.spec.name);
    }

    #[test]
    fn aligned_models_compute_the_same_function_closer_to_the_reference() {
        for net in Family::Digits.networks() {
            check(&net, &[16, 64]);
        }
        check(&Family::Sinusoid.networks()[0], &[16, 1]);
        check(&Family::DigitInr.networks()[0], &[16, 2]);
    }
}
