//! Hidden neurons as sets: which flat coordinates move together when the
//! units of a hidden layer are permuted (an MLP's hidden units, a CNN's
//! channels). Each hidden unit owns its incoming weights (its row of the
//! layer's weight and its bias) and, before the output layer, its outgoing
//! column of the output layer's weight; the output bias belongs to no unit.
//! A denoiser that treats a layer's units as an unordered set of such tokens
//! is equivariant to their permutation — exactly for one hidden layer; with
//! several, a unit's row also lists the previous layer's units in order
//! (`NeuronLayout::exact`).

use serde::{Deserialize, Serialize};

use super::align::{AlignError, PermutationSpec};
use super::arch::ArchSpec;

/// Coordinates `start + unit · unit_step + i · stride` for i < `len`: one
/// strided piece of every unit's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    /// Flat index of unit 0's first coordinate.
    pub start: usize,
    /// How far the piece moves from one unit to the next.
    pub unit_step: usize,
    /// Distance between the piece's coordinates.
    pub stride: usize,
    /// Coordinates in the piece.
    pub len: usize,
}

/// The units of one hidden layer and the pieces each unit's token reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeuronGroup {
    /// The layer's kind ("linear", "conv2d", …).
    pub kind: String,
    /// Number of units.
    pub units: usize,
    /// Every unit's token, piece after piece.
    pub pieces: Vec<Piece>,
}

impl NeuronGroup {
    /// Length of every unit's token.
    pub fn token_len(&self) -> usize {
        self.pieces.iter().map(|p| p.len).sum()
    }

    /// The flat coordinates of unit `unit`'s token, in token order.
    pub fn indices(&self, unit: usize) -> impl Iterator<Item = usize> + '_ {
        self.pieces
            .iter()
            .flat_map(move |p| (0..p.len).map(move |i| p.start + unit * p.unit_step + i * p.stride))
    }
}

/// The hidden layers of an architecture as sets of unit tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeuronLayout {
    /// One group per hidden layer, in order.
    pub groups: Vec<NeuronGroup>,
    /// Whether permuting any hidden layer permutes whole tokens only (one
    /// hidden layer); with several, a unit's incoming row is ordered by the
    /// previous layer's units.
    pub exact: bool,
}

impl NeuronLayout {
    /// Reads the layout off a weight-and-bias layer chain (what alignment
    /// reads); architectures alignment refuses are refused for the same reason.
    pub fn new(spec: &ArchSpec) -> Result<Self, AlignError> {
        let chain: Vec<(usize, Option<usize>, i64, i64)> =
            PermutationSpec::new(spec)?.chain().collect();
        let offsets = spec.offsets();
        let last = chain.len() - 1;
        let mut groups = Vec::with_capacity(last);
        for (k, &(weight, bias, outputs, _)) in chain[..last].iter().enumerate() {
            let units = outputs as usize;
            let row = spec.tensors[weight].numel() / units;
            let mut pieces = vec![Piece {
                start: offsets[weight].start,
                unit_step: row,
                stride: 1,
                len: row,
            }];
            if let Some(b) = bias {
                pieces.push(Piece {
                    start: offsets[b].start,
                    unit_step: 1,
                    stride: 1,
                    len: 1,
                });
            }
            if k + 1 == last {
                // The output layer's weight as [outputs, units, rest]: its
                // column block of each unit, by whichever of outputs or rest
                // makes fewer pieces.
                let (next, _, next_outputs, _) = chain[last];
                let out = next_outputs as usize;
                let rest = spec.tensors[next].numel() / (out * units);
                let start = offsets[next].start;
                if rest <= out {
                    pieces.extend((0..rest).map(|r| Piece {
                        start: start + r,
                        unit_step: rest,
                        stride: units * rest,
                        len: out,
                    }));
                } else {
                    pieces.extend((0..out).map(|o| Piece {
                        start: start + o * units * rest,
                        unit_step: rest,
                        stride: 1,
                        len: rest,
                    }));
                }
            }
            groups.push(NeuronGroup {
                kind: spec
                    .layers
                    .iter()
                    .find(|l| l.tensors.contains(&spec.tensors[weight].name))
                    .map_or_else(|| "hidden".to_owned(), |l| l.kind.clone()),
                units,
                pieces,
            });
        }
        Ok(Self {
            exact: groups.len() == 1,
            groups,
        })
    }

    /// The longest unit token.
    pub fn max_token_len(&self) -> usize {
        self.groups
            .iter()
            .map(NeuronGroup::token_len)
            .max()
            .unwrap_or(0)
    }

