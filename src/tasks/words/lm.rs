//! The `words` family's networks: a small byte-level causal transformer
//! over single words (UTF-8 bytes, then an end-of-word token), the frozen
//! base model, and LoRA adapters of it — the zoo models and what the
//! service will generate. Words are read as `[END, b₁, …, bₙ]` and
//! predict `[b₁, …, bₙ, END]`; the metric is bits per byte over those
//! n + 1 predictions, each word weighted by its frequency.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use super::{WeightedDraws, unit_interval};
use crate::rng::splitmix64;
use crate::weights::{ArchSpec, DType, LayoutError, TensorSpec, flatten, unflatten};

/// Tokens: the 256 byte values and the end-of-word token.
pub const VOCAB: i64 = 257;
/// The end-of-word token (also the first input).
pub const END: i64 = 256;
/// Longest word read, in bytes (longer words are left out).
pub const MAX_WORD_BYTES: usize = 31;

/// The base model's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteLmConfig {
    /// Model width.
    pub width: i64,
    /// Transformer blocks.
    pub layers: i64,
    /// Attention heads (divide the width).
    pub heads: i64,
}

impl Default for ByteLmConfig {
    /// 2 blocks of width 64, 4 heads: ≈ 0.13 M parameters, a rank-4 LoRA
    /// step on 64 words in ≈ 10 ms on 2 cores (issue 20's sizing).
    fn default() -> Self {
        Self {
            width: 64,
            layers: 2,
            heads: 4,
        }
    }
}

/// The adapted projections of one block, in PEFT's naming order.
pub const TARGETS: [&str; 4] = ["qkv", "proj", "up", "down"];

/// One transformer block (pre-LayerNorm).
#[derive(Debug)]
struct Block {
    norm1: nn::LayerNorm,
    qkv: nn::Linear,
    proj: nn::Linear,
    norm2: nn::LayerNorm,
    up: nn::Linear,
    down: nn::Linear,
}

/// The byte-level language model.
#[derive(Debug)]
pub struct ByteLm {
    /// Its shape.
    pub config: ByteLmConfig,
    /// Every parameter.
    pub vs: nn::VarStore,
    tokens: nn::Embedding,
    positions: Tensor,
    blocks: Vec<Block>,
    norm: nn::LayerNorm,
    head: nn::Linear,
}

impl ByteLm {
    /// A freshly initialized model (tch's default inits, from libtorch's
    /// generator seeded with `seed`).
    pub fn new(config: ByteLmConfig, seed: i64, device: Device) -> Self {
        tch::manual_seed(seed);
        Self::build(config, device)
    }

    /// The model with `tensors` as its parameters (e.g. a stored base,
    /// named as [`base_arch`] names them).
    pub fn from_tensors(
        config: ByteLmConfig,
        tensors: &HashMap<String, Tensor>,
        device: Device,
    ) -> Result<Self, LayoutError> {
        let lm = Self::build(config, device);
        let arch = base_arch(config);
        let variables = lm.vs.variables();
        let mut differences = Vec::new();
        tch::no_grad(|| {
            for spec in &arch.tensors {
                match (tensors.get(&spec.name), variables.get(&spec.name)) {
                    (Some(value), Some(var)) if value.size() == var.size() => {
                        var.shallow_clone().copy_(value);
                    }
                    (Some(value), _) => differences.push(format!(
                        "{}: shape {:?}, expected {:?}",
                        spec.name,
                        value.size(),
                        spec.shape
                    )),
                    (None, _) => differences.push(format!("missing {}", spec.name)),
                }
            }
        });
        if differences.is_empty() {
            Ok(lm)
        } else {
            Err(LayoutError::Mismatch {
                arch: arch.name,
                differences,
            })
        }
    }

