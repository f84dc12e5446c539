//! The layer-factorized denoiser: each layer's parameters are cut into
//! fixed-size tokens (see `tokens`), encoded by a linear map shared by all
//! layers of the same kind, given layer and position embeddings, mixed by a
//! transformer whose blocks are modulated by adaLN from (τ(t), e) as in DiT,
//! and decoded back per kind. No layer is D wide.
//!
//! Attention runs within windows of consecutive tokens (each window with
//! its own copy of the condition tokens), so time and memory grow linearly
//! with D: sampling runs the windows a bounded chunk at a time, and training
//! on a large D can take a random few windows per step
//! ([`LayerTransformer::forward_windows`]). Windows see each other only
//! through the condition; a network whose tokens fit one window is the
//! whole-sequence transformer it was before windows existed.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::blocks::{TimeCondition, zero_linear};
use super::tokens::{TokenGroup, TokenPlan, TokenSubset};
use crate::weights::NeuronGroup;

/// Shape of the layer-factorized transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerTransformerConfig {
    /// Values per token P (with unit tokens, the longest unit decides when
    /// it is longer).
    pub token_size: usize,
    /// Token width H.
    pub hidden: i64,
    /// Transformer blocks.
    pub depth: usize,
    /// Attention heads (must divide `hidden`).
    pub heads: i64,
    /// Size of the time embedding τ(t).
    pub time_dim: i64,
    /// Tokens made from (τ(t), e) and put in front of the weight tokens,
    /// which attend to them: the condition as content every block reads,
    /// not only as adaLN's per-channel scale and shift (0: adaLN alone, as
    /// checkpoints from before this option were trained).
    #[serde(default)]
    pub condition_tokens: usize,
    /// Tokens per attention window (0: the whole sequence is one window, as
    /// checkpoints from before windows were trained).
    #[serde(default)]
    pub window: usize,
    /// How weights become tokens.
    #[serde(default, skip_serializing_if = "TokenLayout::is_chunks")]
    pub tokens: TokenLayout,
}

/// How the layer transformer cuts weights into tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenLayout {
    /// Each layer's parameters in order, `token_size` at a time, with
    /// position embeddings.
    #[default]
    Chunks,
    /// One token per hidden unit (its row, bias and outgoing column, see
    /// `weights::NeuronLayout`), without positions, in one attention window:
    /// the network is then equivariant to permutations of the units — the
    /// proposal's symmetry module. The rest is chunked.
    Units,
}

impl TokenLayout {
    fn is_chunks(&self) -> bool {
        *self == Self::Chunks
    }
}

/// Condition tokens of a new layer transformer (see
/// [`LayerTransformerConfig::condition_tokens`]).
pub const DEFAULT_CONDITION_TOKENS: usize = 4;

/// Tokens per attention window of a new layer transformer: 256 tokens of 64
/// values, 16,384 weights, hold a `digits` MLP (36 tokens) or a `words`
/// adapter layer whole; larger networks are cut into windows.
pub const DEFAULT_WINDOW: usize = 256;

/// Tokens one sampling chunk runs at once (whole windows, at least one):
/// bounds a forward pass's activations at about 4 H floats per token and row.
pub const CHUNK_TOKENS: usize = 16_384;

/// Layers of more tokens than this get factored position embeddings.
const POSITION_TABLE_LIMIT: i64 = 4096;

/// Fine positions of a factored position embedding.
const FINE_POSITIONS: i64 = 64;

/// Default token width H.
pub const DEFAULT_TOKEN_WIDTH: i64 = 128;
/// Default number of transformer blocks.
pub const DEFAULT_DEPTH: usize = 4;
/// Default attention heads.
pub const DEFAULT_HEADS: i64 = 4;

impl Default for LayerTransformerConfig {
    fn default() -> Self {
        Self {
            token_size: 64,
            hidden: DEFAULT_TOKEN_WIDTH,
            depth: DEFAULT_DEPTH,
            heads: DEFAULT_HEADS,
            time_dim: 128,
            condition_tokens: DEFAULT_CONDITION_TOKENS,
            window: DEFAULT_WINDOW,
            tokens: TokenLayout::Chunks,
        }
    }
}

