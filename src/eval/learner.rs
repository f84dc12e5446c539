//! What fine-tuning an init on a task means for a zoo's kind of network,
//! so the harness runs one protocol over every family. A network that runs
//! alone learns from its task's tensors (full-batch Adam, the metric after
//! every step); a LoRA adapter of the `words` family learns from its
//! task's words through the frozen base (Adam on minibatches of words drawn
//! by frequency, bits per byte on the task's test words every few steps).

use std::sync::Arc;

use rand::Rng;
use rand::rngs::StdRng;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Tensor};

use super::finetune::{
    FinetuneConfig, curve as tensor_curve, test_metric as tensor_metric, trainable_copy,
};
use crate::tasks::featurizer::{describe_words, support_descriptor};
use crate::tasks::train::{TaskData, loss};
use crate::tasks::words::WeightedDraws;
use crate::tasks::words::WordSplit;
use crate::tasks::words::lm::{Adapter, batch_loss, bits_per_byte, readable};
use crate::tasks::words::task::draw_support;
use crate::tasks::{Descriptor, TaskSpec, describe};
use crate::zoo::ZooDataset;
use crate::zoo::words::{TaskWords, WordsScorer, pairs};

/// Words per fine-tuning step of an adapter: the zoo builder's batch.
pub const WORDS_FINETUNE_BATCH: usize = 64;

/// Seed of the word draws of every fine-tuning run: every init of a run
/// sees the same minibatches, so only the init differs.
const WORDS_DRAW_SEED: u64 = 0x5EED_0F3D;

/// What a task gives to learn from and to be scored on.
pub enum Examples {
    /// A network that runs alone: the task's tensors.
    Tensors(TaskData),
    /// A LoRA adapter: the task's words and their weights.
    Words {
        /// Training words (all of them, or a few-shot draw).
        train: TaskWords,
        /// Test words.
        test: TaskWords,
    },
}

impl Examples {
    /// `task`'s examples in `data`'s zoo (None when they cannot be made).
    pub fn of(data: &ZooDataset, task: &TaskSpec) -> Option<Self> {
        match &data.words {
            Some(words) => Some(Self::Words {
                train: words.words(task, WordSplit::Train)?,
                test: words.words(task, WordSplit::Test)?,
            }),
            None => data.family.data(task, Device::Cpu).ok().map(Self::Tensors),
        }
    }

    /// The descriptor a client would send for `task` (these are its
    /// examples; a words zoo's scorer draws its example words).
    pub fn describe(&self, data: &ZooDataset, task: &TaskSpec) -> Option<Descriptor> {
        match self {
            Self::Tensors(d) => Some(describe(data.family, task, d)),
            Self::Words { .. } => Some(data.words.as_ref()?.describe(task)),
        }
    }

    /// The first `k` training examples in a seeded shuffled order (tensors)
    /// or `k` training words drawn by frequency from `seed` (words); the
    /// test examples stay.
    pub fn few_shot(&self, k: usize, seed: u64) -> Self {
        match self {
            Self::Tensors(d) => Self::Tensors(super::protocol::few_shot_data(d, k, seed)),
            Self::Words { train, test } => Self::Words {
                train: Arc::new(
                    draw_support(train, k, seed)
                        .into_iter()
                        .map(|w| (w, 1.0))
                        .collect(),
                ),
                test: test.clone(),
            },
        }
    }

    /// These training examples as a support set alone (no features).
    pub fn support_descriptor(&self, data: &ZooDataset) -> Descriptor {
        match self {
            Self::Tensors(d) => support_descriptor(data.family, d),
            Self::Words { train, .. } => Descriptor {
                features: Default::default(),
                ..describe_words(&first_words(train))
            },
        }
    }
}

fn first_words(words: &[(String, f64)]) -> Vec<&str> {
    words.iter().map(|(w, _)| w.as_str()).collect()
}

/// The training words a model reads and the draws by their weights.
fn readable_words(train: &[(String, f64)]) -> (Vec<&str>, WeightedDraws) {
    let (words, weights): (Vec<&str>, Vec<f64>) = train
        .iter()
        .filter(|(w, _)| readable(w))
        .map(|(w, f)| (w.as_str(), *f))
        .unzip();
    (words, WeightedDraws::new(weights))
}

fn scorer(data: &ZooDataset) -> Result<&WordsScorer, tch::TchError> {
    data.words
        .as_ref()
        .ok_or_else(|| tch::TchError::Kind("a words zoo without its base model".into()))
}

fn adapter(scorer: &WordsScorer, params: &[Tensor]) -> Result<Adapter, tch::TchError> {
    Adapter::from_params(scorer.lora(), scorer.arch(), params)
        .map_err(|e| tch::TchError::Kind(e.to_string()))
}

/// The test metric of `params` on `examples` (accuracy, MSE or bits per
/// byte; NaN where it cannot be computed).
pub fn test_metric(data: &ZooDataset, params: &[Tensor], examples: &Examples) -> f64 {
    match examples {
        Examples::Tensors(d) => tensor_metric(&data.network, params, d, data.family.objective()),
        Examples::Words { test, .. } => scorer(data)
            .and_then(|s| {
                Ok(bits_per_byte(
                    s.lm(),
                    Some(&adapter(s, params)?),
                    &pairs(test),
                ))
            })
            .unwrap_or(f64::NAN),
    }
}

