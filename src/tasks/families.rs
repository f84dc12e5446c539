//! The built-in task families: what a task is, its data and split, its
//! networks, and the held-out tasks no zoo ever contains.
//!
//! - `sinusoid`: y = A·sin(x − φ), A ∈ [0.1, 5], φ ∈ [0, π], x ∈ [−5, 5]
//!   (the MAML regression benchmark); MLP 1-40-40-1. Held out: the corner
//!   A ∈ [4, 5] × φ ∈ [2, π].
//! - `digits`: the 1,797 UCI 8×8 handwritten digits (embedded by smartcore);
//!   a task is an ordered 5-way subset (label i ↔ class c_i); MLP 64-32-5 and
//!   a small CNN. Every third image of each class is a test image and never
//!   trains a zoo model. Held out: every 8th unordered 5-subset of the ten
//!   classes in lexicographic order, starting at the 4th (32 of 252).
//! - `digit-inr`: a Fourier-feature coordinate MLP fitting one digit image
//!   upsampled to 16×16. Held out: the test images.
//! - `words`: the words of a language, or of two mixed with weight α
//!   (wordfreq's lists, `tasks::words`); a model is a LoRA adapter of a
//!   frozen byte-level language model. Held out: the languages of
//!   [`HELD_OUT_LANGUAGES`] (one in a script the zoo sees, Latin and
//!   Cyrillic; two in scripts it never sees, Hebrew and Tamil), alone or
//!   mixed, and the language pairs [`words_pair_held_out`] keeps from zoo
//!   mixtures.

use std::f64::consts::PI;
use std::ops::RangeInclusive;
use std::sync::OnceLock;

use rand::Rng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::nets::{NetKind, Network};
use super::train::{Objective, TaskData, TrainConfig};
use super::words::lm::{ByteLmConfig, LoraConfig, adapter_arch};
use super::words::task::WordsTask;
use super::words::{HELD_OUT_LANGUAGES, UNSEEN_SCRIPT_LANGUAGES, WORDFREQ_LANGUAGES};
use crate::weights::ArchSpec;

/// Classes per digits task.
pub const DIGITS_WAYS: usize = 5;
/// Amplitudes of sinusoid tasks.
pub const SINUSOID_AMPLITUDE: RangeInclusive<f64> = 0.1..=5.0;
/// Phases of sinusoid tasks.
pub const SINUSOID_PHASE: RangeInclusive<f64> = 0.0..=PI;
/// Amplitudes of the extrapolation split (with [`SINUSOID_HELD_OUT_PHASE`]):
/// a corner of the task range, so zoo-derived inits extrapolate.
pub const SINUSOID_HELD_OUT_AMPLITUDE: RangeInclusive<f64> = 4.0..=5.0;
/// Phases of the extrapolation split (with [`SINUSOID_HELD_OUT_AMPLITUDE`]).
pub const SINUSOID_HELD_OUT_PHASE: RangeInclusive<f64> = 2.0..=PI;
/// Amplitude bands of the interpolation split: crossed with
/// [`SINUSOID_INTERPOLATION_PHASES`] they make four cells no zoo model is
/// trained on, each surrounded by zoo tasks on every side (the MAML
/// benchmark's setting: new tasks from the zoo's own range).
pub const SINUSOID_INTERPOLATION_AMPLITUDES: [RangeInclusive<f64>; 2] = [1.5..=2.0, 3.0..=3.5];
/// Phase bands of the interpolation split.
pub const SINUSOID_INTERPOLATION_PHASES: [RangeInclusive<f64>; 2] = [0.5..=1.0, 2.0..=2.5];
/// Training points of a sinusoid task.
pub const SINUSOID_TRAIN_POINTS: usize = 100;
/// Evenly spaced test points of a sinusoid task.
pub const SINUSOID_TEST_POINTS: usize = 200;
/// Side of the upsampled digit an INR fits.
pub const INR_SIDE: i64 = 16;
/// The range of a `words` mixture's weight α that tasks are drawn from.
pub const WORDS_ALPHA: RangeInclusive<f64> = 0.1..=0.9;
/// One in this many pairs of zoo languages is never mixed in a zoo task.
pub const WORDS_HELD_OUT_PAIR_ONE_IN: u64 = 8;

/// Which held-out tasks an evaluation draws. Zoos never contain a task of
/// either split.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeldOutSplit {
    /// New tasks inside the range the zoo covers (every family's primary split).
    #[default]
    Interpolation,
    /// Tasks outside the zoo's range (`sinusoid` only: amplitudes 4–5 with
    /// phases 2–π).
    Extrapolation,
}