    /// Its parameters under their names, in [`base_arch`] order.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let variables = self.vs.variables();
        base_arch(self.config)
            .tensors
            .iter()
            .filter_map(|t| Some((t.name.clone(), variables.get(&t.name)?.detach())))
            .collect()
    }

    /// The layers, initialized from libtorch's generator as it stands.
    fn build(config: ByteLmConfig, device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let w = config.width;
        let tokens = nn::embedding(&root / "tokens", VOCAB, w, Default::default());
        let positions = root.randn("positions", &[MAX_WORD_BYTES as i64 + 1, w], 0.0, 0.02);
        let blocks = (0..config.layers)
            .map(|i| {
                let p = &root / "layers" / i;
                Block {
                    norm1: nn::layer_norm(&p / "norm1", vec![w], Default::default()),
                    qkv: nn::linear(&p / "qkv", w, 3 * w, Default::default()),
                    proj: nn::linear(&p / "proj", w, w, Default::default()),
                    norm2: nn::layer_norm(&p / "norm2", vec![w], Default::default()),
                    up: nn::linear(&p / "up", w, 4 * w, Default::default()),
                    down: nn::linear(&p / "down", 4 * w, w, Default::default()),
                }
            })
            .collect();
        Self {
            config,
            tokens,
            positions,
            blocks,
            norm: nn::layer_norm(&root / "norm", vec![w], Default::default()),
            head: nn::linear(&root / "head", w, VOCAB, Default::default()),
            vs,
        }
    }

    /// Logits [B, L, VOCAB] for inputs [B, L] (int64 tokens), the adapter's
    /// low-rank updates added to its target projections when given.
    pub fn forward(&self, input: &Tensor, adapter: Option<&Adapter>) -> Tensor {
        let (b, l) = input.size2().expect("inputs are [B, L]");
        let w = self.config.width;
        let heads = self.config.heads;
        let mut h = self.tokens.forward(input) + self.positions.narrow(0, 0, l).unsqueeze(0);
        for (i, block) in self.blocks.iter().enumerate() {
            let project = |name: &str, linear: &nn::Linear, x: &Tensor| {
                let base = linear.forward(x);
                match adapter.and_then(|a| a.modules.get(&module_name(i, name))) {
                    Some((a, b_up)) => {
                        let scale = adapter.map_or(0.0, |a| a.config.scale());
                        base + x.matmul(&a.tr()).matmul(&b_up.tr()) * scale
                    }
                    None => base,
                }
            };
            let x = block.norm1.forward(&h);
            let qkv = project("qkv", &block.qkv, &x)
                .view([b, l, 3, heads, w / heads])
                .permute([2, 0, 3, 1, 4]);
            let attended = crate::model::blocks::attend(&qkv, true);
            h = &h + project("proj", &block.proj, &attended);
            let x = block.norm2.forward(&h);
            let up = project("up", &block.up, &x).gelu("tanh");
            h = &h + project("down", &block.down, &up);
        }
        self.head.forward(&self.norm.forward(&h))
    }
}

/// The name of block `layer`'s projection `target`, e.g. "layers.0.qkv".
pub fn module_name(layer: usize, target: &str) -> String {
    format!("layers.{layer}.{target}")
}

/// A LoRA adapter's rank and scale.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank r.
    pub rank: i64,
    /// α: the update is scaled by α / r.
    pub alpha: f64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 4,
            alpha: 8.0,
        }
    }
}

