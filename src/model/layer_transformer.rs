//! The layer-factorized denoiser: each layer's parameters are cut into
//! fixed-size tokens (see `tokens`), encoded by a linear map shared by all
//! layers of the same kind, given layer and position embeddings, mixed by a
//! transformer whose blocks are modulated by adaLN from (τ(t), e) as in DiT,
//! and decoded back per kind. No layer is D wide, so it scales to D in the
//! hundreds of thousands.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::blocks::{TimeCondition, zero_linear};
use super::tokens::{TokenGroup, TokenPlan};

/// Shape of the layer-factorized transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerTransformerConfig {
    /// Values per token P.
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
}

/// Condition tokens of a new layer transformer (see
/// [`LayerTransformerConfig::condition_tokens`]).
pub const DEFAULT_CONDITION_TOKENS: usize = 4;

impl Default for LayerTransformerConfig {
    fn default() -> Self {
        Self {
            token_size: 64,
            hidden: 128,
            depth: 4,
            heads: 4,
            time_dim: 128,
            condition_tokens: DEFAULT_CONDITION_TOKENS,
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

    /// h [B, N, H], c [B, C].
    fn forward(&self, h: &Tensor, c: &Tensor) -> Tensor {
        let (b, n, width) = h.size3().expect("tokens are [B, N, H]");
        let m = self.modulation.forward(c).unsqueeze(1).chunk(6, 2);
        let x = self.norm1.forward(h) * (1.0 + &m[1]) + &m[0];
        let qkv = self
            .qkv
            .forward(&x)
            .view([b, n, 3, self.heads, width / self.heads])
            .permute([2, 0, 3, 1, 4]);
        let attended = super::blocks::attend(&qkv, false);
        let h = h + self.proj.forward(&attended) * &m[2];
        let x = self.norm2.forward(&h) * (1.0 + &m[4]) + &m[3];
        &h + self.mlp_down.forward(&self.mlp_up.forward(&x).gelu("tanh")) * &m[5]
    }
}

/// The network F(w_t, t, e) over tokens.
#[derive(Debug)]
pub struct LayerTransformer {
    plan: TokenPlan,
    time: TimeCondition,
    encoders: BTreeMap<String, nn::Linear>,
    decoders: BTreeMap<String, nn::Linear>,
    layer_embedding: nn::Embedding,
    position_embedding: nn::Embedding,
    blocks: Vec<Block>,
    final_norm: nn::LayerNorm,
    final_modulation: nn::Linear,
    /// (τ(t), e) → the condition tokens, when there are any.
    condition_tokens: Option<(usize, nn::Linear)>,
}

impl LayerTransformer {
    /// Builds the network for vectors of length `dim` laid out as `groups`,
    /// with task embeddings of length `cond_dim`.
    pub fn new(
        vs: &nn::Path,
        config: &LayerTransformerConfig,
        groups: &[TokenGroup],
        dim: usize,
        cond_dim: i64,
    ) -> Self {
        let plan = TokenPlan::new(groups, dim, config.token_size, vs.device());
        let p = config.token_size as i64;
        let h = config.hidden;
        let c_dim = config.time_dim + cond_dim;
        let encoders = plan
            .kinds
            .keys()
            .map(|k| {
                (
                    k.clone(),
                    nn::linear(vs / "encode" / k.as_str(), p, h, Default::default()),
                )
            })
            .collect();
        let decoders = plan
            .kinds
            .keys()
            .map(|k| (k.clone(), zero_linear(vs / "decode" / k.as_str(), h, p)))
            .collect();
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
        Self {
            time: TimeCondition::new(vs, config.time_dim),
            encoders,
            decoders,
            layer_embedding: embedding("layer_embedding", plan.num_layers),
            position_embedding: embedding("position_embedding", plan.max_positions),
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
        }
    }

    /// Applies one linear map per layer kind to the matching tokens.
    fn per_kind(&self, maps: &BTreeMap<String, nn::Linear>, x: &Tensor) -> Tensor {
        let parts: Vec<Tensor> = self
            .plan
            .kinds
            .iter()
            .map(|(kind, ids)| maps[kind].forward(&x.index_select(1, ids)))
            .collect();
        Tensor::cat(&parts, 1).index_select(1, &self.plan.restore)
    }

    /// F(w_t, t, e): w_t [B, D], t [B] int64, e [B, E] → [B, D].
    pub fn forward(&self, w_t: &Tensor, t: &Tensor, e: &Tensor) -> Tensor {
        let c = self.time.condition(t, e);
        let tokens = self.plan.tokenize(&w_t.to_kind(Kind::Float));
        let mut h = self.per_kind(&self.encoders, &tokens)
            + self
                .layer_embedding
                .forward(&self.plan.layer_ids)
                .unsqueeze(0)
            + self
                .position_embedding
                .forward(&self.plan.positions)
                .unsqueeze(0);
        if let Some((count, map)) = &self.condition_tokens {
            let (b, width) = (h.size()[0], h.size()[2]);
            let prefix = map.forward(&c).view([b, *count as i64, width]);
            h = Tensor::cat(&[prefix, h], 1);
        }
        for block in &self.blocks {
            h = block.forward(&h, &c);
        }
        if let Some((count, _)) = &self.condition_tokens {
            let n = h.size()[1];
            h = h.narrow(1, *count as i64, n - *count as i64);
        }
        let m = self.final_modulation.forward(&c).unsqueeze(1).chunk(2, 2);
        let h = self.final_norm.forward(&h) * (1.0 + &m[1]) + &m[0];
        self.plan.untokenize(&self.per_kind(&self.decoders, &h))
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
            };
            let net = LayerTransformer::new(&vs.root(), &config, &groups_of(&spec), dim, 3);
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

    #[test]
    fn configs_from_before_condition_tokens_read_as_none() {
        let old: LayerTransformerConfig = serde_json::from_str(
            r#"{"token_size":4,"hidden":16,"depth":1,"heads":2,"time_dim":8}"#,
        )
        .unwrap();
        assert_eq!(old.condition_tokens, 0);
        let vs = nn::VarStore::new(Device::Cpu);
        let spec = ArchSpec::sequential_mlp("s", "", &[4, 3, 2]).unwrap();
        let _ = LayerTransformer::new(
            &vs.root(),
            &old,
            &groups_of(&spec),
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