impl HeldOutSplit {
    /// Both splits.
    pub const ALL: [Self; 2] = [Self::Interpolation, Self::Extrapolation];

    /// The split's name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Interpolation => "interpolation",
            Self::Extrapolation => "extrapolation",
        }
    }
}

impl std::str::FromStr for HeldOutSplit {
    type Err = TaskError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|split| split.name() == s)
            .ok_or_else(|| {
                TaskError::InvalidTask(format!(
                    "held-out split {s:?}: expected interpolation or extrapolation"
                ))
            })
    }
}

/// A family of tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// Sine regression.
    Sinusoid,
    /// 5-way digit classification.
    Digits,
    /// Neural fields of digit images.
    DigitInr,
    /// LoRA adapters of a byte-level language model for languages and
    /// their mixtures.
    Words,
}

/// One task of a family.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "family", rename_all = "kebab-case")]
pub enum TaskSpec {
    /// y = amplitude · sin(x − phase).
    Sinusoid {
        /// A, in [0.1, 5] for the family's own tasks.
        amplitude: f64,
        /// φ.
        phase: f64,
    },
    /// Label i is digit `classes[i]`.
    Digits {
        /// The classes, in label order.
        classes: Vec<u8>,
    },
    /// Fit image `image` of the digits set.
    DigitInr {
        /// Index into the 1,797 images.
        image: usize,
    },
    /// The words of `language` (weight `alpha`), mixed with `second`'s
    /// (weight 1 − α) when given.
    Words {
        /// A wordfreq language code, e.g. "en".
        language: String,
        /// The other language of a mixture.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        second: Option<String>,
        /// The weight of `language`: 1 alone, strictly inside (0, 1) in a
        /// mixture.
        #[serde(default = "one")]
        alpha: f64,
    },
}

fn one() -> f64 {
    1.0
}

impl TaskSpec {
    /// The task's identity as a string (its JSON form: a cache key).
    pub fn key(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The family it belongs to.
    pub fn family(&self) -> Family {
        match self {
            Self::Sinusoid { .. } => Family::Sinusoid,
            Self::Digits { .. } => Family::Digits,
            Self::DigitInr { .. } => Family::DigitInr,
            Self::Words { .. } => Family::Words,
        }
    }

    /// A `words` task as the words module reads it (None for another
    /// family's task, or an invalid mixture).
    pub fn words_task(&self) -> Option<WordsTask> {
        match self {
            Self::Words {
                language,
                second: None,
                ..
            } => Some(WordsTask::language(language)),
            Self::Words {
                language,
                second: Some(second),
                alpha,
            } => WordsTask::mixture(language, second, *alpha).ok(),
            _ => None,
        }
    }
}

/// Whether zoo tasks never mix languages `a` and `b` (one pair in
/// [`WORDS_HELD_OUT_PAIR_ONE_IN`], by a stable hash of the sorted pair):
/// the unseen mixtures of the held-out split.
pub fn words_pair_held_out(a: &str, b: &str) -> bool {
    let (first, second) = if a <= b { (a, b) } else { (b, a) };
    let key = format!("{first}+{second}");
    crate::rng::splitmix64(crate::rng::fnv1a(crate::rng::FNV_OFFSET, key.as_bytes()))
        .is_multiple_of(WORDS_HELD_OUT_PAIR_ONE_IN)
}

/// The languages zoo tasks draw from: wordfreq's, less the held-out ones.
pub fn words_zoo_languages() -> Vec<&'static str> {
    WORDFREQ_LANGUAGES
        .iter()
        .copied()
        .filter(|l| !HELD_OUT_LANGUAGES.contains(l))
        .collect()
}

/// Why a task or family cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TaskError {
    /// Unknown family name.
    #[error("family: unknown family {0:?} (known: sinusoid, digits, digit-inr, words)")]
    UnknownFamily(String),
    /// Unknown architecture for the family.
    #[error("architecture: {family} has no architecture {name:?} (known: {known})")]
    UnknownArchitecture {
        /// The family asked for.
        family: &'static str,
        /// Requested name.
        name: String,
        /// Known names.
        known: String,
    },
    /// A task's parameters are out of range.
    #[error("task: {0}")]
    InvalidTask(String),
    /// The family's tasks are not tensors a network runs on alone (a
    /// `words` adapter runs inside its base model: `tasks::words`).
    #[error("task: {family} tasks have no standalone data: {reason}")]
    NoTensorData {
        /// The family.
        family: &'static str,
        /// Where its data lives instead.
        reason: &'static str,
    },
}