impl LoraConfig {
    /// α / r.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// Low-rank updates ΔW = (α/r)·B·A of every target projection of a base
/// model: A [r, in], B [out, r].
#[derive(Debug)]
pub struct Adapter {
    /// Rank and scale.
    pub config: LoraConfig,
    /// Its parameters (A and B of every module).
    pub vs: nn::VarStore,
    /// Module name → (A, B).
    pub modules: BTreeMap<String, (Tensor, Tensor)>,
}

impl Adapter {
    /// PEFT's default init ([`lora_init`]): the adapted model starts as
    /// the base.
    pub fn new(base: &ByteLm, config: LoraConfig, seed: u64) -> Self {
        let vs = nn::VarStore::new(base.vs.device());
        let root = vs.root();
        let mut modules = BTreeMap::new();
        let mut init = lora_init(base.config, config, seed).into_iter();
        for layer in 0..base.config.layers as usize {
            for target in TARGETS {
                let path = &root / "layers" / layer / target;
                let mut next = || init.next().map(|(_, t)| t).unwrap_or_default();
                let a = path.var_copy("lora_A", &next());
                let b = path.var_copy("lora_B", &next());
                modules.insert(module_name(layer, target), (a, b));
            }
        }
        Self {
            config,
            vs,
            modules,
        }
    }
}

/// PEFT's default LoRA init for every target projection of a `base`-shaped
/// model, PEFT-named in [`adapter_arch`] order: A uniform in ±1/sqrt(in)
/// (Kaiming-uniform with a = √5), B = 0; A drawn from `seed` by SplitMix64
/// (the same on every machine).
pub fn lora_init(base: ByteLmConfig, config: LoraConfig, seed: u64) -> Vec<(String, Tensor)> {
    let mut tensors = Vec::new();
    let mut counter = 0u64;
    for layer in 0..base.layers as usize {
        for target in TARGETS {
            let (input, output) = projection_shape(target, base.width);
            let module = module_name(layer, target);
            let bound = 1.0 / (input as f64).sqrt();
            let values: Vec<f32> = (0..config.rank * input)
                .map(|_| {
                    counter += 1;
                    let u = unit_interval(splitmix64(seed ^ splitmix64(counter)));
                    ((2.0 * u - 1.0) * bound) as f32
                })
                .collect();
            tensors.push((
                peft_name(&module, "lora_A"),
                Tensor::from_slice(&values).view([config.rank, input]),
            ));
            tensors.push((
                peft_name(&module, "lora_B"),
                Tensor::zeros([output, config.rank], (Kind::Float, Device::Cpu)),
            ));
        }
    }
    tensors
}

/// The (input, output) sizes of block projection `target` at `width`.
fn projection_shape(target: &str, width: i64) -> (i64, i64) {
    match target {
        "qkv" => (width, 3 * width),
        "up" => (width, 4 * width),
        "down" => (4 * width, width),
        _ => (width, width),
    }
}

/// The base model's architecture, "words-bytelm-w{width}x{layers}h{heads}"
/// of family "words": the token embedding, the position table, each
/// block's LayerNorms and projections (PyTorch `nn.Linear` layout, weight
/// [out, in] then bias), the final LayerNorm and the output head.
pub fn base_arch(config: ByteLmConfig) -> ArchSpec {
    let w = config.width as usize;
    let vocab = VOCAB as usize;
    let mut tensors = vec![
        TensorSpec::new("tokens.weight", &[vocab, w], DType::F32),
        TensorSpec::new("positions", &[MAX_WORD_BYTES + 1, w], DType::F32),
    ];
    let linear = |tensors: &mut Vec<TensorSpec>, name: &str, input: usize, output: usize| {
        tensors.push(TensorSpec::new(
            format!("{name}.weight"),
            &[output, input],
            DType::F32,
        ));
        tensors.push(TensorSpec::new(
            format!("{name}.bias"),
            &[output],
            DType::F32,
        ));
    };
    let norm = |tensors: &mut Vec<TensorSpec>, name: &str| {
        tensors.push(TensorSpec::new(format!("{name}.weight"), &[w], DType::F32));
        tensors.push(TensorSpec::new(format!("{name}.bias"), &[w], DType::F32));
    };
    for layer in 0..config.layers {
        let p = format!("layers.{layer}");
        norm(&mut tensors, &format!("{p}.norm1"));
        linear(&mut tensors, &format!("{p}.qkv"), w, 3 * w);
        linear(&mut tensors, &format!("{p}.proj"), w, w);
        norm(&mut tensors, &format!("{p}.norm2"));
        linear(&mut tensors, &format!("{p}.up"), w, 4 * w);
        linear(&mut tensors, &format!("{p}.down"), 4 * w, w);
    }
    norm(&mut tensors, "norm");
    linear(&mut tensors, "head", w, vocab);
    let name = format!(
        "words-bytelm-w{}x{}h{}",
        config.width, config.layers, config.heads
    );
    ArchSpec::infer(name, "words", tensors).expect("the base layout is well formed")
}

/// The prefix PEFT gives a LoRA model's tensors (`get_peft_model_state_dict`
/// of a `LoraModel` around a module whose blocks are `layers.{i}.{target}`).
pub const PEFT_PREFIX: &str = "base_model.model.";

/// The metadata key naming an adapter's base model by its zoo model id —
/// in an adapter's file (zoo or generated) and in an adapter zoo's plan.
pub const BASE_MODEL_ID_KEY: &str = "base_model_id";
/// The metadata key of the SHA-256 of an adapter's base model file.
pub const BASE_MODEL_SHA256_KEY: &str = "base_model_sha256";

/// The name of module `module`'s LoRA tensor `part` ("lora_A"/"lora_B")
/// as PEFT writes it, e.g. "base_model.model.layers.0.qkv.lora_A.weight".
pub fn peft_name(module: &str, part: &str) -> String {
    format!("{PEFT_PREFIX}{module}.{part}.weight")
}

/// The architecture of a LoRA adapter of `base`: every block's target
/// projections' A [r, in] then B [out, r], in block order, PEFT-named.
/// Family "words", name "words-lora-r{r}-w{width}x{layers}".
pub fn adapter_arch(base: ByteLmConfig, lora: LoraConfig) -> ArchSpec {
    let mut tensors = Vec::new();
    for layer in 0..base.layers as usize {
        for target in TARGETS {
            let module = module_name(layer, target);
            let (input, output) = projection_shape(target, base.width);
            let r = lora.rank as usize;
            tensors.push(TensorSpec::new(
                peft_name(&module, "lora_A"),
                &[r, input as usize],
                DType::F32,
            ));
            tensors.push(TensorSpec::new(
                peft_name(&module, "lora_B"),
                &[output as usize, r],
                DType::F32,
            ));
        }
    }
    let name = format!("words-lora-r{}-w{}x{}", lora.rank, base.width, base.layers);
    ArchSpec::infer(name, "words", tensors).expect("the adapter layout is well formed")
}

impl Adapter {
    /// Its tensors under their PEFT names, in [`adapter_arch`] order.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.modules
            .iter()
            .flat_map(|(module, (a, b))| {
                [
                    (peft_name(module, "lora_A"), a.detach()),
                    (peft_name(module, "lora_B"), b.detach()),
                ]
            })
            .collect()
    }

