//! One weight space for several architectures: what lets one denoiser
//! serve them all. Architectures with the same structure — the same tensor
//! names and ranks and the same layers, differing only in widths (MLP
//! 64-32-5 and 64-64-5, or two CNNs of other channel counts) — share a
//! *super-network* whose every dimension is the largest among them; an
//! architecture is the corner of its super-network's tensors that its own
//! shapes cover (in PyTorch's row-major order, so an MLP's hidden unit j
//! is row j of one layer and column j of the next, and a CNN's flattened
//! channel c stays channel c). Structures that differ get super-networks of
//! their own, one after another in the union vector. Any architecture that
//! fits a super-network — one trained on, or one never seen, such as MLP
//! 64-48-5 — has its coordinates there, a mask of them, and a descriptor
//! (which super-network, each dimension as a fraction of its maximum) that
//! tells the denoiser which it is generating.

use std::collections::HashSet;

use super::arch::{ArchSpec, LayerGroup, LayoutError, TensorSpec};

/// Why architectures cannot share a union.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnionError {
    /// No architectures were given.
    #[error("a union needs at least one architecture")]
    Empty,
    /// The same name twice.
    #[error("architecture {0:?} is given twice")]
    Duplicate(String),
    /// An architecture fits no super-network of the union.
    #[error(
        "architecture {name:?} fits none of the union's structures (the same tensors, ranks and layers as an architecture trained on, no dimension larger): {reason}"
    )]
    DoesNotFit {
        /// The architecture.
        name: String,
        /// The closest reason.
        reason: String,
    },
    /// The union's layout is invalid (cannot happen for valid members).
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

/// One super-network: a structure and its largest shapes.
#[derive(Debug, Clone)]
struct Block {
    /// Tensor names in order (the structure's key, with ranks and layers).
    names: Vec<String>,
    layers: Vec<LayerGroup>,
    /// Largest shape of each tensor over the members.
    shapes: Vec<Vec<usize>>,
    /// First coordinate in the union vector.
    offset: usize,
}

impl Block {
    fn of(spec: &ArchSpec) -> Self {
        Self {
            names: spec.tensors.iter().map(|t| t.name.clone()).collect(),
            layers: spec.layers.clone(),
            shapes: spec.tensors.iter().map(|t| t.shape.clone()).collect(),
            offset: 0,
        }
    }

    /// Whether `spec` has this structure (whatever its widths); why not.
    fn structure_differs(&self, spec: &ArchSpec) -> Option<String> {
        let names: Vec<&str> = spec.tensors.iter().map(|t| t.name.as_str()).collect();
        if names != self.names.iter().map(String::as_str).collect::<Vec<_>>() {
            return Some(format!("tensors {names:?}, not {:?}", self.names));
        }
        if let Some((t, s)) = spec
            .tensors
            .iter()
            .zip(&self.shapes)
            .find(|(t, s)| t.shape.len() != s.len())
        {
            return Some(format!(
                "{} has rank {}, not {}",
                t.name,
                t.shape.len(),
                s.len()
            ));
        }
        (spec.layers != self.layers).then(|| "its layers differ".to_owned())
    }

    /// Why `spec` does not fit inside the block's shapes, if it does not.
    fn too_large(&self, spec: &ArchSpec) -> Option<String> {
        spec.tensors
            .iter()
            .zip(&self.shapes)
            .find(|(t, s)| t.shape.iter().zip(s.iter()).any(|(a, b)| a > b))
            .map(|(t, s)| format!("{} has shape {:?}, larger than {s:?}", t.name, t.shape))
    }

    fn dim(&self) -> usize {
        self.shapes
            .iter()
            .map(|s| s.iter().product::<usize>())
            .sum()
    }

    /// Dimensions of the descriptor this block contributes.
    fn descriptor_len(&self) -> usize {
        1 + self.shapes.iter().map(Vec::len).sum::<usize>()
    }
}

/// Where one architecture sits in a union.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// Union coordinate of each of the architecture's flat coordinates.
    pub indices: Vec<i64>,
    /// Which super-network and its fractions of each dimension (length
    /// [`ArchUnion::descriptor_len`]).
    pub descriptor: Vec<f32>,
}

impl Placement {
    /// Which union coordinates are the architecture's, as 0/1 values.
    pub fn mask(&self, dim: usize) -> Vec<f32> {
        let mut mask = vec![0f32; dim];
        for &i in &self.indices {
            mask[i as usize] = 1.0;
        }
        mask
    }
}