/// The digits data set: inputs [1797, 64] in 0..16 and labels.
pub struct Digits {
    /// Row-major pixels.
    pub pixels: Vec<f32>,
    /// Class of each image.
    pub labels: Vec<u8>,
}

/// The embedded digits, loaded once.
pub fn digits() -> &'static Digits {
    static DIGITS: OnceLock<Digits> = OnceLock::new();
    DIGITS.get_or_init(|| {
        let data = smartcore::dataset::digits::load_dataset();
        Digits {
            pixels: data.data,
            labels: data.target.iter().map(|&y| y as u8).collect(),
        }
    })
}

/// Whether image `index` is a test image (every third image of its class).
pub fn is_test_image(index: usize) -> bool {
    static TEST: OnceLock<Vec<bool>> = OnceLock::new();
    TEST.get_or_init(|| {
        let mut seen = [0usize; 10];
        digits()
            .labels
            .iter()
            .map(|&c| {
                seen[c as usize] += 1;
                seen[c as usize] % 3 == 0
            })
            .collect()
    })[index]
}

/// The held-out unordered class sets of `digits` (sorted).
pub fn held_out_class_sets() -> &'static [Vec<u8>] {
    static SETS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SETS.get_or_init(|| {
        let mut all = Vec::new();
        combinations(
            &(0..10).collect::<Vec<u8>>(),
            DIGITS_WAYS,
            &mut Vec::new(),
            &mut all,
        );
        all.into_iter()
            .enumerate()
            .filter(|(i, _)| i % 8 == 3)
            .map(|(_, s)| s)
            .collect()
    })
}

fn combinations(items: &[u8], k: usize, current: &mut Vec<u8>, out: &mut Vec<Vec<u8>>) {
    if current.len() == k {
        out.push(current.clone());
        return;
    }
    for (i, &item) in items.iter().enumerate() {
        current.push(item);
        combinations(&items[i + 1..], k, current, out);
        current.pop();
    }
}