/// One pre-norm transformer block with adaLN-Zero modulation.
#[derive(Debug)]
struct Block {
    heads: i64,
    norm1: nn::LayerNorm,
    qkv: nn::Linear,
    proj: nn::Linear,
    norm2: nn::LayerNorm,
    mlp_up: nn::Linear,
    mlp_down: nn::Linear,
    modulation: nn::Linear,
}

fn plain_norm(vs: nn::Path, width: i64) -> nn::LayerNorm {
    nn::layer_norm(
        vs,
        vec![width],
        nn::LayerNormConfig {
            elementwise_affine: false,
            ..Default::default()
        },
    )
}

impl Block {
    fn new(vs: &nn::Path, hidden: i64, heads: i64, cond_dim: i64) -> Self {
        Self {
            heads,
            norm1: plain_norm(vs / "norm1", hidden),
            qkv: nn::linear(vs / "qkv", hidden, 3 * hidden, Default::default()),
            proj: nn::linear(vs / "proj", hidden, hidden, Default::default()),
            norm2: plain_norm(vs / "norm2", hidden),
            mlp_up: nn::linear(vs / "mlp_up", hidden, 4 * hidden, Default::default()),
            mlp_down: nn::linear(vs / "mlp_down", 4 * hidden, hidden, Default::default()),
            modulation: zero_linear(vs / "modulation", cond_dim, 6 * hidden),
        }
    }

    /// h [B, N, H], c [B, C]; `keys` [B, 1, 1, N] says which tokens may be
    /// attended to (None: all).
    fn forward(&self, h: &Tensor, c: &Tensor, keys: Option<&Tensor>) -> Tensor {
        let (b, n, width) = h.size3().expect("tokens are [B, N, H]");
        let m = self.modulation.forward(c).unsqueeze(1).chunk(6, 2);
        let x = self.norm1.forward(h) * (1.0 + &m[1]) + &m[0];
        let qkv = self
            .qkv
            .forward(&x)
            .view([b, n, 3, self.heads, width / self.heads])
            .permute([2, 0, 3, 1, 4]);
        let attended = super::blocks::attend_masked(&qkv, keys);
        let h = h + self.proj.forward(&attended) * &m[2];
        let x = self.norm2.forward(&h) * (1.0 + &m[4]) + &m[3];
        &h + self.mlp_down.forward(&self.mlp_up.forward(&x).gelu("tanh")) * &m[5]
    }
}

/// Where a token sits in its layer: a learned vector per position, or for
/// layers of more than [`POSITION_TABLE_LIMIT`] tokens the sum of a coarse
/// (position / 64) and a fine (position % 64) vector, so that the table
/// does not grow as H floats per token of the largest layer.
#[derive(Debug)]
enum PositionEmbedding {
    Table(nn::Embedding),
    Factored {
        coarse: nn::Embedding,
        fine: nn::Embedding,
    },
}

impl PositionEmbedding {
    fn forward(&self, positions: &Tensor) -> Tensor {
        match self {
            Self::Table(table) => table.forward(positions),
            Self::Factored { coarse, fine } => {
                coarse.forward(&positions.divide_scalar_mode(FINE_POSITIONS, "floor"))
                    + fine.forward(&positions.remainder(FINE_POSITIONS))
            }
        }
    }
}

/// The network F(w_t, t, e) over tokens.
#[derive(Debug)]
pub struct LayerTransformer {
    plan: TokenPlan,
    window_len: usize,
    /// The windows a full pass runs, a chunk at a time, and the flat index
    /// of every slot of their outputs, concatenated.
    chunks: Vec<TokenSubset>,
    chunk_gather: Tensor,
    time: TimeCondition,
    /// One map per layer kind, in the plan's `kind_names` order.
    encoders: Vec<nn::Linear>,
    decoders: Vec<nn::Linear>,
    layer_embedding: nn::Embedding,
    position_embedding: PositionEmbedding,
    blocks: Vec<Block>,
    final_norm: nn::LayerNorm,
    final_modulation: nn::Linear,
    /// (τ(t), e) → the condition tokens, when there are any.
    condition_tokens: Option<(usize, nn::Linear)>,
}

