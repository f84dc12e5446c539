//! The one featurizer: a task's dataset → its descriptor (named features in
//! the family's schema order, plus a support set of K examples). The zoo
//! builder, the trainer, the server and the evaluation all call this, and
//! every zoo and denoiser records the schema it used.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::families::{DIGITS_WAYS, Family, TaskSpec};
use super::schema::{FeatureSchema, FeatureSpec, SupportInputs, SupportSpec};
use super::train::TaskData;
use super::words::lm::{END, MAX_WORD_BYTES, readable};
use super::words::task::{FEATURE_DIM, word_features};

/// Support examples per class of a digits task.
pub const DIGITS_SUPPORT_PER_CLASS: usize = 5;
/// Support pairs of a sinusoid task.
pub const SINUSOID_SUPPORT: usize = 10;
/// Support pixels of a digit-inr task.
pub const INR_SUPPORT: usize = 64;
/// Most support examples a request may carry.
pub const MAX_SUPPORT: usize = 256;
/// Largest magnitude of a support value a request may send. Every family's
/// inputs and targets lie far inside it (digits pixels 0–16, sinusoid and
/// INR coordinates and values within ±10); values beyond it only push the
/// task encoder out of finite arithmetic.
pub const MAX_SUPPORT_MAGNITUDE: f32 = 1e4;

/// A task as the denoiser sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Descriptor {
    /// Named feature values.
    pub features: BTreeMap<String, Vec<f64>>,
    /// Support inputs, one row per example.
    #[serde(default)]
    pub support_x: Vec<Vec<f32>>,
    /// Support targets: a class index (as one value) or the target values.
    #[serde(default)]
    pub support_y: Vec<Vec<f32>>,
}

/// A checked support set as flat values.
#[derive(Debug, Clone, PartialEq)]
pub struct SupportValues {
    /// K, the number of support examples.
    pub examples: usize,
    /// Values per input.
    pub input_width: usize,
    /// Values per target (1 for a class index).
    pub target_width: usize,
    /// Whether targets are class indices.
    pub classification: bool,
    /// K × input_width values.
    pub inputs: Vec<f32>,
    /// K × target_width values.
    pub targets: Vec<f32>,
}

/// Why a descriptor does not fit a schema.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FeatureError {
    /// The offending feature, or "support".
    pub field: String,
    /// Why.
    pub reason: String,
}

fn feature(name: &str, description: &str, length: usize, min: f64, max: f64) -> FeatureSpec {
    FeatureSpec {
        name: name.into(),
        description: description.into(),
        length,
        min,
        max,
        required: true,
    }
}

/// The feature schema of a family.
pub fn schema(family: Family) -> FeatureSchema {
    match family {
        Family::Sinusoid => FeatureSchema {
            features: vec![
                feature("target_mean", "mean of the training targets", 1, -5.0, 5.0),
                feature(
                    "target_std",
                    "population standard deviation of the training targets",
                    1,
                    0.0,
                    5.0,
                ),
            ],
            embedding_dim: 0,
            support: Some(SupportSpec {
                input_shape: vec![1],
                target_shape: vec![1],
                classification: false,
                min_examples: 1,
                max_examples: MAX_SUPPORT,
                required: true,
                inputs: SupportInputs::Values,
            }),
        },
        Family::Digits => FeatureSchema {
            features: vec![
                feature(
                    "class_one_hot",
                    "one-hot of the digit c_i of each label i, label-major (5 × 10)",
                    DIGITS_WAYS * 10,
                    0.0,
                    1.0,
                ),
                feature(
                    "input_mean",
                    "mean pixel value (0–16) of the training images",
                    1,
                    0.0,
                    16.0,
                ),
                feature(
                    "input_std",
                    "population standard deviation of the pixels",
                    1,
                    0.0,
                    16.0,
                ),
                feature(
                    "label_histogram",
                    "share of training images per label",
                    DIGITS_WAYS,
                    0.0,
                    1.0,
                ),
            ],
            embedding_dim: 0,
            support: Some(SupportSpec {
                input_shape: vec![64],
                target_shape: vec![],
                classification: true,
                min_examples: 1,
                max_examples: MAX_SUPPORT,
                required: false,
                inputs: SupportInputs::Values,
            }),
        },
        Family::Words => FeatureSchema {
            features: vec![
                feature(
                    "byte_frequencies",
                    "each byte value's share of all bytes of the example words (256)",
                    256,
                    0.0,
                    1.0,
                ),
                feature(
                    "mean_length",
                    "mean length of the example words in bytes, over 31",
                    1,
                    0.0,
                    1.0,
                ),
            ],
            embedding_dim: 0,
            support: Some(SupportSpec {
                input_shape: vec![WORD_ROW],
                target_shape: vec![0],
                classification: false,
                min_examples: 1,
                max_examples: MAX_SUPPORT,
                required: false,
                inputs: SupportInputs::ByteTokens,
            }),
        },
        Family::DigitInr => FeatureSchema {
            features: vec![
                feature(
                    "pixel_mean",
                    "mean pixel value (0–1) of the 16×16 image",
                    1,
                    0.0,
                    1.0,
                ),
                feature(
                    "pixel_std",
                    "population standard deviation of the pixels",
                    1,
                    0.0,
                    1.0,
                ),
            ],
            embedding_dim: 0,
            support: Some(SupportSpec {
                input_shape: vec![2],
                target_shape: vec![1],
                classification: false,
                min_examples: 1,
                max_examples: MAX_SUPPORT,
                required: true,
                inputs: SupportInputs::Values,
            }),
        },
    }
}