impl Family {
    /// Every family.
    pub const ALL: [Family; 4] = [
        Family::Sinusoid,
        Family::Digits,
        Family::DigitInr,
        Family::Words,
    ];

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sinusoid => "sinusoid",
            Self::Digits => "digits",
            Self::DigitInr => "digit-inr",
            Self::Words => "words",
        }
    }

    /// The family called `name`.
    pub fn parse(name: &str) -> Result<Self, TaskError> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == name)
            .ok_or_else(|| TaskError::UnknownFamily(name.to_owned()))
    }

    /// What its models predict.
    pub fn objective(self) -> Objective {
        match self {
            Self::Digits => Objective::Classification,
            Self::Sinusoid | Self::DigitInr => Objective::Regression,
            Self::Words => Objective::LanguageModel,
        }
    }

    /// Its architectures; the first is the default.
    pub fn networks(self) -> Vec<Network> {
        let build = || -> Result<Vec<Network>, crate::weights::LayoutError> {
            Ok(match self {
                Self::Sinusoid => vec![Network::mlp(
                    "sinusoid-mlp-1-40-40-1",
                    "sinusoid",
                    &[1, 40, 40, 1],
                )?],
                Self::Digits => vec![
                    Network::mlp("digits-mlp-64-32-5", "digits", &[64, 32, DIGITS_WAYS])?,
                    Network::small_cnn("digits-cnn-8-16-5", "digits", 8, 16, DIGITS_WAYS)?,
                    // Other widths: zoos for a denoiser of several
                    // architectures, and one it never saw (48).
                    Network::mlp("digits-mlp-64-64-5", "digits", &[64, 64, DIGITS_WAYS])?,
                    Network::mlp("digits-mlp-64-48-5", "digits", &[64, 48, DIGITS_WAYS])?,
                ],
                Self::DigitInr => vec![Network {
                    spec: ArchSpec::sequential_mlp(
                        "digit-inr-fourier-32-32-32-1",
                        "digit-inr",
                        &[32, 32, 32, 1],
                    )?,
                    kind: NetKind::FourierMlp {
                        frequencies: 16,
                        scale: 1.5,
                        seed: 2024,
                    },
                }],
                Self::Words => {
                    let (base, lora) = (ByteLmConfig::default(), LoraConfig::default());
                    vec![Network {
                        spec: adapter_arch(base, lora),
                        kind: NetKind::LoraAdapter { base, lora },
                    }]
                }
            })
        };
        build().expect("built-in architectures are valid")
    }

    /// The architecture called `name` (empty: the default).
    pub fn network(self, name: &str) -> Result<Network, TaskError> {
        let all = self.networks();
        if name.is_empty() {
            return Ok(all[0].clone());
        }
        all.iter()
            .find(|n| n.spec.name == name)
            .cloned()
            .ok_or_else(|| TaskError::UnknownArchitecture {
                family: self.name(),
                name: name.to_owned(),
                known: all
                    .iter()
                    .map(|n| n.spec.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// How its zoo models are trained by default.
    pub fn train_config(self) -> TrainConfig {
        match self {
            Self::Sinusoid => TrainConfig {
                steps: 1000,
                learning_rate: 1e-2,
                batch_size: 0,
                keep_snapshots: 0,
            },
            Self::Digits => TrainConfig {
                steps: 200,
                learning_rate: 1e-2,
                batch_size: 0,
                keep_snapshots: 0,
            },
            Self::DigitInr => TrainConfig {
                steps: 500,
                learning_rate: 5e-3,
                batch_size: 0,
                keep_snapshots: 0,
            },
            // 100 steps reach 79 % of a 1,600-step adapter's gain at 37
            // adapters a minute on 2 cores (examples/words_sizing.rs).
            Self::Words => TrainConfig {
                steps: 100,
                learning_rate: 3e-3,
                batch_size: 64,
                keep_snapshots: 0,
            },
        }
    }

    /// A random task: from the zoo's side of the split, or a held-out one of
    /// the primary (interpolation) split.
    pub fn sample_task(self, rng: &mut StdRng, held_out: bool) -> TaskSpec {
        match held_out {
            true => self.sample_held_out(rng, HeldOutSplit::Interpolation),
            false => self.sample(rng, None),
        }
    }

    /// The held-out splits this family has: every family has the
    /// interpolation split, only `sinusoid` an extrapolation split.
    pub fn splits(self) -> &'static [HeldOutSplit] {
        match self {
            Self::Sinusoid => &HeldOutSplit::ALL,
            Self::Digits | Self::DigitInr | Self::Words => &[HeldOutSplit::Interpolation],
        }
    }

    /// A random held-out task of `split` (a family without that split draws
    /// from its interpolation split; [`Self::splits`] says which it has).
    pub fn sample_held_out(self, rng: &mut StdRng, split: HeldOutSplit) -> TaskSpec {
        self.sample(rng, Some(split))
    }

    /// What the held-out tasks of `split` are, in words (for reports).
    pub fn split_description(self, split: HeldOutSplit) -> &'static str {
        match (self, split) {
            (Self::Sinusoid, HeldOutSplit::Interpolation) => {
                "interpolation split: amplitudes 1.5–2 or 3–3.5 with phases 0.5–1 or 2–2.5, \
                 cells inside the zoo's range that no zoo model was trained on"
            }
            (Self::Sinusoid, HeldOutSplit::Extrapolation) => {
                "extrapolation split: amplitudes 4–5 with phases 2–π, a corner outside the zoo's tasks"
            }
            (Self::Digits, _) => "class sets no zoo model was trained on",
            (Self::DigitInr, _) => "test images no zoo model was fitted to",
            (Self::Words, _) => {
                "languages no zoo adapter saw (pl, uk: scripts the zoo has; he, ta: scripts it \
                 has not), alone or mixed, and language pairs no zoo mixture used"
            }
        }
    }

    fn sample(self, rng: &mut StdRng, split: Option<HeldOutSplit>) -> TaskSpec {
        loop {
            let task = match self {
                Self::Sinusoid if split == Some(HeldOutSplit::Extrapolation) => {
                    TaskSpec::Sinusoid {
                        amplitude: rng.random_range(SINUSOID_HELD_OUT_AMPLITUDE),
                        phase: rng.random_range(SINUSOID_HELD_OUT_PHASE),
                    }
                }
                Self::Sinusoid if split.is_some() => {
                    let band = |bands: &[RangeInclusive<f64>; 2], rng: &mut StdRng| {
                        let which = rng.random_range(0..bands.len());
                        rng.random_range(bands[which].clone())
                    };
                    TaskSpec::Sinusoid {
                        amplitude: band(&SINUSOID_INTERPOLATION_AMPLITUDES, rng),
                        phase: band(&SINUSOID_INTERPOLATION_PHASES, rng),
                    }
                }
                Self::Sinusoid => TaskSpec::Sinusoid {
                    amplitude: rng.random_range(SINUSOID_AMPLITUDE),
                    phase: rng.random_range(SINUSOID_PHASE),
                },
                Self::Digits => {
                    let mut classes: Vec<u8> = (0..10).collect();
                    classes.shuffle(rng);
                    classes.truncate(DIGITS_WAYS);
                    TaskSpec::Digits { classes }
                }
                Self::DigitInr => TaskSpec::DigitInr {
                    image: rng.random_range(0..digits().labels.len()),
                },
                Self::Words => sample_words(rng, split.is_some()),
            };
            if self.is_held_out(&task) == split.is_some() {
                return task;
            }
        }
    }

    /// The group a held-out task belongs to, where a family's held-out
    /// tasks differ in kind and reports show the groups apart: a `words`
    /// task involving a language whose script the zoo never saw, or not.
    /// None for the other families.
    pub fn held_out_group(self, task: &TaskSpec) -> Option<&'static str> {
        let TaskSpec::Words {
            language, second, ..
        } = task
        else {
            return None;
        };
        let unseen = |l: &str| UNSEEN_SCRIPT_LANGUAGES.contains(&l);
        Some(
            if unseen(language) || second.as_deref().is_some_and(unseen) {
                "a script no zoo language uses (he, ta)"
            } else {
                "scripts the zoo has"
            },
        )
    }

    /// Whether `task` is on the held-out side of any split (zoos draw none).
    pub fn is_held_out(self, task: &TaskSpec) -> bool {
        match task {
            TaskSpec::Sinusoid { amplitude, phase } => {
                let extrapolation = SINUSOID_HELD_OUT_AMPLITUDE.contains(amplitude)
                    && SINUSOID_HELD_OUT_PHASE.contains(phase);
                let interpolation = SINUSOID_INTERPOLATION_AMPLITUDES
                    .iter()
                    .any(|band| band.contains(amplitude))
                    && SINUSOID_INTERPOLATION_PHASES
                        .iter()
                        .any(|band| band.contains(phase));
                extrapolation || interpolation
            }
            TaskSpec::Digits { classes } => {
                let mut set = classes.clone();
                set.sort_unstable();
                held_out_class_sets().contains(&set)
            }
            TaskSpec::DigitInr { image } => is_test_image(*image),
            TaskSpec::Words {
                language, second, ..
            } => {
                let held = |l: &str| HELD_OUT_LANGUAGES.contains(&l);
                held(language)
                    || second
                        .as_deref()
                        .is_some_and(|s| held(s) || words_pair_held_out(language, s))
            }
        }
    }

    /// Checks that `task` belongs to this family and is in range.
    pub fn validate(self, task: &TaskSpec) -> Result<(), TaskError> {
        let bad = |m: String| Err(TaskError::InvalidTask(m));
        match (self, task) {
            (Self::Sinusoid, TaskSpec::Sinusoid { amplitude, phase }) => {
                if !SINUSOID_AMPLITUDE.contains(amplitude) || !SINUSOID_PHASE.contains(phase) {
                    return bad(format!(
                        "amplitude {amplitude} or phase {phase} out of range"
                    ));
                }
            }
            (Self::Digits, TaskSpec::Digits { classes }) => {
                let mut set = classes.clone();
                set.sort_unstable();
                set.dedup();
                if classes.len() != DIGITS_WAYS
                    || set.len() != DIGITS_WAYS
                    || set.iter().any(|&c| c > 9)
                {
                    return bad(format!(
                        "classes {classes:?} must be {DIGITS_WAYS} distinct digits 0–9"
                    ));
                }
            }
            (Self::DigitInr, TaskSpec::DigitInr { image }) => {
                if *image >= digits().labels.len() {
                    return bad(format!(
                        "image {image} is not one of the {} images",
                        digits().labels.len()
                    ));
                }
            }
            (
                Self::Words,
                TaskSpec::Words {
                    language,
                    second,
                    alpha,
                },
            ) => {
                for l in std::iter::once(language).chain(second) {
                    if !WORDFREQ_LANGUAGES.contains(&l.as_str()) {
                        return bad(format!(
                            "language {:?} is not one of wordfreq's: {}",
                            l.chars().take(16).collect::<String>(),
                            WORDFREQ_LANGUAGES.join(", ")
                        ));
                    }
                }
                match second {
                    None if *alpha != 1.0 => {
                        return bad(format!("alpha {alpha}: a single language has alpha 1"));
                    }
                    Some(second) => {
                        WordsTask::mixture(language, second, *alpha)
                            .map_err(|e| TaskError::InvalidTask(e.to_string()))?;
                    }
                    None => {}
                }
            }
            _ => return bad(format!("{task:?} is not a {} task", self.name())),
        }
        Ok(())
    }

    /// The task's data on `device`.
    pub fn data(self, task: &TaskSpec, device: Device) -> Result<TaskData, TaskError> {
        self.validate(task)?;
        Ok(match task {
            TaskSpec::Sinusoid { amplitude, phase } => {
                let seed = amplitude.to_bits() ^ phase.to_bits().rotate_left(17);
                let mut noise = crate::rng::SeededNoise::new(&[seed], 0x5150);
                let u = (noise
                    .draw(&[SINUSOID_TRAIN_POINTS as i64, 1], Device::Cpu)
                    .squeeze_dim(0)
                    / std::f64::consts::SQRT_2)
                    .erf();
                let train_x = u * 5.0;
                let test_x = Tensor::linspace(
                    -5.0,
                    5.0,
                    SINUSOID_TEST_POINTS as i64,
                    (Kind::Float, Device::Cpu),
                )
                .unsqueeze(1);
                let f = |x: &Tensor| (x - *phase).sin() * *amplitude;
                TaskData {
                    train_y: f(&train_x).to_device(device),
                    test_y: f(&test_x).to_device(device),
                    train_x: train_x.to_device(device),
                    test_x: test_x.to_device(device),
                }
            }
            TaskSpec::Digits { classes } => {
                let d = digits();
                let mut split = [(Vec::new(), Vec::new()), (Vec::new(), Vec::new())];
                for (i, &c) in d.labels.iter().enumerate() {
                    if let Some(label) = classes.iter().position(|&k| k == c) {
                        let part = &mut split[usize::from(is_test_image(i))];
                        part.0.extend_from_slice(&d.pixels[i * 64..(i + 1) * 64]);
                        part.1.push(label as i64);
                    }
                }
                let tensors = |(x, y): &(Vec<f32>, Vec<i64>)| {
                    (
                        (Tensor::from_slice(x).reshape([-1, 64]) / 16.0).to_device(device),
                        Tensor::from_slice(y).to_device(device),
                    )
                };
                let (train_x, train_y) = tensors(&split[0]);
                let (test_x, test_y) = tensors(&split[1]);
                TaskData {
                    train_x,
                    train_y,
                    test_x,
                    test_y,
                }
            }
            TaskSpec::Words { .. } => {
                return Err(TaskError::NoTensorData {
                    family: "words",
                    reason: "its words are read from the word lists and scored through the \
                             base model (tasks::words)",
                });
            }
            TaskSpec::DigitInr { image } => {
                let (coords, values) = inr_pixels(*image);
                TaskData {
                    train_x: coords.to_device(device),
                    train_y: values.to_device(device),
                    test_x: coords.to_device(device),
                    test_y: values.to_device(device),
                }
            }
        })
    }
}

