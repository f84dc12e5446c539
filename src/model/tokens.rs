//! Cutting a flat weight vector into fixed-size tokens, layer by layer, and
//! putting tokens back: the layout the layer-factorized denoiser works in.
//! Each layer's parameters (its tensors' ranges, in order) are cut into
//! tokens of `token_size` values; the last token of a layer is zero-padded.

use std::collections::BTreeMap;

use tch::{Device, Tensor};

use crate::weights::ArchSpec;

/// Which layers the flat vector holds, for tokenization.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenGroup {
    /// Layer kind (layers of one kind share token encoders).
    pub kind: String,
    /// Flat index ranges of the layer, in order.
    pub ranges: Vec<(usize, usize)>,
}

/// The groups of an architecture's layers.
pub fn groups_of(spec: &ArchSpec) -> Vec<TokenGroup> {
    spec.layer_ranges()
        .into_iter()
        .map(|(layer, ranges)| TokenGroup {
            kind: layer.kind,
            ranges: ranges.into_iter().map(|r| (r.start, r.end)).collect(),
        })
        .collect()
}

/// One group covering a whole vector of length `dim` (e.g. a latent).
pub fn single_group(dim: usize) -> Vec<TokenGroup> {
    vec![TokenGroup {
        kind: "flat".into(),
        ranges: vec![(0, dim)],
    }]
}

/// The precomputed token layout of a vector.
#[derive(Debug)]
pub struct TokenPlan {
    dim: i64,
    token_size: i64,
    /// For every token slot, the flat index it reads (dim = padding).
    gather: Tensor,
    /// Layer index of each token [N].
    pub layer_ids: Tensor,
    /// Position of each token within its layer [N].
    pub positions: Tensor,
    /// Token ids of each kind, by kind name.
    pub kinds: BTreeMap<String, Tensor>,
    /// Permutation that restores token order after concatenating kinds.
    pub restore: Tensor,
    /// Number of tokens N.
    pub num_tokens: i64,
    /// Number of layers.
    pub num_layers: i64,
    /// Largest number of tokens in one layer.
    pub max_positions: i64,
}

impl TokenPlan {
    /// Plans tokens of `token_size` for a vector of length `dim` laid out as
    /// `groups`, on `device`.
    pub fn new(groups: &[TokenGroup], dim: usize, token_size: usize, device: Device) -> Self {
        let mut gather: Vec<i64> = Vec::new();
        let mut layer_ids = Vec::new();
        let mut positions = Vec::new();
        let mut kinds: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        let mut max_positions = 0;
        for (layer, group) in groups.iter().enumerate() {
            let indices: Vec<i64> = group
                .ranges
                .iter()
                .flat_map(|&(start, end)| (start as i64)..(end as i64))
                .collect();
            let count = indices.len().div_ceil(token_size);
            max_positions = max_positions.max(count as i64);
            for position in 0..count {
                let token_id = layer_ids.len() as i64;
                let chunk = &indices
                    [position * token_size..((position + 1) * token_size).min(indices.len())];
                gather.extend_from_slice(chunk);
                gather.extend(std::iter::repeat_n(dim as i64, token_size - chunk.len()));
                layer_ids.push(layer as i64);
                positions.push(position as i64);
                kinds.entry(group.kind.clone()).or_default().push(token_id);
            }
        }
        let order: Vec<i64> = kinds.values().flatten().copied().collect();
        let mut restore = vec![0i64; order.len()];
        for (slot, &token) in order.iter().enumerate() {
            restore[token as usize] = slot as i64;
        }
        let to = |v: &[i64]| Tensor::from_slice(v).to_device(device);
        Self {
            dim: dim as i64,
            token_size: token_size as i64,
            gather: to(&gather),
            num_tokens: layer_ids.len() as i64,
            layer_ids: to(&layer_ids),
            positions: to(&positions),
            kinds: kinds.iter().map(|(k, v)| (k.clone(), to(v))).collect(),
            restore: to(&restore),
            num_layers: groups.len() as i64,
            max_positions,
        }
    }

    /// w [B, D] → tokens [B, N, P] (padding slots are 0).
    pub fn tokenize(&self, w: &Tensor) -> Tensor {
        let b = w.size()[0];
        let padded = Tensor::cat(
            &[
                w.shallow_clone(),
                Tensor::zeros([b, 1], (w.kind(), w.device())),
            ],
            1,
        );
        padded
            .index_select(1, &self.gather)
            .view([b, self.num_tokens, self.token_size])
    }

    /// tokens [B, N, P] → w [B, D] (padding slots are dropped).
    pub fn untokenize(&self, tokens: &Tensor) -> Tensor {
        let b = tokens.size()[0];
        let out = Tensor::zeros([b, self.dim + 1], (tokens.kind(), tokens.device()));
        out.index_add(1, &self.gather, &tokens.reshape([b, -1]))
            .narrow(1, 0, self.dim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn tokenize_untokenize_round_trips_and_pads_per_layer() {
        let spec = ArchSpec::sequential_mlp("m", "", &[5, 3, 2]).unwrap(); // layers of 18 and 8
        let plan = TokenPlan::new(&groups_of(&spec), spec.num_parameters(), 4, Device::Cpu);
        assert_eq!(plan.num_tokens, 5 + 2);
        assert_eq!(plan.max_positions, 5);
        let w = Tensor::arange(26, (Kind::Float, Device::Cpu)).unsqueeze(0) + 1.0;
        let tokens = plan.tokenize(&w);
        assert_eq!(tokens.size(), [1, 7, 4]);
        // Layer 0's last token holds values 17, 18 then padding.
        assert_eq!(
            Vec::<f32>::try_from(tokens.get(0).get(4)).unwrap(),
            vec![17.0, 18.0, 0.0, 0.0]
        );
        assert!(plan.untokenize(&tokens).equal(&w));
        assert_eq!(
            Vec::<i64>::try_from(&plan.layer_ids).unwrap(),
            vec![0, 0, 0, 0, 0, 1, 1]
        );
    }
}