fn moments(t: &Tensor) -> (f64, f64) {
    let t = t.to_kind(Kind::Double);
    (
        t.mean(Kind::Double).double_value(&[]),
        t.std(false).double_value(&[]),
    )
}

/// A stable per-task seed for choosing support examples.
fn task_seed(task: &TaskSpec) -> u64 {
    crate::rng::fnv1a(crate::rng::FNV_OFFSET, task.key().as_bytes())
}

fn rows(t: &Tensor, index: &[i64]) -> Vec<Vec<f32>> {
    let picked = t
        .index_select(0, &Tensor::from_slice(index).to_device(t.device()))
        .to_kind(Kind::Float)
        .to_device(Device::Cpu);
    let width = picked.size().iter().skip(1).product::<i64>().max(1);
    let flat = Vec::<f32>::try_from(picked.reshape([-1])).unwrap_or_default();
    flat.chunks(width as usize).map(<[f32]>::to_vec).collect()
}

/// The descriptor of `task` from its data.
pub fn describe(family: Family, task: &TaskSpec, data: &TaskData) -> Descriptor {
    let mut features = BTreeMap::new();
    let mut rng = StdRng::seed_from_u64(task_seed(task));
    let n = data.train_x.size()[0];
    let mut order: Vec<i64> = (0..n).collect();
    order.shuffle(&mut rng);
    let support: Vec<i64> = match (family, task) {
        (Family::Digits, TaskSpec::Digits { classes }) => {
            let mut one_hot = vec![0.0; DIGITS_WAYS * 10];
            for (label, &c) in classes.iter().enumerate() {
                one_hot[label * 10 + usize::from(c)] = 1.0;
            }
            features.insert("class_one_hot".into(), one_hot);
            let (mean, std) = moments(&(&data.train_x * 16.0));
            features.insert("input_mean".into(), vec![mean]);
            features.insert("input_std".into(), vec![std]);
            let labels =
                Vec::<i64>::try_from(data.train_y.to_device(Device::Cpu)).unwrap_or_default();
            let mut histogram = vec![0.0; DIGITS_WAYS];
            for &l in &labels {
                histogram[l as usize] += 1.0 / labels.len().max(1) as f64;
            }
            features.insert("label_histogram".into(), histogram);
            // The first DIGITS_SUPPORT_PER_CLASS shuffled images of each label.
            let mut taken = [0usize; DIGITS_WAYS];
            order
                .iter()
                .copied()
                .filter(|&i| {
                    let label = labels[i as usize] as usize;
                    taken[label] += 1;
                    taken[label] <= DIGITS_SUPPORT_PER_CLASS
                })
                .collect()
        }
        (Family::Sinusoid, _) => {
            let (mean, std) = moments(&data.train_y);
            features.insert("target_mean".into(), vec![mean]);
            features.insert("target_std".into(), vec![std]);
            order.into_iter().take(SINUSOID_SUPPORT).collect()
        }
        // A words task has no tensor data (`describe_words`).
        (Family::Words, _) => Vec::new(),
        _ => {
            let (mean, std) = moments(&data.train_y);
            features.insert("pixel_mean".into(), vec![mean]);
            features.insert("pixel_std".into(), vec![std]);
            order.into_iter().take(INR_SUPPORT).collect()
        }
    };
    let (support_x, support_y) = support_rows(family, data, &support);
    Descriptor {
        features,
        support_x,
        support_y,
    }
}