impl LayerTransformer {
    /// Builds the network for vectors of length `dim` laid out as `groups`
    /// (and, with [`TokenLayout::Units`], the hidden `units`), with task
    /// embeddings of length `cond_dim`.
    pub fn new(
        vs: &nn::Path,
        config: &LayerTransformerConfig,
        groups: &[TokenGroup],
        units: &[NeuronGroup],
        dim: usize,
        cond_dim: i64,
    ) -> Self {
        let (plan, window) = match config.tokens {
            TokenLayout::Chunks => (
                TokenPlan::new(groups, dim, config.token_size, vs.device()),
                config.window,
            ),
            // A layer's units must share a window to be interchangeable.
            TokenLayout::Units => (
                TokenPlan::with_units(groups, units, dim, config.token_size, vs.device()),
                0,
            ),
        };
        let window_len = match window {
            0 => plan.num_tokens,
            w => w.min(plan.num_tokens),
        }
        .max(1);
        let windows: Vec<usize> = (0..plan.window_count(window_len)).collect();
        let mut chunks: Vec<TokenSubset> = windows
            .chunks((CHUNK_TOKENS / window_len).max(1))
            .map(|chunk| plan.subset(chunk, window_len))
            .collect();
        let chunk_gather = Tensor::cat(&chunks.iter().map(|c| &c.gather).collect::<Vec<_>>(), 0);
        // Each chunk reads its part of the concatenation: one copy of the layout.
        let mut offset = 0;
        for chunk in &mut chunks {
            let len = chunk.gather.size()[0];
            chunk.gather = chunk_gather.narrow(0, offset, len);
            offset += len;
        }
        let p = plan.token_size() as i64;
        let h = config.hidden;
        let c_dim = config.time_dim + cond_dim;
        let per_kind = |name: &str, make: &dyn Fn(nn::Path) -> nn::Linear| {
            plan.kind_names
                .iter()
                .map(|k| make(vs / name / k.as_str()))
                .collect::<Vec<_>>()
        };
        let encoders = per_kind("encode", &|path| nn::linear(path, p, h, Default::default()));
        let decoders = per_kind("decode", &|path| zero_linear(path, h, p));
        let embedding = |name: &str, count: i64| {
            nn::embedding(
                vs / name,
                count,
                h,
                nn::EmbeddingConfig {
                    ws_init: nn::Init::Randn {
                        mean: 0.0,
                        stdev: 0.02,
                    },
                    ..Default::default()
                },
            )
        };
        let position_embedding = if plan.max_positions > POSITION_TABLE_LIMIT {
            PositionEmbedding::Factored {
                coarse: embedding(
                    "position_coarse",
                    (plan.max_positions + FINE_POSITIONS - 1) / FINE_POSITIONS,
                ),
                fine: embedding("position_fine", FINE_POSITIONS),
            }
        } else {
            PositionEmbedding::Table(embedding("position_embedding", plan.max_positions))
        };
        Self {
            time: TimeCondition::new(vs, config.time_dim),
            encoders,
            decoders,
            layer_embedding: embedding("layer_embedding", plan.num_layers),
            position_embedding,
            blocks: (0..config.depth)
                .map(|i| Block::new(&(vs / "blocks" / i), h, config.heads, c_dim))
                .collect(),
            final_norm: plain_norm(vs / "final_norm", h),
            final_modulation: zero_linear(vs / "final_modulation", c_dim, 2 * h),
            condition_tokens: (config.condition_tokens > 0).then(|| {
                let count = config.condition_tokens;
                let map = nn::linear(
                    vs / "condition_tokens",
                    c_dim,
                    count as i64 * h,
                    Default::default(),
                );
                (count, map)
            }),
            plan,
            window_len,
            chunks,
            chunk_gather,
        }
    }