    /// Its weights as one flat vector in `arch`'s order (the zoo's and
    /// the denoiser's view of it).
    pub fn to_flat(&self, arch: &ArchSpec) -> Result<Tensor, LayoutError> {
        flatten(arch, &self.named_tensors())
    }

    /// The adapter of `base` with the flat weights `flat` (e.g. a
    /// generated sample), in `arch`'s order.
    pub fn from_flat(
        base: &ByteLm,
        config: LoraConfig,
        arch: &ArchSpec,
        flat: &Tensor,
    ) -> Result<Self, LayoutError> {
        let adapter = Self::new(base, config, 0);
        let named: BTreeMap<String, Tensor> = unflatten(arch, flat)?.into_iter().collect();
        tch::no_grad(|| {
            for (module, (a, b)) in &adapter.modules {
                for (part, var) in [("lora_A", a), ("lora_B", b)] {
                    let name = peft_name(module, part);
                    let value = named.get(&name).ok_or_else(|| LayoutError::Mismatch {
                        arch: arch.name.clone(),
                        differences: vec![format!("missing {name}")],
                    })?;
                    let mut var = var.shallow_clone();
                    var.copy_(value);
                }
            }
            Ok(())
        })?;
        Ok(adapter)
    }

    /// The adapter whose A and B are `params` themselves, in `arch`'s order
    /// (gradients reach them: the evaluation harness fine-tunes adapters
    /// as plain tensors).
    pub fn from_params(
        config: LoraConfig,
        arch: &ArchSpec,
        params: &[Tensor],
    ) -> Result<Self, LayoutError> {
        let mismatch = |difference: String| LayoutError::Mismatch {
            arch: arch.name.clone(),
            differences: vec![difference],
        };
        if params.len() != arch.tensors.len() {
            return Err(mismatch(format!(
                "{} tensors, expected {}",
                params.len(),
                arch.tensors.len()
            )));
        }
        let mut modules = BTreeMap::new();
        for (pair, values) in arch.tensors.chunks(2).zip(params.chunks(2)) {
            let module = pair[0]
                .name
                .strip_prefix(PEFT_PREFIX)
                .and_then(|n| n.strip_suffix(".lora_A.weight"))
                .ok_or_else(|| mismatch(format!("{} is not a lora_A", pair[0].name)))?;
            for (spec, value) in pair.iter().zip(values) {
                if value.size() != spec.shape_i64() {
                    return Err(mismatch(format!(
                        "{}: shape {:?}, expected {:?}",
                        spec.name,
                        value.size(),
                        spec.shape
                    )));
                }
            }
            modules.insert(
                module.to_owned(),
                (values[0].shallow_clone(), values[1].shallow_clone()),
            );
        }
        Ok(Self {
            config,
            vs: nn::VarStore::new(params.first().map_or(Device::Cpu, Tensor::device)),
            modules,
        })
    }

