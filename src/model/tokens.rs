//! Cutting a flat weight vector into fixed-size tokens, layer by layer, and
//! putting tokens back: the layout the layer-factorized denoiser works in.
//! Each layer's parameters (its tensors' ranges, in order) are cut into
//! tokens of `token_size` values; the last token of a layer is zero-padded.
//! The network runs on [`TokenSubset`]s — whole attention windows of
//! consecutive tokens, the last one padded — so that a vector of any length
//! can be processed a bounded number of tokens at a time.

use tch::{Device, Tensor};

use crate::weights::{ArchSpec, NeuronGroup};

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

/// The token layout of a vector, kept on the host: subsets of it are built
/// as tensors on demand.
#[derive(Debug)]
pub struct TokenPlan {
    dim: usize,
    token_size: usize,
    device: Device,
    /// For every token, the flat indices its slots read (dim = padding),
    /// token after token: N · P entries.
    gather: Vec<i64>,
    /// Layer index of each token.
    layer_ids: Vec<i64>,
    /// Position of each token within its layer.
    positions: Vec<i64>,
    /// Index into `kind_names` of each token.
    kind_of: Vec<usize>,
    /// The layer kinds, sorted.
    pub kind_names: Vec<String>,
    /// Number of tokens N.
    pub num_tokens: usize,
    /// Number of layers.
    pub num_layers: i64,
    /// Largest number of tokens in one layer.
    pub max_positions: i64,
}

/// Whole windows of consecutive tokens, as tensors on the plan's device:
/// `windows` × `window_len` tokens M, the slots past the last token padding.
#[derive(Debug)]
pub struct TokenSubset {
    /// Number of windows.
    pub windows: i64,
    /// Tokens per window.
    pub window_len: i64,
    /// The flat index each of the M · P slots reads (dim: padding).
    pub gather: Tensor,
    /// Layer index of each token [M] (0 for padding tokens).
    pub layer_ids: Tensor,
    /// Position of each token within its layer [M] (0 for padding tokens).
    pub positions: Tensor,
    /// Per layer kind present (its index in the plan's `kind_names`), the
    /// places in the subset of its tokens (padding tokens go with the first
    /// kind: their outputs are dropped).
    pub kinds: Vec<(usize, Tensor)>,
    /// Restores subset order after concatenating the kinds' outputs.
    pub restore: Tensor,
    /// Which of the M tokens are real, [M] bool; None when all are.
    pub real: Option<Tensor>,
    /// The flat coordinates the subset's tokens hold, ascending [K].
    pub coords: Tensor,
}

impl TokenPlan {
    /// Plans tokens of `token_size` for a vector of length `dim` laid out as
    /// `groups`, with subsets on `device`.
    pub fn new(groups: &[TokenGroup], dim: usize, token_size: usize, device: Device) -> Self {
        Self::with_units(groups, &[], dim, token_size, device)
    }

