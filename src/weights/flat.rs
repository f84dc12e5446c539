//! Flattening a checkpoint to w ∈ R^D (the proposal's
//! w = concat(vec(W⁽¹⁾), …, vec(W⁽ᴸ⁾)), tensors in `ArchSpec` order,
//! row-major) and back.

use tch::{Kind, Tensor};

use super::arch::{ArchSpec, LayoutError};

/// A checkpoint: named tensors, in any order.
pub type NamedTensors = Vec<(String, Tensor)>;

/// Flattens a checkpoint to a 1-D f32 tensor of length D, after checking
/// its names and shapes against the spec.
pub fn flatten(spec: &ArchSpec, checkpoint: &[(String, Tensor)]) -> Result<Tensor, LayoutError> {
    let shapes: Vec<(String, Vec<usize>)> = checkpoint
        .iter()
        .map(|(n, t)| (n.clone(), t.size().iter().map(|&d| d as usize).collect()))
        .collect();
    spec.check(shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice())))?;
    let by_name: std::collections::HashMap<&str, &Tensor> =
        checkpoint.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let parts: Vec<Tensor> = spec
        .tensors
        .iter()
        .map(|t| by_name[t.name.as_str()].to_kind(Kind::Float).reshape([-1]))
        .collect();
    Ok(Tensor::cat(&parts, 0))
}

/// Flattens several checkpoints into an [N, D] f32 tensor.
pub fn flatten_batch(spec: &ArchSpec, checkpoints: &[NamedTensors]) -> Result<Tensor, LayoutError> {
    let rows = checkpoints
        .iter()
        .map(|c| flatten(spec, c))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Tensor::stack(&rows, 0))
}

/// Cuts a flat vector of length D back into the spec's named tensors (f32,
/// same device), in spec order.
pub fn unflatten(spec: &ArchSpec, flat: &Tensor) -> Result<NamedTensors, LayoutError> {
    let d = spec.num_parameters();
    let got = flat.numel();
    if flat.dim() != 1 || got != d {
        return Err(LayoutError::Length {
            arch: spec.name.clone(),
            expected: d,
            got,
        });
    }
    Ok(spec
        .tensors
        .iter()
        .zip(spec.offsets())
        .map(|(t, range)| {
            let part = flat
                .narrow(0, range.start as i64, t.numel() as i64)
                .reshape(t.shape_i64().as_slice())
                .contiguous();
            (t.name.clone(), part)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(spec: &ArchSpec, seed: i64) -> NamedTensors {
        tch::manual_seed(seed);
        spec.tensors
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    Tensor::randn(t.shape_i64().as_slice(), (Kind::Float, tch::Device::Cpu)),
                )
            })
            .collect()
    }

    #[test]
    fn flatten_unflatten_is_bit_exact() {
        let spec = ArchSpec::sequential_mlp("m", "", &[4, 3, 2]).unwrap();
        let mut ckpt = checkpoint(&spec, 1);
        ckpt.reverse(); // order in the checkpoint does not matter
        let flat = flatten(&spec, &ckpt).unwrap();
        assert_eq!(flat.size(), [spec.num_parameters() as i64]);
        // The first tensor's elements come first, row-major.
        let w0 = ckpt
            .iter()
            .find(|(n, _)| n == "0.weight")
            .unwrap()
            .1
            .shallow_clone();
        assert!(flat.narrow(0, 0, 12).equal(&w0.reshape([-1])));
        for (name, t) in unflatten(&spec, &flat).unwrap() {
            let original = &ckpt.iter().find(|(n, _)| *n == name).unwrap().1;
            assert!(t.equal(original), "{name}");
        }
    }

    #[test]
    fn mismatches_and_bad_lengths_are_reported() {
        let spec = ArchSpec::sequential_mlp("m", "", &[4, 3, 2]).unwrap();
        let mut ckpt = checkpoint(&spec, 2);
        ckpt.pop();
        let err = flatten(&spec, &ckpt).unwrap_err();
        assert!(
            err.to_string().contains("missing tensor \"2.bias\""),
            "{err}"
        );
        let err =
            unflatten(&spec, &Tensor::zeros([5], (Kind::Float, tch::Device::Cpu))).unwrap_err();
        assert!(
            matches!(
                err,
                LayoutError::Length {
                    expected: 23,
                    got: 5,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn flatten_batch_stacks_rows() {
        let spec = ArchSpec::sequential_mlp("m", "", &[4, 3, 2]).unwrap();
        let batch = flatten_batch(&spec, &[checkpoint(&spec, 3), checkpoint(&spec, 4)]).unwrap();
        assert_eq!(batch.size(), [2, 23]);
        assert!(!batch.get(0).equal(&batch.get(1)));
    }
}