/// The union of architectures' weight spaces (module docs).
#[derive(Debug, Clone)]
pub struct ArchUnion {
    members: Vec<ArchSpec>,
    blocks: Vec<Block>,
    spec: ArchSpec,
}

impl ArchUnion {
    /// The union of `members` (the architectures a denoiser trains on), in
    /// their order.
    pub fn new(members: &[ArchSpec]) -> Result<Self, UnionError> {
        if members.is_empty() {
            return Err(UnionError::Empty);
        }
        let mut seen = HashSet::new();
        let mut blocks: Vec<Block> = Vec::new();
        for spec in members {
            if !seen.insert(spec.name.as_str()) {
                return Err(UnionError::Duplicate(spec.name.clone()));
            }
            match blocks
                .iter_mut()
                .find(|b| b.structure_differs(spec).is_none())
            {
                Some(block) => {
                    for (shape, t) in block.shapes.iter_mut().zip(&spec.tensors) {
                        for (a, &b) in shape.iter_mut().zip(&t.shape) {
                            *a = (*a).max(b);
                        }
                    }
                }
                None => blocks.push(Block::of(spec)),
            }
        }
        let mut offset = 0;
        for block in &mut blocks {
            block.offset = offset;
            offset += block.dim();
        }
        let spec = union_spec(members, &blocks)?;
        Ok(Self {
            members: members.to_vec(),
            blocks,
            spec,
        })
    }

    /// The architectures it was built from, in order.
    pub fn members(&self) -> &[ArchSpec] {
        &self.members
    }

    /// The union's own layout: every super-network's tensors, named
    /// "s{block}.{tensor}", with their layers (what the layer transformer
    /// tokenizes).
    pub fn spec(&self) -> &ArchSpec {
        &self.spec
    }

    /// Length of the union vector.
    pub fn dim(&self) -> usize {
        self.spec.num_parameters()
    }

    /// Length of an architecture descriptor.
    pub fn descriptor_len(&self) -> usize {
        self.blocks.iter().map(Block::descriptor_len).sum()
    }

    /// Where `spec` sits: a member, or any architecture that has a member's
    /// structure and no dimension larger than the union's.
    pub fn place(&self, spec: &ArchSpec) -> Result<Placement, UnionError> {
        let mut reason = String::new();
        let mut descriptor_start = 0;
        for block in &self.blocks {
            let start = descriptor_start;
            descriptor_start += block.descriptor_len();
            match block.structure_differs(spec) {
                // A block of the same structure says more than one of another.
                Some(why) if reason.is_empty() => {
                    reason = why;
                    continue;
                }
                Some(_) => continue,
                None => {
                    if let Some(why) = block.too_large(spec) {
                        reason = why;
                        continue;
                    }
                }
            }
            let mut indices = Vec::with_capacity(spec.num_parameters());
            let mut descriptor = vec![0f32; self.descriptor_len()];
            descriptor[start] = 1.0;
            let mut slot = start + 1;
            let mut tensor_offset = block.offset;
            for (t, full) in spec.tensors.iter().zip(&block.shapes) {
                push_corner(&mut indices, tensor_offset, &t.shape, full);
                for (&d, &max) in t.shape.iter().zip(full) {
                    descriptor[slot] = d as f32 / max.max(1) as f32;
                    slot += 1;
                }
                tensor_offset += full.iter().product::<usize>();
            }
            return Ok(Placement {
                indices,
                descriptor,
            });
        }
        Err(UnionError::DoesNotFit {
            name: spec.name.clone(),
            reason,
        })
    }
}