    /// What PEFT's `adapter_config.json` says, as safetensors metadata:
    /// `peft_type`, `r`, `lora_alpha`, `target_modules` (JSON), and the
    /// base model's SHA-256.
    pub fn metadata(&self, base_sha256: &str) -> std::collections::HashMap<String, String> {
        let mut metadata = peft_metadata(self.config);
        metadata.insert(BASE_MODEL_SHA256_KEY.to_owned(), base_sha256.to_owned());
        metadata
    }
}

/// What PEFT's `adapter_config.json` says of adapters of `config`, as
/// safetensors metadata: `peft_type`, `r`, `lora_alpha`, `target_modules`
/// (JSON).
pub fn peft_metadata(config: LoraConfig) -> std::collections::HashMap<String, String> {
    let targets = serde_json::to_string(&TARGETS).unwrap_or_default();
    std::collections::HashMap::from([
        ("peft_type".to_owned(), "LORA".to_owned()),
        ("r".to_owned(), config.rank.to_string()),
        ("lora_alpha".to_owned(), config.alpha.to_string()),
        ("target_modules".to_owned(), targets),
    ])
}

/// Words as model inputs: inputs and targets [B, L] (int64) and the mask
/// [B, L] of real predictions (L = longest word + 1; padding targets END,
/// masked out). Words longer than [`MAX_WORD_BYTES`] must be left out first.
pub fn encode(words: &[&str], device: Device) -> (Tensor, Tensor, Tensor) {
    let l = words.iter().map(|w| w.len()).max().unwrap_or(0) + 1;
    let mut input = vec![END; words.len() * l];
    let mut target = vec![END; words.len() * l];
    let mut mask = vec![0f32; words.len() * l];
    for (row, word) in words.iter().enumerate() {
        let bytes = word.as_bytes();
        for (k, &byte) in bytes.iter().enumerate() {
            input[row * l + k + 1] = i64::from(byte);
            target[row * l + k] = i64::from(byte);
        }
        for m in &mut mask[row * l..row * l + bytes.len() + 1] {
            *m = 1.0;
        }
    }
    let shape = [words.len() as i64, l as i64];
    (
        Tensor::from_slice(&input).view(shape).to_device(device),
        Tensor::from_slice(&target).view(shape).to_device(device),
        Tensor::from_slice(&mask).view(shape).to_device(device),
    )
}

/// Whether the model reads `word` (non-empty, at most [`MAX_WORD_BYTES`]).
pub fn readable(word: &str) -> bool {
    !word.is_empty() && word.len() <= MAX_WORD_BYTES
}

/// Negative log-likelihood in bits of each word's predictions [B].
fn word_bits(lm: &ByteLm, adapter: Option<&Adapter>, words: &[&str]) -> Tensor {
    let (input, target, mask) = encode(words, lm.vs.device());
    let logits = lm.forward(&input, adapter);
    let nll = logits
        .log_softmax(-1, Kind::Float)
        .gather(2, &target.unsqueeze(2), false)
        .squeeze_dim(2)
        .neg();
    (nll * mask).sum_dim_intlist([1].as_slice(), false, Kind::Float) / std::f64::consts::LN_2
}