    /// `w` [.., D] with hidden layer `layer`'s units reordered: unit i of the
    /// result is unit `perm[i]` of `w` (its whole token; what an exactly
    /// equivariant denoiser must commute with).
    pub fn permute(&self, w: &tch::Tensor, layer: usize, perm: &[usize]) -> tch::Tensor {
        let d = w.size().last().copied().unwrap_or(0) as usize;
        let mut source: Vec<i64> = (0..d as i64).collect();
        let group = &self.groups[layer];
        for (unit, &from) in perm.iter().enumerate() {
            for (to, from) in group.indices(unit).zip(group.indices(from)) {
                source[to] = from as i64;
            }
        }
        let index = tch::Tensor::from_slice(&source).to_device(w.device());
        w.index_select(-1, &index)
    }
}

/// `values` [D] with each unit slot's values replaced, in every unit of
/// every group, by `reduce` of them over the group's units ([units, slot] →
/// [1, slot]): statistics or bounds that permuting the units leaves as they are.
pub fn pool_over_units(
    groups: &[NeuronGroup],
    values: &tch::Tensor,
    reduce: impl Fn(&tch::Tensor) -> tch::Tensor,
) -> tch::Tensor {
    let mut pooled = values.copy();
    for group in groups {
        let index: Vec<i64> = (0..group.units)
            .flat_map(|unit| group.indices(unit).map(|i| i as i64))
            .collect();
        let index = tch::Tensor::from_slice(&index).to_device(values.device());
        let slots = [group.units as i64, group.token_len() as i64];
        let reduced = reduce(&values.index_select(0, &index).view(slots))
            .expand(slots, false)
            .reshape([-1]);
        let _ = pooled.index_copy_(0, &index, &reduced);
    }
    pooled
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::{Family, Network};
    use tch::{Device, Kind, Tensor};

    #[test]
    fn an_mlp_unit_owns_its_row_bias_and_outgoing_column() {
        // 3 → 2 → 2: W0 [2, 3] at 0, b0 at 6, W1 [2, 2] at 8, b1 at 12.
        let spec = ArchSpec::sequential_mlp("m", "", &[3, 2, 2]).unwrap();
        let layout = NeuronLayout::new(&spec).unwrap();
        assert!(layout.exact);
        assert_eq!(layout.groups.len(), 1);
        let group = &layout.groups[0];
        assert_eq!(group.units, 2);
        assert_eq!(group.token_len(), 3 + 1 + 2);
        assert_eq!(group.indices(0).collect::<Vec<_>>(), [0, 1, 2, 6, 8, 10]);
        assert_eq!(group.indices(1).collect::<Vec<_>>(), [3, 4, 5, 7, 9, 11]);
        // Every coordinate but the output bias belongs to one unit.
        let mut seen = vec![0; spec.num_parameters()];
        for unit in 0..2 {
            group.indices(unit).for_each(|i| seen[i] += 1);
        }
        assert_eq!(seen, [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]);
    }

    /// Permuting the units of the last hidden layer — of every hidden layer
    /// where the layout is exact — leaves the network's function as it was.
    fn permuting_units_keeps_the_function(net: &Network, input: &[i64]) {
        let layout = NeuronLayout::new(&net.spec).unwrap();
        let params = net.init(3, Device::Cpu);
        let flat: Vec<Tensor> = params.iter().map(|t| t.reshape([-1])).collect();
        let w = Tensor::cat(&flat, 0);
        let x = Tensor::randn(input, (Kind::Float, Device::Cpu));
        let before = net.forward(&params, &x).unwrap();
        let last = layout.groups.len() - 1;
        for (layer, group) in layout.groups.iter().enumerate() {
            if layer != last && !layout.exact {
                continue;
            }
            let perm: Vec<usize> = (0..group.units).rev().collect();
            let moved = layout.permute(&w, layer, &perm);
            assert!(!moved.equal(&w));
            let params: Vec<Tensor> = crate::weights::unflatten(&net.spec, &moved)
                .unwrap()
                .into_iter()
                .map(|(_, t)| t)
                .collect();
            let after = net.forward(&params, &x).unwrap();
            let gap = (&after - &before).abs().max().double_value(&[]);
            assert!(gap < 1e-5, "{} layer {layer}: {gap}", net.spec.name);
        }
    }

    #[test]
    fn unit_tokens_move_together_in_mlps_and_cnns() {
        for net in Family::Digits.networks() {
            permuting_units_keeps_the_function(&net, &[4, 64]);
        }
        permuting_units_keeps_the_function(&Family::Sinusoid.networks()[0], &[4, 1]);
        let cnn = Family::Digits.network("digits-cnn-8-16-5").unwrap();
        let cnn = NeuronLayout::new(&cnn.spec).unwrap();
        assert!(!cnn.exact);
        assert_eq!(cnn.groups.len(), 2);
    }
}