    /// Number of attention windows a vector is cut into.
    pub fn window_count(&self) -> usize {
        self.plan.window_count(self.window_len)
    }

    /// Applies one linear map per layer kind to the matching tokens of x
    /// [B, M, ·].
    fn per_kind(maps: &[nn::Linear], x: &Tensor, subset: &TokenSubset) -> Tensor {
        let parts: Vec<Tensor> = subset
            .kinds
            .iter()
            .map(|(kind, places)| maps[*kind].forward(&x.index_select(1, places)))
            .collect();
        Tensor::cat(&parts, 1).index_select(1, &subset.restore)
    }

    /// F(w_t, t, e): w_t [B, D], t [B] int64, e [B, E] → [B, D].
    pub fn forward(&self, w_t: &Tensor, t: &Tensor, e: &Tensor) -> Tensor {
        let c = self.time.condition(t, e);
        let padded = self.plan.pad(&w_t.to_kind(Kind::Float));
        let mut outputs: Vec<Tensor> = self
            .chunks
            .iter()
            .map(|s| self.run(&padded, &c, s))
            .collect();
        let tokens = match outputs.len() {
            1 => outputs.swap_remove(0),
            _ => Tensor::cat(&outputs, 1),
        };
        self.plan.untokenize(&tokens, &self.chunk_gather)
    }

    /// F restricted to the given windows (indices below
    /// [`Self::window_count`]): [B, D], zero outside them, and the flat
    /// coordinates they cover. Equal to [`Self::forward`] there, for a
    /// fraction of its cost: what training on a large D runs.
    pub fn forward_windows(
        &self,
        w_t: &Tensor,
        t: &Tensor,
        e: &Tensor,
        windows: &[usize],
    ) -> (Tensor, Tensor) {
        let c = self.time.condition(t, e);
        let subset = self.plan.subset(windows, self.window_len);
        let padded = self.plan.pad(&w_t.to_kind(Kind::Float));
        let tokens = self.run(&padded, &c, &subset);
        (
            self.plan.untokenize(&tokens, &subset.gather),
            subset.coords.shallow_clone(),
        )
    }