/// Values per word of a `words` support set: its UTF-8 bytes (0–255), then
/// the end token (256) to the end of the row.
pub const WORD_ROW: usize = MAX_WORD_BYTES + 1;

/// The descriptor of a `words` task from its example words (the support
/// set a client sends): the bytes' frequencies and the mean length as
/// features, each word as a row of [`WORD_ROW`] token values, no targets.
/// Words the model cannot read (empty, longer than 31 bytes) are left out.
pub fn describe_words<S: AsRef<str>>(words: &[S]) -> Descriptor {
    let readable: Vec<&str> = words
        .iter()
        .map(AsRef::as_ref)
        .filter(|w| readable(w))
        .collect();
    let values = word_features(&readable);
    let mut features = BTreeMap::new();
    features.insert(
        "byte_frequencies".to_owned(),
        values[..256].iter().map(|&v| f64::from(v)).collect(),
    );
    features.insert("mean_length".to_owned(), vec![f64::from(values[256])]);
    let support_x = readable
        .iter()
        .map(|w| {
            let mut row = vec![END as f32; WORD_ROW];
            for (slot, &b) in row.iter_mut().zip(w.as_bytes()) {
                *slot = f32::from(b);
            }
            row
        })
        .collect::<Vec<_>>();
    Descriptor {
        features,
        support_y: vec![Vec::new(); support_x.len()],
        support_x,
    }
}

/// The word a [`SupportInputs::ByteTokens`] row holds, or why it holds none:
/// integer values, bytes 0–255 then only the end token 256, at least one
/// byte, valid UTF-8.
pub fn word_of_row(row: &[f32]) -> Result<String, String> {
    let mut bytes = Vec::new();
    let mut ended = false;
    for (j, &v) in row.iter().enumerate() {
        if v.fract() != 0.0 || !(0.0..=END as f32).contains(&v) {
            return Err(format!(
                "value {j} is {v}, not a byte 0–255 or the end token 256"
            ));
        }
        match (v as i64 == END, ended) {
            (true, _) => ended = true,
            (false, true) => {
                return Err(format!("value {j} is a byte after the end token"));
            }
            (false, false) => bytes.push(v as u8),
        }
    }
    if bytes.is_empty() {
        return Err("the word is empty".into());
    }
    if !ended {
        return Err("the row has no end token (256) after the word".into());
    }
    String::from_utf8(bytes).map_err(|e| format!("the word is not valid UTF-8: {e}"))
}

/// Training examples `indices` of `data` as support rows, in the units a
/// descriptor carries them (digits pixels 0–16, class indices as values).
fn support_rows(
    family: Family,
    data: &TaskData,
    indices: &[i64],
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let scale = if family == Family::Digits { 16.0 } else { 1.0 };
    let support_x: Vec<Vec<f32>> = rows(&(&data.train_x * scale), indices);
    let support_y = if family.objective() == super::train::Objective::Classification {
        rows(&data.train_y.to_kind(Kind::Float).unsqueeze(1), indices)
    } else {
        rows(&data.train_y, indices)
    };
    (support_x, support_y)
}

/// Every training example of `data` as a descriptor with a support set and
/// no features: what a few-shot learner is given.
pub fn support_descriptor(family: Family, data: &TaskData) -> Descriptor {
    let all: Vec<i64> = (0..data.train_x.size()[0]).collect();
    let (support_x, support_y) = support_rows(family, data, &all);
    Descriptor {
        features: Default::default(),
        support_x,
        support_y,
    }
}