/// Bits per byte of `words` (word, weight), each word's n bytes and its end
/// counted as n + 1 predictions, weighted; words the model cannot read are
/// left out. Evaluated in batches of 256 without gradients.
pub fn bits_per_byte(lm: &ByteLm, adapter: Option<&Adapter>, words: &[(&str, f64)]) -> f64 {
    let mut words: Vec<(&str, f64)> = words.iter().copied().filter(|(w, _)| readable(w)).collect();
    // Batches of words of about one length: a batch is as long as its
    // longest word, and a word's bits do not depend on the padding after it
    // (causal attention, padded predictions masked out).
    words.sort_by_key(|(w, _)| w.len());
    let mut bits = 0.0;
    let mut bytes = 0.0;
    tch::no_grad(|| {
        for chunk in words.chunks(256) {
            let text: Vec<&str> = chunk.iter().map(|(w, _)| *w).collect();
            let per_word =
                Vec::<f64>::try_from(word_bits(lm, adapter, &text).to_kind(Kind::Double))
                    .unwrap_or_default();
            for ((word, weight), b) in chunk.iter().zip(per_word) {
                bits += weight * b;
                bytes += weight * (word.len() + 1) as f64;
            }
        }
    });
    bits / bytes.max(f64::MIN_POSITIVE)
}

/// The training loss of a batch of readable `words`: bits per predicted
/// byte (a word's bytes and its end), a scalar with gradients.
pub fn batch_loss(lm: &ByteLm, adapter: Option<&Adapter>, words: &[&str]) -> Tensor {
    let bytes: usize = words.iter().map(|w| w.len() + 1).sum();
    word_bits(lm, adapter, words).sum(Kind::Float) / bytes.max(1) as f64
}

/// How a model or an adapter is trained.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LmTrainConfig {
    /// Adam steps.
    pub steps: usize,
    /// Words per step, drawn by frequency.
    pub batch: usize,
    /// Adam's learning rate.
    pub learning_rate: f64,
    /// Seed of the word draws.
    pub seed: u64,
}