    /// The network on one subset of whole windows: w [B, D + 1] as
    /// `TokenPlan::pad` makes it, c [B, C] → output tokens [B, M, P].
    fn run(&self, padded: &Tensor, c: &Tensor, subset: &TokenSubset) -> Tensor {
        let tokens = self.plan.tokenize(padded, subset);
        let h = Self::per_kind(&self.encoders, &tokens, subset)
            + self.layer_embedding.forward(&subset.layer_ids).unsqueeze(0)
            + self
                .position_embedding
                .forward(&subset.positions)
                .unsqueeze(0);
        let (b, m, width) = h.size3().expect("tokens are [B, M, H]");
        let (windows, len) = (subset.windows, subset.window_len);
        // Windows become rows: [B · windows, len, H], row b · windows + w.
        let mut h = h.view([b * windows, len, width]);
        let c_rows = if windows == 1 {
            c.shallow_clone()
        } else {
            c.repeat_interleave_self_int(windows, 0, None)
        };
        let prefix = match &self.condition_tokens {
            Some((count, map)) => {
                let tokens = map
                    .forward(&c_rows)
                    .view([b * windows, *count as i64, width]);
                h = Tensor::cat(&[tokens, h], 1);
                *count as i64
            }
            None => 0,
        };
        let keys = subset.real.as_ref().map(|real| {
            let real = real.view([windows, len]);
            let real = if prefix > 0 {
                let always = Tensor::ones([windows, prefix], (Kind::Bool, real.device()));
                Tensor::cat(&[always, real], 1)
            } else {
                real
            };
            real.view([windows, 1, 1, prefix + len])
                .repeat([b, 1, 1, 1])
        });
        for block in &self.blocks {
            h = block.forward(&h, &c_rows, keys.as_ref());
        }
        let h = h.narrow(1, prefix, len).reshape([b, m, width]);
        let modulation = self.final_modulation.forward(c).unsqueeze(1).chunk(2, 2);
        let h = self.final_norm.forward(&h) * (1.0 + &modulation[1]) + &modulation[0];
        Self::per_kind(&self.decoders, &h, subset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tokens::{groups_of, single_group};
    use crate::weights::ArchSpec;
    use tch::Device;

    fn parameters(vs: &nn::VarStore) -> i64 {
        vs.trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum()
    }

    #[test]
    fn size_does_not_grow_with_d_times_h() {
        let config = LayerTransformerConfig {
            depth: 2,
            ..Default::default()
        };
        let small = ArchSpec::sequential_mlp("s", "", &[64, 32, 5]).unwrap();
        let large = ArchSpec::sequential_mlp("l", "", &[784, 256, 10]).unwrap(); // D ≈ 204k
        let count = |spec: &ArchSpec| {
            let vs = nn::VarStore::new(Device::Cpu);
            let net = LayerTransformer::new(
                &vs.root(),
                &config,
                &groups_of(spec),
                &[],
                spec.num_parameters(),
                8,
            );
            let w = Tensor::zeros(
                [2, spec.num_parameters() as i64],
                (Kind::Float, Device::Cpu),
            );
            let out = net.forward(
                &w,
                &Tensor::from_slice(&[1i64, 500]),
                &Tensor::zeros([2, 8], (Kind::Float, Device::Cpu)),
            );
            assert_eq!(out.size(), w.size());
            parameters(&vs)
        };
        let (s, l) = (count(&small), count(&large));
        let d_large = large.num_parameters() as i64;
        // Only the position table grows (one H-vector per token of the largest layer).
        assert!(l - s < d_large * config.hidden / 32, "{s} → {l}");
        assert!(
            l < d_large * config.hidden / 8,
            "{l} parameters for D = {d_large}"
        );
    }

    #[test]
    fn condition_tokens_carry_the_task_where_modulation_does_not() {
        // Decoders random, every block's modulation independent of the task
        // (weights zero, gates and scales opened by their bias): the task
        // embedding can then reach the output only through the tokens.
        let spec = ArchSpec::sequential_mlp("s", "", &[4, 3, 2]).unwrap();
        let dim = spec.num_parameters();
        // Two rows that differ only in their task embedding, through one
        // network (the test runs beside others that draw from torch's RNG).
        let moved = |condition_tokens: usize| {
            let vs = nn::VarStore::new(Device::Cpu);
            let config = LayerTransformerConfig {
                token_size: 4,
                hidden: 16,
                depth: 1,
                heads: 2,
                time_dim: 8,
                condition_tokens,
                window: 0,
                tokens: TokenLayout::Chunks,
            };
            let net = LayerTransformer::new(&vs.root(), &config, &groups_of(&spec), &[], dim, 3);
            tch::no_grad(|| {
                for (name, mut v) in vs.variables() {
                    if name.starts_with("decode") {
                        v.copy_(&Tensor::randn(v.size(), (Kind::Float, Device::Cpu)));
                    } else if name.starts_with("blocks") && name.ends_with("modulation.bias") {
                        let _ = v.fill_(1.0);
                    }
                }
            });
            let w = Tensor::ones([2, dim as i64], (Kind::Float, Device::Cpu));
            let e = Tensor::from_slice(&[1f32, 1.0, 1.0, -1.0, -1.0, -1.0]).view([2, 3]);
            let out = net.forward(&w, &Tensor::from_slice(&[10i64, 10]), &e);
            (out.get(0) - out.get(1)).abs().max()
        };
        assert_eq!(moved(0).double_value(&[]), 0.0);
        assert!(moved(2).double_value(&[]) > 1e-3);
    }

    /// A small network with every variable set from `seed` (decoders and
    /// gates included, so every path is live), windows of `window` tokens.
    fn live(spec: &ArchSpec, window: usize, seed: u64) -> (nn::VarStore, LayerTransformer) {
        live_with(spec, window, TokenLayout::Chunks, seed)
    }

    fn live_with(
        spec: &ArchSpec,
        window: usize,
        tokens: TokenLayout,
        seed: u64,
    ) -> (nn::VarStore, LayerTransformer) {
        let units = crate::weights::NeuronLayout::new(spec)
            .map(|l| l.groups)
            .unwrap_or_default();
        let vs = nn::VarStore::new(Device::Cpu);
        let config = LayerTransformerConfig {
            token_size: 4,
            hidden: 16,
            depth: 2,
            heads: 2,
            time_dim: 8,
            condition_tokens: 2,
            window,
            tokens,
        };
        let net = LayerTransformer::new(
            &vs.root(),
            &config,
            &groups_of(spec),
            &units,
            spec.num_parameters(),
            3,
        );
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        tch::no_grad(|| {
            for (i, (_, var)) in vars.iter_mut().enumerate() {
                let fan_in = var.size().last().copied().unwrap_or(1).max(1);
                let values = crate::rng::SeededNoise::new(&[seed], i as u64)
                    .draw(&var.size(), Device::Cpu)
                    .squeeze_dim(0)
                    / (fan_in as f64).sqrt();
                var.copy_(&values);
            }
        });
        (vs, net)
    }

    fn inputs(dim: usize) -> (Tensor, Tensor, Tensor) {
        let w = crate::rng::SeededNoise::new(&[7], 0)
            .draw(&[2, dim as i64], Device::Cpu)
            .squeeze_dim(0);
        let e = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 1.0, 0.0, -0.5]).view([2, 3]);
        (w, Tensor::from_slice(&[10i64, 700]), e)
    }