/// Appends the union indices of a tensor of `shape` stored in the corner
/// of a tensor of shape `full` (row-major) that starts at `offset`.
fn push_corner(indices: &mut Vec<i64>, offset: usize, shape: &[usize], full: &[usize]) {
    let count: usize = shape.iter().product();
    if count == 0 {
        return;
    }
    // Row-major strides of the full tensor.
    let mut strides = vec![1usize; full.len()];
    for i in (0..full.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * full[i + 1];
    }
    let mut index = vec![0usize; shape.len()];
    for _ in 0..count {
        let flat: usize = index.iter().zip(&strides).map(|(i, s)| i * s).sum();
        indices.push((offset + flat) as i64);
        // Next multi-index, last dimension fastest.
        for d in (0..shape.len()).rev() {
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
}

fn union_spec(members: &[ArchSpec], blocks: &[Block]) -> Result<ArchSpec, LayoutError> {
    let prefixed = |b: usize, name: &str| format!("s{b}.{name}");
    let mut tensors = Vec::new();
    let mut layers = Vec::new();
    for (b, block) in blocks.iter().enumerate() {
        for (name, shape) in block.names.iter().zip(&block.shapes) {
            tensors.push(TensorSpec::new(
                prefixed(b, name),
                shape,
                Default::default(),
            ));
        }
        for layer in &block.layers {
            layers.push(LayerGroup {
                name: prefixed(b, &layer.name),
                kind: layer.kind.clone(),
                tensors: layer.tensors.iter().map(|t| prefixed(b, t)).collect(),
            });
        }
    }
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    ArchSpec::new(
        format!("union({})", names.join(",")),
        members[0].family.clone(),
        tensors,
        layers,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::nets::Network;

    fn mlp(sizes: &[usize]) -> ArchSpec {
        let name = format!(
            "mlp-{}",
            sizes
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join("-")
        );
        ArchSpec::sequential_mlp(&name, "digits", sizes).unwrap()
    }

    fn cnn() -> ArchSpec {
        Network::small_cnn("cnn", "digits", 8, 16, 5).unwrap().spec
    }

    #[test]
    fn widths_share_a_super_network_and_structures_get_their_own() {
        let union = ArchUnion::new(&[mlp(&[64, 32, 5]), mlp(&[64, 64, 5]), cnn()]).unwrap();
        let mlp_max = mlp(&[64, 64, 5]).num_parameters();
        assert_eq!(union.dim(), mlp_max + cnn().num_parameters());
        // MLP block: marker + 2 + 1 + 2 + 1 dims; CNN: marker + 4 + 1 + 4 + 1 + 2 + 1.
        assert_eq!(union.descriptor_len(), 7 + 14);
        let cnn_at = union.place(&cnn()).unwrap();
        assert_eq!(
            cnn_at.indices,
            (mlp_max as i64..union.dim() as i64).collect::<Vec<_>>()
        );
        assert_eq!(cnn_at.descriptor[7], 1.0);
        assert_eq!(cnn_at.descriptor[0], 0.0);
    }

    #[test]
    fn a_narrower_network_is_the_corner_of_every_tensor() {
        let union = ArchUnion::new(&[mlp(&[3, 4, 2]), mlp(&[3, 2, 2])]).unwrap();
        let small = union.place(&mlp(&[3, 2, 2])).unwrap();
        // Super-network 3-4-2: 0.weight [4,3] at 0, 0.bias [4] at 12,
        // 2.weight [2,4] at 16, 2.bias [2] at 24.
        assert_eq!(
            small.indices,
            vec![0, 1, 2, 3, 4, 5, 12, 13, 16, 17, 20, 21, 24, 25]
        );
        assert_eq!(small.descriptor, vec![1.0, 0.5, 1.0, 0.5, 1.0, 0.5, 1.0]);
        let mask = small.mask(union.dim());
        assert_eq!(mask.iter().sum::<f32>(), 14.0);
        // An unseen width between them fits; a wider one or another
        // structure does not, and says why.
        assert_eq!(
            union.place(&mlp(&[3, 3, 2])).unwrap().indices.len(),
            3 * 3 + 3 + 2 * 3 + 2
        );
        let wide = union.place(&mlp(&[3, 5, 2])).unwrap_err();
        assert!(wide.to_string().contains("larger than"), "{wide}");
        let deep = union.place(&mlp(&[3, 4, 4, 2])).unwrap_err();
        assert!(deep.to_string().contains("tensors"), "{deep}");
    }

    #[test]
    fn the_union_layout_tokenizes_like_any_architecture() {
        let union = ArchUnion::new(&[mlp(&[64, 32, 5]), cnn()]).unwrap();
        union.spec().validate().unwrap();
        assert_eq!(union.spec().layers.len(), 2 + 3);
        assert!(ArchUnion::new(&[]).is_err());
        assert!(matches!(
            ArchUnion::new(&[cnn(), cnn()]),
            Err(UnionError::Duplicate(_))
        ));
    }
}