/// A `words` task: a language alone or a mixture of two, drawn equally
/// often. Zoo side: languages and pairs of [`words_zoo_languages`] that
/// are not held out. Held out: a held-out language alone, one mixed with a
/// zoo language, or a held-out pair of zoo languages, drawn equally often.
fn sample_words(rng: &mut StdRng, held_out: bool) -> TaskSpec {
    let zoo = words_zoo_languages();
    let pick = |rng: &mut StdRng, from: &[&'static str]| from[rng.random_range(0..from.len())];
    let alpha = |rng: &mut StdRng| rng.random_range(WORDS_ALPHA);
    let mixture = |first: &str, second: &str, alpha: f64| TaskSpec::Words {
        language: first.to_owned(),
        second: Some(second.to_owned()),
        alpha,
    };
    let alone = |language: &str| TaskSpec::Words {
        language: language.to_owned(),
        second: None,
        alpha: 1.0,
    };
    loop {
        let task = match (held_out, rng.random_range(0..3u8)) {
            (false, 0) => alone(pick(rng, &zoo)),
            (false, _) => {
                let (a, b) = (pick(rng, &zoo), pick(rng, &zoo));
                if a == b || words_pair_held_out(a, b) {
                    continue;
                }
                mixture(a, b, alpha(rng))
            }
            (true, 0) => alone(pick(rng, &HELD_OUT_LANGUAGES)),
            (true, 1) => {
                let (a, b) = (pick(rng, &HELD_OUT_LANGUAGES), pick(rng, &zoo));
                mixture(a, b, alpha(rng))
            }
            (true, _) => {
                let (a, b) = (pick(rng, &zoo), pick(rng, &zoo));
                if a == b || !words_pair_held_out(a, b) {
                    continue;
                }
                mixture(a, b, alpha(rng))
            }
        };
        return task;
    }
}

/// Coordinates [256, 2] in [−1, 1] and values [256, 1] in [0, 1] of image
/// `index` upsampled bilinearly to 16×16.
pub fn inr_pixels(index: usize) -> (Tensor, Tensor) {
    let d = digits();
    let image =
        Tensor::from_slice(&d.pixels[index * 64..(index + 1) * 64]).reshape([1, 1, 8, 8]) / 16.0;
    let up = image
        .upsample_bilinear2d([INR_SIDE, INR_SIDE], false, None, None)
        .reshape([-1, 1]);
    let axis = Tensor::linspace(-1.0, 1.0, INR_SIDE, (Kind::Float, Device::Cpu));
    let grid = Tensor::meshgrid_indexing(&[&axis, &axis], "ij");
    let coords = Tensor::stack(&[grid[0].reshape([-1]), grid[1].reshape([-1])], 1);
    (coords, up)
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn the_digits_are_the_uci_set_and_split_by_class() {
        let d = digits();
        assert_eq!((d.labels.len(), d.pixels.len()), (1797, 1797 * 64));
        assert!(d.pixels.iter().all(|&p| (0.0..=16.0).contains(&p)));
        let tests = (0..1797).filter(|&i| is_test_image(i)).count();
        assert!((590..=610).contains(&tests), "{tests} test images");
        assert_eq!(held_out_class_sets().len(), 32);
    }

    #[test]
    fn zoo_tasks_never_fall_in_the_held_out_split() {
        let mut rng = StdRng::seed_from_u64(1);
        for family in Family::ALL {
            for _ in 0..300 {
                let zoo = family.sample_task(&mut rng, false);
                assert!(!family.is_held_out(&zoo));
                family.validate(&zoo).unwrap();
                for &split in family.splits() {
                    let held = family.sample_held_out(&mut rng, split);
                    assert!(family.is_held_out(&held), "{held:?}");
                    family.validate(&held).unwrap();
                }
            }
        }
    }

    #[test]
    fn sinusoid_interpolation_cells_lie_inside_the_zoo_range() {
        // Every cell has zoo tasks on all four sides, so a held-out task of
        // the interpolation split is surrounded by training tasks.
        for amplitudes in &SINUSOID_INTERPOLATION_AMPLITUDES {
            for phases in &SINUSOID_INTERPOLATION_PHASES {
                let (a0, a1) = (*amplitudes.start(), *amplitudes.end());
                let (p0, p1) = (*phases.start(), *phases.end());
                let (a, p) = ((a0 + a1) / 2.0, (p0 + p1) / 2.0);
                for (amplitude, phase) in
                    [(a0 - 0.2, p), (a1 + 0.2, p), (a, p0 - 0.2), (a, p1 + 0.2)]
                {
                    let task = TaskSpec::Sinusoid { amplitude, phase };
                    Family::Sinusoid.validate(&task).unwrap();
                    assert!(!Family::Sinusoid.is_held_out(&task), "{task:?}");
                }
            }
        }
        let mut rng = StdRng::seed_from_u64(2);
        let drawn: Vec<TaskSpec> = (0..400)
            .map(|_| Family::Sinusoid.sample_held_out(&mut rng, HeldOutSplit::Interpolation))
            .collect();
        for task in &drawn {
            let TaskSpec::Sinusoid { amplitude, .. } = task else {
                panic!("{task:?}")
            };
            assert!(!SINUSOID_HELD_OUT_AMPLITUDE.contains(amplitude), "{task:?}");
        }
        assert_eq!(
            "extrapolation".parse::<HeldOutSplit>().unwrap(),
            HeldOutSplit::Extrapolation
        );
        assert!("corner".parse::<HeldOutSplit>().is_err());
    }

    #[test]
    fn words_tasks_read_as_json_and_hold_out_languages_and_pairs() {
        let alone: TaskSpec =
            serde_json::from_str(r#"{"family":"words","language":"en"}"#).unwrap();
        assert_eq!(
            alone,
            TaskSpec::Words {
                language: "en".into(),
                second: None,
                alpha: 1.0
            }
        );
        assert_eq!(
            alone.key(),
            r#"{"family":"words","language":"en","alpha":1.0}"#
        );
        Family::Words.validate(&alone).unwrap();
        assert!(!Family::Words.is_held_out(&alone));
        let polish = TaskSpec::Words {
            language: "de".into(),
            second: Some("pl".into()),
            alpha: 0.5,
        };
        assert!(Family::Words.is_held_out(&polish));
        let tamil = TaskSpec::Words {
            language: "de".into(),
            second: Some("ta".into()),
            alpha: 0.5,
        };
        let seen = Family::Words.held_out_group(&polish).unwrap();
        let unseen = Family::Words.held_out_group(&tamil).unwrap();
        assert!(unseen.contains("no zoo language") && seen != unseen);
        let digits = TaskSpec::Digits {
            classes: vec![0, 1, 2, 3, 4],
        };
        assert_eq!(Family::Digits.held_out_group(&digits), None);
        // One zoo pair in eight is never mixed: both kinds exist.
        let zoo = words_zoo_languages();
        let pairs: Vec<bool> = zoo
            .iter()
            .flat_map(|a| zoo.iter().map(move |b| words_pair_held_out(a, b)))
            .collect();
        let held = pairs.iter().filter(|&&h| h).count();
        assert!(
            held > 0 && held < pairs.len() / 4,
            "{held} of {}",
            pairs.len()
        );
        assert_eq!(
            words_pair_held_out("en", "de"),
            words_pair_held_out("de", "en")
        );
        for (task, field) in [
            (r#"{"family":"words","language":"xx"}"#, "language \"xx\""),
            (
                r#"{"family":"words","language":"en","alpha":0.5}"#,
                "alpha 0.5",
            ),
            (
                r#"{"family":"words","language":"en","second":"en","alpha":0.5}"#,
                "languages:",
            ),
            (
                r#"{"family":"words","language":"en","second":"de","alpha":1.0}"#,
                "alpha:",
            ),
        ] {
            let task: TaskSpec = serde_json::from_str(task).unwrap();
            let refused = Family::Words.validate(&task).unwrap_err().to_string();
            assert!(refused.contains(field), "{refused}");
        }
        // No tensors: the words live in the lists, scored through the base.
        let refused = Family::Words.data(&alone, Device::Cpu).unwrap_err();
        assert!(
            matches!(refused, TaskError::NoTensorData { .. }),
            "{refused}"
        );
        let net = Family::Words.network("").unwrap();
        assert!(
            net.forward(
                &net.init(1, Device::Cpu),
                &Tensor::zeros([1, 2], (Kind::Int64, Device::Cpu))
            )
            .is_err()
        );
    }

    #[test]
    fn task_data_has_the_promised_shapes() {
        let digits = Family::Digits
            .data(
                &TaskSpec::Digits {
                    classes: vec![3, 1, 4, 0, 9],
                },
                Device::Cpu,
            )
            .unwrap();
        assert_eq!(digits.train_x.size()[1], 64);
        // UCI class counts: 183 + 182 + 181 + 178 + 180.
        assert_eq!(digits.train_x.size()[0] + digits.test_x.size()[0], 904);
        assert_eq!(digits.train_y.max().int64_value(&[]), 4);
        let sine = Family::Sinusoid
            .data(
                &TaskSpec::Sinusoid {
                    amplitude: 2.0,
                    phase: 1.0,
                },
                Device::Cpu,
            )
            .unwrap();
        assert_eq!(sine.train_x.size(), [100, 1]);
        assert!(sine.train_x.abs().max().double_value(&[]) <= 5.0);
        let inr = Family::DigitInr
            .data(&TaskSpec::DigitInr { image: 0 }, Device::Cpu)
            .unwrap();
        assert_eq!(inr.train_x.size(), [256, 2]);
        let err = Family::Digits
            .data(
                &TaskSpec::Digits {
                    classes: vec![1, 1, 2, 3, 4],
                },
                Device::Cpu,
            )
            .unwrap_err();
        assert!(err.to_string().starts_with("task:"), "{err}");
    }
}