/// Up to `size` training examples of `task` (in the task's shuffled order),
/// as a descriptor's support rows: the pool that training draws random
/// K-subsets from, so the encoder learns from any K examples of a task, not
/// one fixed set.
pub fn support_pool(
    family: Family,
    task: &TaskSpec,
    data: &TaskData,
    size: usize,
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let mut rng = StdRng::seed_from_u64(task_seed(task));
    let n = data.train_x.size()[0];
    let mut order: Vec<i64> = (0..n).collect();
    order.shuffle(&mut rng);
    order.truncate(size);
    support_rows(family, data, &order)
}

impl Descriptor {
    /// The feature values in schema order, after checking every name,
    /// length, range and value (errors name the feature).
    pub fn feature_vector(&self, schema: &FeatureSchema) -> Result<Vec<f32>, FeatureError> {
        let error = |field: &str, reason: String| FeatureError {
            field: field.to_owned(),
            reason,
        };
        if let Some(unknown) = self
            .features
            .keys()
            .find(|k| !schema.features.iter().any(|f| &f.name == *k))
        {
            return Err(error(unknown, "unknown feature for this schema".into()));
        }
        let mut out = Vec::with_capacity(schema.feature_width());
        for spec in &schema.features {
            let Some(values) = self.features.get(&spec.name) else {
                if spec.required {
                    return Err(error(&spec.name, "required and missing".into()));
                }
                out.extend(std::iter::repeat_n(0.0, spec.length));
                continue;
            };
            if values.len() != spec.length {
                return Err(error(
                    &spec.name,
                    format!("has {} values, expected {}", values.len(), spec.length),
                ));
            }
            for (i, &v) in values.iter().enumerate() {
                if !v.is_finite() {
                    return Err(error(
                        &spec.name,
                        format!("value {i} is {v}, not a finite number"),
                    ));
                }
                if v < spec.min || v > spec.max {
                    return Err(error(
                        &spec.name,
                        format!("value {i} is {v}, outside [{}, {}]", spec.min, spec.max),
                    ));
                }
            }
            out.extend(values.iter().map(|&v| v as f32));
        }
        Ok(out)
    }

    /// The support set's values after checking counts, shapes, values and
    /// labels against the schema (errors name "support"); no tensors.
    pub fn support_values(
        &self,
        schema: &FeatureSchema,
        ways: usize,
    ) -> Result<Option<SupportValues>, FeatureError> {
        let error = |reason: String| FeatureError {
            field: "support".into(),
            reason,
        };
        let Some(spec) = &schema.support else {
            return if self.support_x.is_empty() {
                Ok(None)
            } else {
                Err(error("this schema takes no support set".into()))
            };
        };
        let k = self.support_x.len();
        if k == 0 {
            return if spec.required {
                Err(error("required and missing".into()))
            } else {
                Ok(None)
            };
        }
        if k != self.support_y.len() || k < spec.min_examples || k > spec.max_examples {
            return Err(error(format!(
                "{k} inputs and {} targets; expected equal counts in [{}, {}]",
                self.support_y.len(),
                spec.min_examples,
                spec.max_examples
            )));
        }
        let in_width: usize = spec.input_shape.iter().product();
        let out_width: usize = if spec.classification {
            1
        } else {
            spec.target_shape.iter().product()
        };
        let mut xs = Vec::with_capacity(k * in_width);
        let mut ys = Vec::with_capacity(k * out_width);
        for (i, (x, y)) in self.support_x.iter().zip(&self.support_y).enumerate() {
            if x.len() != in_width || y.len() != out_width {
                return Err(error(format!(
                    "example {i} has {} input and {} target values, expected {in_width} and {out_width}",
                    x.len(),
                    y.len()
                )));
            }
            if let Some(v) = x.iter().chain(y).find(|v| !v.is_finite()) {
                return Err(error(format!("example {i} holds {v}, not a finite number")));
            }
            if let Some(v) = x.iter().chain(y).find(|v| v.abs() > MAX_SUPPORT_MAGNITUDE) {
                return Err(error(format!(
                    "example {i} holds {v}, outside [-{MAX_SUPPORT_MAGNITUDE}, {MAX_SUPPORT_MAGNITUDE}]"
                )));
            }
            if spec.inputs == SupportInputs::ByteTokens {
                word_of_row(x).map_err(|reason| error(format!("example {i}: {reason}")))?;
            }
            if spec.classification && (y[0] < 0.0 || y[0] as usize >= ways || y[0].fract() != 0.0) {
                return Err(error(format!(
                    "example {i} has label {}, expected 0..{ways}",
                    y[0]
                )));
            }
            xs.extend_from_slice(x);
            ys.extend_from_slice(y);
        }
        Ok(Some(SupportValues {
            examples: k,
            input_width: in_width,
            target_width: out_width,
            classification: spec.classification,
            inputs: xs,
            targets: ys,
        }))
    }