    fn max_gap(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn padding_tokens_are_never_attended_to() {
        // Layers of 20 and 10 weights: 5 + 3 tokens of 4. Tokens 6 and 7
        // share the last window with no padding (window 2), one padding
        // token (window 3) or four (window 6): the same network (window size
        // has no variables) must give them the same outputs each time.
        let spec = ArchSpec::sequential_mlp("m", "", &[4, 4, 2]).unwrap();
        let dim = spec.num_parameters();
        assert_eq!(dim, 30);
        let (w, t, e) = inputs(dim);
        let last = |window: usize| {
            let (_vs, net) = live(&spec, window, 1);
            let out = tch::no_grad(|| net.forward(&w, &t, &e));
            out.narrow(1, 24, 6)
        };
        let unpadded = last(2);
        assert!(unpadded.abs().max().double_value(&[]) > 1e-3);
        for window in [3, 6] {
            let gap = max_gap(&last(window), &unpadded);
            assert!(gap < 1e-5, "window {window}: {gap}");
        }
    }

    #[test]
    fn unit_tokens_make_the_network_commute_with_unit_permutations() {
        // One hidden layer of 6 units: permuting them before the network
        // permutes its output the same way; chunk tokens do not.
        let spec = ArchSpec::sequential_mlp("m", "", &[4, 6, 3]).unwrap();
        let layout = crate::weights::NeuronLayout::new(&spec).unwrap();
        let dim = spec.num_parameters();
        let (w, t, e) = inputs(dim);
        let perm = [3, 0, 5, 1, 4, 2];
        let gap = |tokens: TokenLayout| {
            let (_vs, net) = live_with(&spec, 4, tokens, 3);
            let out = tch::no_grad(|| net.forward(&w, &t, &e));
            assert!(out.abs().max().double_value(&[]) > 1e-3);
            let moved = tch::no_grad(|| net.forward(&layout.permute(&w, 0, &perm), &t, &e));
            max_gap(&moved, &layout.permute(&out, 0, &perm))
        };
        assert!(gap(TokenLayout::Units) < 1e-5);
        assert!(gap(TokenLayout::Chunks) > 1e-3);
    }

    #[test]
    fn a_window_sees_only_its_own_tokens_and_trains_alone() {
        let spec = ArchSpec::sequential_mlp("m", "", &[4, 4, 2]).unwrap();
        let dim = spec.num_parameters();
        let (w, t, e) = inputs(dim);
        let (_vs, net) = live(&spec, 3, 2);
        assert_eq!(net.window_count(), 3);
        let full = tch::no_grad(|| net.forward(&w, &t, &e));
        // Window 1 is tokens 3–5: flat coordinates 12..20 and layer 1's 20..24.
        let (part, coords) = tch::no_grad(|| net.forward_windows(&w, &t, &e, &[1]));
        assert_eq!(
            Vec::<i64>::try_from(&coords).unwrap(),
            (12..24).collect::<Vec<i64>>()
        );
        let gap = max_gap(
            &part.index_select(1, &coords),
            &full.index_select(1, &coords),
        );
        assert!(gap < 1e-5, "{gap}");
        assert_eq!(
            max_gap(&part.narrow(1, 0, 12), &part.zeros_like().narrow(1, 0, 12)),
            0.0
        );
        // Changing window 0's weights leaves window 1's output as it was,
        // and moves window 0's.
        let moved = w.copy();
        let _ = moved.narrow(1, 0, 12).fill_(3.0);
        let again = tch::no_grad(|| net.forward(&moved, &t, &e));
        assert!(max_gap(&again.narrow(1, 12, 18), &full.narrow(1, 12, 18)) < 1e-5);
        assert!(max_gap(&again.narrow(1, 0, 12), &full.narrow(1, 0, 12)) > 1e-3);
    }

    #[test]
    fn long_layers_get_factored_positions() {
        // One layer of 3,000 tokens of 2: a table would hold 3,000 × H.
        let vs = nn::VarStore::new(Device::Cpu);
        let config = LayerTransformerConfig {
            token_size: 2,
            hidden: 16,
            depth: 1,
            heads: 2,
            time_dim: 8,
            condition_tokens: 1,
            window: 64,
            tokens: TokenLayout::Chunks,
        };
        let net = LayerTransformer::new(&vs.root(), &config, &single_group(10_000), &[], 10_000, 3);
        let variables = vs.variables();
        assert!(variables.contains_key("position_coarse.weight"));
        assert_eq!(variables["position_fine.weight"].size(), [64, 16]);
        assert_eq!(variables["position_coarse.weight"].size(), [79, 16]);
        assert!(!variables.contains_key("position_embedding.weight"));
        assert_eq!(net.window_count(), 79);
        let (w, t, e) = inputs(10_000);
        let out = tch::no_grad(|| net.forward(&w, &t, &e));
        assert_eq!(out.size(), [2, 10_000]);
    }

    #[test]
    fn configs_from_before_condition_tokens_read_as_none() {
        let old: LayerTransformerConfig = serde_json::from_str(
            r#"{"token_size":4,"hidden":16,"depth":1,"heads":2,"time_dim":8}"#,
        )
        .unwrap();
        assert_eq!(old.condition_tokens, 0);
        assert_eq!(old.window, 0);
        let vs = nn::VarStore::new(Device::Cpu);
        let spec = ArchSpec::sequential_mlp("s", "", &[4, 3, 2]).unwrap();
        let _ = LayerTransformer::new(
            &vs.root(),
            &old,
            &groups_of(&spec),
            &[],
            spec.num_parameters(),
            3,
        );
        assert!(
            vs.variables()
                .keys()
                .all(|name| !name.starts_with("condition_tokens"))
        );
    }

    #[test]
    fn a_fresh_network_outputs_zero() {
        let vs = nn::VarStore::new(Device::Cpu);
        let net = LayerTransformer::new(
            &vs.root(),
            &LayerTransformerConfig::default(),
            &single_group(100),
            &[],
            100,
            4,
        );
        let w = Tensor::randn([3, 100], (Kind::Float, Device::Cpu));
        let out = net.forward(
            &w,
            &Tensor::from_slice(&[1i64, 2, 3]),
            &Tensor::ones([3, 4], (Kind::Float, Device::Cpu)),
        );
        assert_eq!(out.abs().max().double_value(&[]), 0.0);
    }
}