/// The test metric before fine-tuning and after each of `config.steps`
/// Adam steps from `init`. Words runs measure it at step 0, every
/// `every` steps and at the last step; a step in between carries the last
/// measured value, so a target counts as reached when it was measured
/// reached (tensor runs measure every step).
pub fn curve(
    data: &ZooDataset,
    init: &[Tensor],
    examples: &Examples,
    config: &FinetuneConfig,
    every: usize,
) -> Result<Vec<f64>, tch::TchError> {
    let (train, test) = match examples {
        Examples::Tensors(d) => {
            return tensor_curve(&data.network, init, d, data.family.objective(), config);
        }
        Examples::Words { train, test } => (train, test),
    };
    let scorer = scorer(data)?;
    let (vs, params) = trainable_copy(init);
    let adapter = adapter(scorer, &params)?;
    let (words, draws) = readable_words(train);
    let test = pairs(test);
    let metric = || bits_per_byte(scorer.lm(), Some(&adapter), &test);
    let mut optimizer = nn::Adam::default().build(&vs, config.learning_rate)?;
    let every = every.max(1);
    let mut out = Vec::with_capacity(config.steps + 1);
    out.push(metric());
    for step in 0..config.steps {
        if words.is_empty() {
            break;
        }
        let batch: Vec<&str> = draws
            .draw(WORDS_FINETUNE_BATCH, WORDS_DRAW_SEED, (step as u64) << 20)
            .into_iter()
            .map(|i| words[i])
            .collect();
        optimizer.backward_step(&batch_loss(scorer.lm(), Some(&adapter), &batch));
        let done = step + 1;
        let last = out.last().copied().unwrap_or(f64::NAN);
        out.push(if done % every == 0 || done == config.steps {
            metric()
        } else {
            last
        });
    }
    Ok(out)
}

/// The gradient of the task loss at `params` on a minibatch of
/// `batch_size` examples drawn with `rng` (0 = the whole training set;
/// words: [`WORDS_FINETUNE_BATCH`] words by frequency). Zeros where the
/// loss cannot be computed.
pub fn gradient(
    data: &ZooDataset,
    params: &[Tensor],
    examples: &Examples,
    batch_size: usize,
    rng: &mut StdRng,
) -> Vec<Tensor> {
    let zeros = || params.iter().map(Tensor::zeros_like).collect();
    let loss = match examples {
        Examples::Tensors(d) => {
            let (x, y) = tensor_batch(d, batch_size, rng);
            match data.network.forward(params, &x) {
                Ok(outputs) => loss(data.family.objective(), &outputs, &y),
                Err(_) => return zeros(),
            }
        }
        Examples::Words { train, .. } => {
            let (words, draws) = readable_words(train);
            let (Ok(scorer), false) = (scorer(data), words.is_empty()) else {
                return zeros();
            };
            let Ok(adapter) = adapter(scorer, params) else {
                return zeros();
            };
            let size = if batch_size == 0 {
                WORDS_FINETUNE_BATCH
            } else {
                batch_size
            };
            let batch: Vec<&str> = draws
                .draw(size, rng.random(), 0)
                .into_iter()
                .map(|i| words[i])
                .collect();
            batch_loss(scorer.lm(), Some(&adapter), &batch)
        }
    };
    Tensor::run_backward(&[loss], params, false, false)
}

fn tensor_batch(data: &TaskData, size: usize, rng: &mut StdRng) -> (Tensor, Tensor) {
    let n = data.train_x.size()[0];
    if size == 0 || size as i64 >= n {
        return (data.train_x.shallow_clone(), data.train_y.shallow_clone());
    }
    let index: Vec<i64> = (0..size).map(|_| rng.random_range(0..n)).collect();
    let index = Tensor::from_slice(&index);
    (
        data.train_x.index_select(0, &index),
        data.train_y.index_select(0, &index),
    )
}

/// FLOPs of one fine-tuning step (forward + backward ≈ 3 forwards, 2 per
/// weight per row): rows are the training examples (full batch), or for
/// an adapter the bytes of a batch of words through the base and adapter.
pub fn step_flops(data: &ZooDataset, examples: &Examples) -> f64 {
    let weights = data.weights.size()[1] as f64;
    match examples {
        Examples::Tensors(d) => 3.0 * 2.0 * weights * d.train_x.size()[0] as f64,
        Examples::Words { train, .. } => {
            let base: f64 = data.words.as_ref().map_or(0.0, |s| {
                s.lm()
                    .vs
                    .variables()
                    .values()
                    .map(|t| t.numel() as f64)
                    .sum()
            });
            let (bytes, weight) = train.iter().fold((0.0, 0.0), |(b, w), (word, f)| {
                (b + f * (word.len() + 1) as f64, w + f)
            });
            let per_word = bytes / f64::max(weight, f64::MIN_POSITIVE);
            3.0 * 2.0 * (base + weights) * per_word * WORDS_FINETUNE_BATCH as f64
        }
    }
}