    /// The support set as tensors: x [K, in] and y [K, out] (class indices
    /// one-hot over `ways`), after the checks of `support_values`.
    pub fn support_tensors(
        &self,
        schema: &FeatureSchema,
        ways: usize,
    ) -> Result<Option<(Tensor, Tensor)>, FeatureError> {
        let Some(v) = self.support_values(schema, ways)? else {
            return Ok(None);
        };
        let (k, in_width, out_width) = (
            v.examples as i64,
            v.input_width as i64,
            v.target_width as i64,
        );
        let x = match schema.support.as_ref().map(|s| s.inputs) {
            Some(SupportInputs::ByteTokens) => {
                // Checked by support_values: every row is a word.
                let bags: Vec<f32> = v
                    .inputs
                    .chunks(v.input_width.max(1))
                    .flat_map(|row| {
                        let word = word_of_row(row).unwrap_or_default();
                        word_features(&[word.as_str()])
                    })
                    .collect();
                Tensor::from_slice(&bags).reshape([k, FEATURE_DIM as i64])
            }
            _ => Tensor::from_slice(&v.inputs).reshape([k, in_width]),
        };
        let y = Tensor::from_slice(&v.targets).reshape([k, out_width]);
        let y = if v.classification {
            y.squeeze_dim(1)
                .to_kind(Kind::Int64)
                .one_hot(ways as i64)
                .to_kind(Kind::Float)
        } else {
            y
        };
        Ok(Some((x, y)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_travel_as_byte_tokens_and_reach_the_encoder_as_bags_of_bytes() {
        let d = describe_words(&["día", "a", "", "abcdefghijklmnopqrstuvwxyzabcdefg"]);
        // The empty and the 33-byte word are left out.
        assert_eq!(d.support_x.len(), 2);
        assert_eq!(word_of_row(&d.support_x[0]).unwrap(), "día");
        let schema = schema(Family::Words);
        let (x, y) = d.support_tensors(&schema, 1).unwrap().unwrap();
        assert_eq!((x.size(), y.size()), (vec![2, 257], vec![2, 0]));
        // "a": all of its one byte is 'a', length 1 of 31.
        assert_eq!(x.double_value(&[1, 97]), 1.0);
        assert!((x.double_value(&[1, 256]) - 1.0 / 31.0).abs() < 1e-6);
        assert_eq!(d.feature_vector(&schema).unwrap().len(), 257);
        let bad = |row: Vec<f32>| {
            let d = Descriptor {
                features: Default::default(),
                support_x: vec![row],
                support_y: vec![Vec::new()],
            };
            d.support_tensors(&schema, 1).unwrap_err().to_string()
        };
        let mut row = vec![END as f32; WORD_ROW];
        row[0] = 0xC3 as f32; // a lone lead byte
        assert!(bad(row.clone()).contains("not valid UTF-8"), "{}", bad(row));
        let mut after = vec![END as f32; WORD_ROW];
        after[1] = 97.0;
        assert!(bad(after).contains("after the end token"));
        let mut fraction = vec![END as f32; WORD_ROW];
        fraction[0] = 97.5;
        assert!(bad(fraction).starts_with("support: example 0: value 0 is 97.5"));
        assert!(bad(vec![END as f32; WORD_ROW]).contains("empty"));
        assert!(bad(vec![97.0; WORD_ROW]).contains("no end token"));
    }

    #[test]
    fn descriptors_fit_their_schema_and_are_deterministic() {
        let cases = [
            (
                Family::Sinusoid,
                TaskSpec::Sinusoid {
                    amplitude: 3.0,
                    phase: 0.5,
                },
                1,
            ),
            (
                Family::Digits,
                TaskSpec::Digits {
                    classes: vec![7, 2, 0, 5, 9],
                },
                DIGITS_WAYS,
            ),
            (Family::DigitInr, TaskSpec::DigitInr { image: 5 }, 1),
        ];
        for (family, task, ways) in cases {
            let data = family.data(&task, Device::Cpu).unwrap();
            let d = describe(family, &task, &data);
            assert_eq!(d, describe(family, &task, &data));
            let schema = schema(family);
            let v = d.feature_vector(&schema).unwrap();
            assert_eq!(v.len(), schema.feature_width());
            let (x, y) = d.support_tensors(&schema, ways).unwrap().unwrap();
            assert_eq!(x.size()[0], y.size()[0]);
        }
        // Digits: the one-hot says which digit each label is.
        let task = TaskSpec::Digits {
            classes: vec![7, 2, 0, 5, 9],
        };
        let d = describe(
            Family::Digits,
            &task,
            &Family::Digits.data(&task, Device::Cpu).unwrap(),
        );
        let one_hot = &d.features["class_one_hot"];
        assert_eq!(one_hot[7], 1.0);
        assert_eq!(one_hot[10 + 2], 1.0);
        assert_eq!(one_hot.iter().sum::<f64>(), 5.0);
        assert_eq!(d.support_x.len(), DIGITS_WAYS * DIGITS_SUPPORT_PER_CLASS);
        // Sinusoid: the target spread reflects the amplitude.
        let task = TaskSpec::Sinusoid {
            amplitude: 3.0,
            phase: 0.5,
        };
        let d = describe(
            Family::Sinusoid,
            &task,
            &Family::Sinusoid.data(&task, Device::Cpu).unwrap(),
        );
        assert!((d.features["target_std"][0] - 3.0 / 2f64.sqrt()).abs() < 0.4);
    }

    #[test]
    fn bad_descriptors_name_the_feature_and_the_reason() {
        let schema = schema(Family::Digits);
        let task = TaskSpec::Digits {
            classes: vec![1, 2, 3, 4, 5],
        };
        let good = describe(
            Family::Digits,
            &task,
            &Family::Digits.data(&task, Device::Cpu).unwrap(),
        );
        let check = |edit: &dyn Fn(&mut Descriptor), field: &str, reason: &str| {
            let mut d = good.clone();
            edit(&mut d);
            let err = d
                .feature_vector(&schema)
                .and_then(|_| {
                    d.support_tensors(&schema, DIGITS_WAYS)
                        .map(|_| Vec::<f32>::new())
                })
                .unwrap_err();
            assert_eq!(err.field, field, "{err}");
            assert!(err.reason.contains(reason), "{err}");
        };
        check(
            &|d| {
                d.features.remove("input_mean");
            },
            "input_mean",
            "missing",
        );
        check(
            &|d| {
                d.features.insert("bogus".into(), vec![1.0]);
            },
            "bogus",
            "unknown",
        );
        check(
            &|d| {
                d.features.insert("input_std".into(), vec![1.0, 2.0]);
            },
            "input_std",
            "expected 1",
        );
        check(
            &|d| {
                d.features.insert("input_std".into(), vec![f64::NAN]);
            },
            "input_std",
            "finite",
        );
        check(
            &|d| {
                d.features.insert("input_mean".into(), vec![99.0]);
            },
            "input_mean",
            "outside",
        );
        check(
            &|d| {
                d.support_y[0] = vec![7.0];
            },
            "support",
            "label",
        );
        check(
            &|d| {
                d.support_x[1].pop();
            },
            "support",
            "example 1",
        );
        check(
            &|d| {
                d.support_y.pop();
            },
            "support",
            "targets",
        );
    }
}