    /// Like [`Self::new`], but every hidden unit of `units` is one token of
    /// its own first (its layer's index, position 0 — the units of a layer
    /// are indistinguishable but for their values — and kind
    /// "unit:" + the layer's kind); the coordinates no unit reads are then
    /// cut into tokens as `new` cuts them, their layers numbered after the
    /// units' layers. Tokens hold max(`token_size`, longest unit) values.
    pub fn with_units(
        groups: &[TokenGroup],
        units: &[NeuronGroup],
        dim: usize,
        token_size: usize,
        device: Device,
    ) -> Self {
        let token_size = units
            .iter()
            .map(NeuronGroup::token_len)
            .fold(token_size, usize::max);
        // (indices, layer, position, kind) of every token, in order.
        let mut tokens: Vec<(Vec<i64>, i64, i64, String)> = Vec::new();
        let mut taken = vec![false; dim];
        for (layer, group) in units.iter().enumerate() {
            for unit in 0..group.units {
                let indices: Vec<i64> = group.indices(unit).map(|i| i as i64).collect();
                indices.iter().for_each(|&i| taken[i as usize] = true);
                tokens.push((indices, layer as i64, 0, format!("unit:{}", group.kind)));
            }
        }
        for (layer, group) in groups.iter().enumerate() {
            let indices: Vec<i64> = group
                .ranges
                .iter()
                .flat_map(|&(start, end)| start..end)
                .filter(|&i| !taken[i])
                .map(|i| i as i64)
                .collect();
            for (position, chunk) in indices.chunks(token_size).enumerate() {
                let layer = (units.len() + layer) as i64;
                tokens.push((chunk.to_vec(), layer, position as i64, group.kind.clone()));
            }
        }
        let kind_names: Vec<String> = tokens
            .iter()
            .map(|t| t.3.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut plan = Self {
            dim,
            token_size,
            device,
            gather: Vec::with_capacity(tokens.len() * token_size),
            layer_ids: Vec::with_capacity(tokens.len()),
            positions: Vec::with_capacity(tokens.len()),
            kind_of: Vec::with_capacity(tokens.len()),
            num_tokens: tokens.len(),
            num_layers: (units.len() + groups.len()) as i64,
            max_positions: 1,
            kind_names,
        };
        for (indices, layer, position, kind) in tokens {
            plan.gather.extend_from_slice(&indices);
            plan.gather
                .extend(std::iter::repeat_n(dim as i64, token_size - indices.len()));
            plan.layer_ids.push(layer);
            plan.positions.push(position);
            plan.max_positions = plan.max_positions.max(position + 1);
            // kind_names is sorted and holds every token's kind.
            plan.kind_of
                .push(plan.kind_names.binary_search(&kind).unwrap_or_default());
        }
        plan
    }

    /// Values per token.
    pub fn token_size(&self) -> usize {
        self.token_size
    }

    /// How many windows of `window_len` tokens cover the plan.
    pub fn window_count(&self, window_len: usize) -> usize {
        self.num_tokens.div_ceil(window_len.max(1))
    }

    /// The given windows (indices below [`Self::window_count`], in the
    /// order given) of `window_len` tokens each.
    pub fn subset(&self, windows: &[usize], window_len: usize) -> TokenSubset {
        let p = self.token_size;
        let slots = windows.len() * window_len;
        let mut gather = Vec::with_capacity(slots * p);
        let mut layer_ids = Vec::with_capacity(slots);
        let mut positions = Vec::with_capacity(slots);
        let mut real = Vec::with_capacity(slots);
        let mut by_kind: Vec<Vec<i64>> = vec![Vec::new(); self.kind_names.len().max(1)];
        for &window in windows {
            for token in window * window_len..(window + 1) * window_len {
                let place = real.len() as i64;
                if token < self.num_tokens {
                    gather.extend_from_slice(&self.gather[token * p..(token + 1) * p]);
                    layer_ids.push(self.layer_ids[token]);
                    positions.push(self.positions[token]);
                    by_kind[self.kind_of[token]].push(place);
                    real.push(true);
                } else {
                    gather.extend(std::iter::repeat_n(self.dim as i64, p));
                    layer_ids.push(0);
                    positions.push(0);
                    by_kind[0].push(place);
                    real.push(false);
                }
            }
        }
        let order: Vec<i64> = by_kind.iter().flatten().copied().collect();
        let mut restore = vec![0i64; order.len()];
        for (slot, &place) in order.iter().enumerate() {
            restore[place as usize] = slot as i64;
        }
        let mut coords: Vec<i64> = gather
            .iter()
            .copied()
            .filter(|&i| i < self.dim as i64)
            .collect();
        coords.sort_unstable();
        let to = |v: &[i64]| Tensor::from_slice(v).to_device(self.device);
        TokenSubset {
            windows: windows.len() as i64,
            window_len: window_len as i64,
            gather: to(&gather),
            layer_ids: to(&layer_ids),
            positions: to(&positions),
            kinds: by_kind
                .iter()
                .enumerate()
                .filter(|(_, places)| !places.is_empty())
                .map(|(kind, places)| (kind, to(places)))
                .collect(),
            restore: to(&restore),
            real: real
                .contains(&false)
                .then(|| Tensor::from_slice(&real).to_device(self.device)),
            coords: to(&coords),
        }
    }

    /// w [B, D] with a zero column appended, which padding slots read:
    /// made once per pass, then tokenized subset by subset.
    pub fn pad(&self, w: &Tensor) -> Tensor {
        let b = w.size()[0];
        Tensor::cat(
            &[
                w.shallow_clone(),
                Tensor::zeros([b, 1], (w.kind(), w.device())),
            ],
            1,
        )
    }

    /// A vector padded by [`Self::pad`] → the subset's tokens [B, M, P]
    /// (padding slots are 0).
    pub fn tokenize(&self, padded: &Tensor, subset: &TokenSubset) -> Tensor {
        padded
            .index_select(1, &subset.gather)
            .view([padded.size()[0], -1, self.token_size as i64])
    }

    /// tokens [B, M, P] read through `gather` ([M · P] flat indices) → w
    /// [B, D], zero where no token reads (padding slots are dropped).
    pub fn untokenize(&self, tokens: &Tensor, gather: &Tensor) -> Tensor {
        let b = tokens.size()[0];
        let out = Tensor::zeros([b, self.dim as i64 + 1], (tokens.kind(), tokens.device()));
        out.index_add(1, gather, &tokens.reshape([b, -1]))
            .narrow(1, 0, self.dim as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn plan() -> TokenPlan {
        let spec = ArchSpec::sequential_mlp("m", "", &[5, 3, 2]).unwrap(); // layers of 18 and 8
        TokenPlan::new(&groups_of(&spec), spec.num_parameters(), 4, Device::Cpu)
    }

    #[test]
    fn tokenize_untokenize_round_trips_and_pads_per_layer() {
        let plan = plan();
        assert_eq!(plan.num_tokens, 5 + 2);
        assert_eq!(plan.max_positions, 5);
        let whole = plan.subset(&[0], plan.num_tokens);
        let w = Tensor::arange(26, (Kind::Float, Device::Cpu)).unsqueeze(0) + 1.0;
        let tokens = plan.tokenize(&plan.pad(&w), &whole);
        assert_eq!(tokens.size(), [1, 7, 4]);
        // Layer 0's last token holds values 17, 18 then padding.
        assert_eq!(
            Vec::<f32>::try_from(tokens.get(0).get(4)).unwrap(),
            vec![17.0, 18.0, 0.0, 0.0]
        );
        assert!(plan.untokenize(&tokens, &whole.gather).equal(&w));
        assert_eq!(
            Vec::<i64>::try_from(&whole.layer_ids).unwrap(),
            vec![0, 0, 0, 0, 0, 1, 1]
        );
        assert!(whole.real.is_none());
        assert_eq!(whole.coords.size(), [26]);
    }

    #[test]
    fn windows_cover_the_vector_once_and_pad_the_last() {
        let plan = plan();
        assert_eq!(plan.window_count(3), 3);
        let w = Tensor::arange(26, (Kind::Float, Device::Cpu)).unsqueeze(0) + 1.0;
        // The last window holds token 6 and two padding tokens.
        let last = plan.subset(&[2], 3);
        assert_eq!(
            Vec::<bool>::try_from(last.real.as_ref().unwrap()).unwrap(),
            vec![true, false, false]
        );
        assert_eq!(
            Vec::<i64>::try_from(&last.coords).unwrap(),
            vec![22, 23, 24, 25]
        );
        assert_eq!(
            Vec::<f32>::try_from(plan.tokenize(&plan.pad(&w), &last).view([-1])).unwrap()[..6],
            [23.0, 24.0, 25.0, 26.0, 0.0, 0.0]
        );
        // Windows in any order, untokenized together, rebuild the vector.
        let all = plan.subset(&[1, 0, 2], 3);
        let tokens = plan.tokenize(&plan.pad(&w), &all);
        assert_eq!(tokens.size(), [1, 9, 4]);
        assert!(plan.untokenize(&tokens, &all.gather).equal(&w));
        assert_eq!(all.coords.size(), [26]);
    }

    #[test]
    fn units_are_tokens_and_the_rest_is_chunked() {
        // [3, 2, 2]: units read 0, 1, 2, 6, 8, 10 and 3, 4, 5, 7, 9, 11;
        // the output bias 12, 13 is one chunk of layer 1.
        let spec = ArchSpec::sequential_mlp("m", "", &[3, 2, 2]).unwrap();
        let layout = crate::weights::NeuronLayout::new(&spec).unwrap();
        let plan = TokenPlan::with_units(&groups_of(&spec), &layout.groups, 14, 4, Device::Cpu);
        assert_eq!(plan.token_size(), 6);
        assert_eq!(plan.num_tokens, 3);
        assert_eq!(plan.num_layers, 3);
        assert_eq!(plan.kind_names, ["linear", "unit:linear"]);
        let whole = plan.subset(&[0], 3);
        assert_eq!(Vec::<i64>::try_from(&whole.layer_ids).unwrap(), [0, 0, 2]);
        assert_eq!(Vec::<i64>::try_from(&whole.positions).unwrap(), [0, 0, 0]);
        let w = Tensor::arange(14, (Kind::Float, Device::Cpu)).unsqueeze(0) + 1.0;
        let tokens = plan.tokenize(&plan.pad(&w), &whole);
        assert_eq!(
            Vec::<f32>::try_from(tokens.get(0).get(1)).unwrap(),
            [4.0, 5.0, 6.0, 8.0, 10.0, 12.0]
        );
        assert_eq!(
            Vec::<f32>::try_from(tokens.get(0).get(2)).unwrap(),
            [13.0, 14.0, 0.0, 0.0, 0.0, 0.0]
        );
        assert!(plan.untokenize(&tokens, &whole.gather).equal(&w));
    }
}