/// Trains the base model's own parameters (adapter None) or only the
/// adapter's (the base frozen) on `words` (word, weight), Adam on the mean
/// bits per prediction. Returns the last step's bits per byte.
pub fn train(
    lm: &ByteLm,
    adapter: Option<&Adapter>,
    words: &[(&str, f64)],
    config: &LmTrainConfig,
) -> f64 {
    let words: Vec<(&str, f64)> = words.iter().copied().filter(|(w, _)| readable(w)).collect();
    if words.is_empty() || config.steps == 0 {
        return f64::NAN;
    }
    let draws = WeightedDraws::new(words.iter().map(|(_, w)| *w));
    let vs = adapter.map_or(&lm.vs, |a| &a.vs);
    let Ok(mut optimizer) = nn::Adam::default().build(vs, config.learning_rate) else {
        return f64::NAN;
    };
    // Training an adapter: the base is frozen (no gradients kept for it).
    let frozen = adapter
        .map(|_| lm.vs.trainable_variables())
        .unwrap_or_default();
    for v in &frozen {
        let _ = v.set_requires_grad(false);
    }
    let mut last = f64::NAN;
    for step in 0..config.steps {
        // Step s draws numbers s·2²⁰, s·2²⁰ + 1, …: a function of (seed, step).
        let batch: Vec<&str> = draws
            .draw(config.batch, config.seed, (step as u64) << 20)
            .into_iter()
            .map(|i| words[i].0)
            .collect();
        let loss = batch_loss(lm, adapter, &batch);
        optimizer.backward_step(&loss);
        last = loss.double_value(&[]);
    }
    for v in &frozen {
        let _ = v.set_requires_grad(true);
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &[(&'static str, f64)]) -> Vec<(&'static str, f64)> {
        text.to_vec()
    }

    #[test]
    fn the_base_round_trips_through_its_named_tensors_and_the_adapter_init_is_peft() {
        let config = ByteLmConfig::default();
        let lm = ByteLm::new(config, 3, Device::Cpu);
        let arch = base_arch(config);
        // The architecture names every variable, with its shape.
        let variables = lm.vs.variables();
        assert_eq!(arch.tensors.len(), variables.len());
        for spec in &arch.tensors {
            assert_eq!(
                variables[&spec.name].size(),
                spec.shape_i64(),
                "{}",
                spec.name
            );
        }
        let named: HashMap<String, Tensor> = lm.named_tensors().into_iter().collect();
        let copy = ByteLm::from_tensors(config, &named, Device::Cpu).unwrap();
        let words = [("hello", 1.0), ("world", 2.0)];
        assert_eq!(
            bits_per_byte(&lm, None, &words),
            bits_per_byte(&copy, None, &words)
        );
        let mut missing = named;
        missing.remove("head.bias");
        let refused = ByteLm::from_tensors(config, &missing, Device::Cpu).unwrap_err();
        assert!(
            refused.to_string().contains("missing head.bias"),
            "{refused}"
        );
        // The zoo's init (Network::init) is the adapter's.
        let lora = LoraConfig::default();
        let adapter = Adapter::new(&lm, lora, 9);
        let adapter_arch = adapter_arch(config, lora);
        let net = crate::tasks::Family::Words.network("").unwrap();
        let init = net.init(9, Device::Cpu);
        let flat = adapter.to_flat(&adapter_arch).unwrap();
        let from_net = Tensor::cat(&init.iter().map(|t| t.reshape([-1])).collect::<Vec<_>>(), 0);
        assert!(flat.equal(&from_net));
    }

    #[test]
    fn words_become_end_then_bytes_and_predict_bytes_then_end() {
        let (input, target, mask) = encode(&["ab", "é"], Device::Cpu);
        assert_eq!(input.size(), [2, 3]);
        let row = |t: &Tensor, r: i64| Vec::<i64>::try_from(t.get(r)).unwrap();
        assert_eq!(row(&input, 0), vec![END, 97, 98]);
        assert_eq!(row(&target, 0), vec![97, 98, END]);
        // "é" is two bytes in UTF-8: both are predicted, then the end.
        assert_eq!(row(&input, 1), vec![END, 0xC3, 0xA9]);
        assert_eq!(row(&target, 1), vec![0xC3, 0xA9, END]);
        assert_eq!(
            Vec::<f32>::try_from(mask.get(1)).unwrap(),
            vec![1.0, 1.0, 1.0]
        );
        assert!(readable("é") && !readable("") && !readable(&"x".repeat(MAX_WORD_BYTES + 1)));
    }

    #[test]
    fn an_adapter_round_trips_through_its_flat_peft_named_weights() {
        let lm = ByteLm::new(ByteLmConfig::default(), 1, Device::Cpu);
        let lora = LoraConfig::default();
        let arch = adapter_arch(lm.config, lora);
        // 2 blocks × (qkv 4·64 + 192·4, proj 4·64 + 64·4, up 4·64 + 256·4,
        // down 4·256 + 64·4).
        assert_eq!(arch.num_parameters(), 2 * (1024 + 512 + 1280 + 1280));
        assert_eq!(
            arch.tensors[0].name,
            "base_model.model.layers.0.qkv.lora_A.weight"
        );
        assert_eq!(arch.tensors[1].shape, vec![192, 4]);
        let adapter = Adapter::new(&lm, lora, 3);
        tch::no_grad(|| {
            for (_, b) in adapter.modules.values() {
                let mut b = b.shallow_clone();
                b.copy_(&(Tensor::randn(b.size(), (Kind::Float, Device::Cpu)) * 0.1));
            }
        });
        let flat = adapter.to_flat(&arch).unwrap();
        assert_eq!(flat.size(), [arch.num_parameters() as i64]);
        let back = Adapter::from_flat(&lm, lora, &arch, &flat).unwrap();
        let (input, _, _) = encode(&["word", "wörter"], Device::Cpu);
        assert!(
            lm.forward(&input, Some(&adapter))
                .equal(&lm.forward(&input, Some(&back)))
        );
        assert!(
            !lm.forward(&input, Some(&adapter))
                .equal(&lm.forward(&input, None))
        );
        let meta = adapter.metadata("abc");
        assert_eq!(meta["target_modules"], r#"["qkv","proj","up","down"]"#);
        assert_eq!(
            (meta["r"].as_str(), meta["peft_type"].as_str()),
            ("4", "LORA")
        );
        let wrong = Tensor::zeros([3], (Kind::Float, Device::Cpu));
        assert!(Adapter::from_flat(&lm, lora, &arch, &wrong).is_err());
        // The same weights as plain tensors: the same outputs, and the loss
        // reaches them (the harness fine-tunes adapters this way).
        let params: Vec<Tensor> = unflatten(&arch, &flat)
            .unwrap()
            .into_iter()
            .map(|(_, t)| t.set_requires_grad(true))
            .collect();
        let plain = Adapter::from_params(lora, &arch, &params).unwrap();
        assert!(
            lm.forward(&input, Some(&adapter))
                .equal(&lm.forward(&input, Some(&plain)))
        );
        let loss = batch_loss(&lm, Some(&plain), &["word", "wörter"]);
        let grads = Tensor::run_backward(&[loss], &params, false, false);
        assert!(
            grads
                .iter()
                .all(|g| g.abs().sum(Kind::Float).double_value(&[]) > 0.0)
        );
        let refused = Adapter::from_params(lora, &arch, &params[1..]).unwrap_err();
        assert!(
            refused.to_string().contains("tensors, expected"),
            "{refused}"
        );
        let mut reshaped = params.iter().map(Tensor::detach).collect::<Vec<_>>();
        reshaped[0] = reshaped[0].reshape([-1]);
        let refused = Adapter::from_params(lora, &arch, &reshaped).unwrap_err();
        assert!(
            refused.to_string().contains("lora_A.weight: shape"),
            "{refused}"
        );
    }

    #[test]
    fn a_fresh_adapter_is_the_base_and_training_it_adapts_the_base() {
        tch::set_num_threads(1);
        let lm = ByteLm::new(ByteLmConfig::default(), 1, Device::Cpu);
        let english = words(&[
            ("the", 5.0),
            ("and", 3.0),
            ("that", 2.0),
            ("there", 1.0),
            ("then", 1.0),
        ]);
        let reversed = words(&[
            ("eht", 5.0),
            ("dna", 3.0),
            ("taht", 2.0),
            ("ereht", 1.0),
            ("neht", 1.0),
        ]);
        let config = LmTrainConfig {
            steps: 150,
            batch: 32,
            learning_rate: 3e-3,
            seed: 1,
        };
        let untrained = bits_per_byte(&lm, None, &english);
        train(&lm, None, &english, &config);
        let trained = bits_per_byte(&lm, None, &english);
        assert!(trained < 0.5 * untrained, "{untrained} → {trained}");
        // B = 0: the adapted model is the base, to the bit.
        let adapter = Adapter::new(&lm, LoraConfig::default(), 7);
        let (input, _, _) = encode(&["then"], Device::Cpu);
        assert!(
            lm.forward(&input, None)
                .equal(&lm.forward(&input, Some(&adapter)))
        );
        // Training the adapter alone moves the frozen base to new words and
        // leaves the base's own parameters as they were.
        let before: Vec<Tensor> = lm
            .vs
            .trainable_variables()
            .iter()
            .map(Tensor::copy)
            .collect();
        let base_on_reversed = bits_per_byte(&lm, None, &reversed);
        train(
            &lm,
            Some(&adapter),
            &reversed,
            &LmTrainConfig { seed: 2, ..config },
        );
        let adapted = bits_per_byte(&lm, Some(&adapter), &reversed);
        assert!(
            adapted < 0.6 * base_on_reversed,
            "{base_on_reversed} → {adapted}"
        );
        for (a, b) in before.iter().zip(lm.vs.trainable_variables()) {
            assert!(a.equal(&b), "the base changed while training the adapter");
        }
    }
}
