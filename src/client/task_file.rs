//! Task files: one task as JSON — the architecture, the descriptor's
//! features and support set, and optionally the task's data — the form
//! `weightgen task` writes and `weightgen generate --task`, the demo and the
//! Python client read.
//!
//! ```json
//! {"architecture": "digits-mlp-64-32-5", "num_classes": 5,
//!  "task": {"family": "digits", "classes": [3, 5, 6, 8, 9]},
//!  "features": {"input_mean": [4.9], ...},
//!  "support": {"inputs": [[...64 pixels 0–16...], ...], "targets": [[3.0], ...]},
//!  "data": {"objective": "classification",
//!           "train_x": [[...]], "train_y": [0, 4, ...], "test_x": ..., "test_y": ...}}
//! ```
//!
//! `data` holds inputs as the network takes them (digits pixels scaled to
//! 0–1), targets as class indices or rows of values.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::proto::v1 as pb;
use crate::tasks::featurizer::{Descriptor, describe};
use crate::tasks::train::{Objective, TaskData};
use crate::tasks::{Family, TaskError, TaskSpec};

/// Why a task file cannot be written, read or used.
#[derive(Debug, thiserror::Error)]
pub enum TaskFileError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The JSON does not describe a task.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: String,
        /// The cause.
        source: serde_json::Error,
    },
    /// The task is not one of its family's.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// The file has no `data` section, or it is malformed.
    #[error("data: {0}")]
    Data(String),
    /// A `words` task's lists cannot be read.
    #[error(transparent)]
    Words(#[from] crate::tasks::words::WordsError),
}

/// Rows of support inputs and targets (a class index is a one-value row).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SupportRows {
    /// One row per example.
    pub inputs: Vec<Vec<f32>>,
    /// One row per example.
    pub targets: Vec<Vec<f32>>,
}

/// Targets of a split: class indices or rows of values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Targets {
    /// Class indices.
    Labels(Vec<i64>),
    /// One row of values per example.
    Values(Vec<Vec<f32>>),
}

/// A task's data, as the network takes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskFileData {
    /// Classification or regression.
    pub objective: Objective,
    /// Training inputs, one row per example.
    pub train_x: Vec<Vec<f32>>,
    /// Training targets.
    pub train_y: Targets,
    /// Test inputs.
    pub test_x: Vec<Vec<f32>>,
    /// Test targets.
    pub test_y: Targets,
}

/// One task, as a client sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskFile {
    /// Architecture to generate weights for.
    pub architecture: String,
    /// Classes of a classification task (0 otherwise).
    #[serde(default)]
    pub num_classes: u32,
    /// The built-in task it describes, when it is one (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskSpec>,
    /// Feature values by name.
    pub features: BTreeMap<String, Vec<f64>>,
    /// Few-shot support set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub support: Option<SupportRows>,
    /// The task's data, for fine-tuning and scoring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<TaskFileData>,
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    let t = t.to_device(Device::Cpu).to_kind(Kind::Float);
    let width = t.size().get(1).copied().unwrap_or(1).max(1) as usize;
    let flat = Vec::<f32>::try_from(t.reshape([-1])).unwrap_or_default();
    flat.chunks(width).map(<[f32]>::to_vec).collect()
}

fn targets(objective: Objective, t: &Tensor) -> Targets {
    match objective {
        Objective::Classification => {
            Targets::Labels(Vec::<i64>::try_from(t.to_device(Device::Cpu)).unwrap_or_default())
        }
        Objective::Regression | Objective::LanguageModel => Targets::Values(rows(t)),
    }
}

fn tensor_rows(values: &[Vec<f32>], what: &str) -> Result<Tensor, TaskFileError> {
    let width = values.first().map_or(0, Vec::len);
    if let Some(i) = values.iter().position(|r| r.len() != width) {
        return Err(TaskFileError::Data(format!(
            "{what}[{i}] has {} values, the first row {width}",
            values[i].len()
        )));
    }
    let flat: Vec<f32> = values.iter().flatten().copied().collect();
    Ok(Tensor::from_slice(&flat).reshape([values.len() as i64, width as i64]))
}

fn tensor_targets(targets: &Targets, what: &str) -> Result<Tensor, TaskFileError> {
    match targets {
        Targets::Labels(labels) => Ok(Tensor::from_slice(labels)),
        Targets::Values(rows) => tensor_rows(rows, what),
    }
}

impl TaskFile {
    /// The file of a built-in family's task: descriptor from the shared
    /// featurizer, and the task's data.
    pub fn of_task(family: Family, architecture: &str, task: &TaskSpec) -> Result<Self, TaskError> {
        family.validate(task)?;
        let data = family.data(task, Device::Cpu)?;
        let descriptor = describe(family, task, &data);
        let objective = family.objective();
        let num_classes = match task {
            TaskSpec::Digits { classes } => classes.len() as u32,
            _ => 0,
        };
        Ok(Self {
            architecture: architecture.to_owned(),
            num_classes,
            task: Some(task.clone()),
            features: descriptor.features,
            support: (!descriptor.support_x.is_empty()).then_some(SupportRows {
                inputs: descriptor.support_x,
                targets: descriptor.support_y,
            }),
            data: Some(TaskFileData {
                objective,
                train_x: rows(&data.train_x),
                train_y: targets(objective, &data.train_y),
                test_x: rows(&data.test_x),
                test_y: targets(objective, &data.test_y),
            }),
        })
    }

    /// The file of a `words` task: `examples` of its training words drawn
    /// by frequency from `seed` (what a user would paste) as the support
    /// set, their byte shares and mean length as the features; no data
    /// (the words are scored through the base model).
    pub fn of_words_task(
        architecture: &str,
        task: &TaskSpec,
        lists: &crate::tasks::words::WordLists,
        examples: usize,
        seed: u64,
    ) -> Result<Self, TaskFileError> {
        Family::Words.validate(task)?;
        let words_task = task
            .words_task()
            .ok_or_else(|| TaskError::InvalidTask(format!("{task:?} is not a valid words task")))?;
        let words = words_task.words(lists, crate::tasks::words::WordSplit::Train)?;
        let descriptor = crate::tasks::featurizer::describe_words(
            &crate::tasks::words::task::draw_support(&words, examples, seed),
        );
        Ok(Self {
            architecture: architecture.to_owned(),
            num_classes: 0,
            task: Some(task.clone()),
            features: descriptor.features,
            support: (!descriptor.support_x.is_empty()).then_some(SupportRows {
                inputs: descriptor.support_x,
                targets: descriptor.support_y,
            }),
            data: None,
        })
    }

    /// Reads a task file.
    pub fn read(path: &Path) -> Result<Self, TaskFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TaskFileError::Io {
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| TaskFileError::Json {
            path: path.display().to_string(),
            source,
        })
    }

    /// Writes it as JSON.
    pub fn write(&self, path: &Path) -> Result<(), TaskFileError> {
        let io = |source| TaskFileError::Io {
            path: path.display().to_string(),
            source,
        };
        let text = serde_json::to_string(self).map_err(|source| TaskFileError::Json {
            path: path.display().to_string(),
            source,
        })?;
        std::fs::write(path, text).map_err(io)
    }

    /// The featurizer's view of it.
    pub fn descriptor(&self) -> Descriptor {
        let (support_x, support_y) = self
            .support
            .as_ref()
            .map(|s| (s.inputs.clone(), s.targets.clone()))
            .unwrap_or_default();
        Descriptor {
            features: self.features.clone(),
            support_x,
            support_y,
        }
    }

    /// The GenerateInit task descriptor.
    pub fn to_proto(&self) -> pb::TaskDescriptor {
        let tensor = |rows: &[Vec<f32>]| pb::FloatTensor {
            shape: vec![rows.len() as u64, rows.first().map_or(0, Vec::len) as u64],
            values: rows.iter().flatten().copied().collect(),
        };
        pb::TaskDescriptor {
            architecture: self.architecture.clone(),
            features: self
                .features
                .iter()
                .map(|(k, values)| {
                    (
                        k.clone(),
                        pb::FeatureValue {
                            values: values.clone(),
                        },
                    )
                })
                .collect(),
            embedding: Vec::new(),
            support: self.support.as_ref().map(|s| pb::SupportSet {
                inputs: Some(tensor(&s.inputs)),
                targets: Some(tensor(&s.targets)),
            }),
            num_classes: self.num_classes,
        }
    }

    /// The data section as tensors on `device`.
    pub fn task_data(&self, device: Device) -> Result<(Objective, TaskData), TaskFileError> {
        let data = self
            .data
            .as_ref()
            .ok_or_else(|| TaskFileError::Data("the task file has no data section".into()))?;
        let on = |t: Tensor| t.to_device(device);
        Ok((
            data.objective,
            TaskData {
                train_x: on(tensor_rows(&data.train_x, "train_x")?),
                train_y: on(tensor_targets(&data.train_y, "train_y")?),
                test_x: on(tensor_rows(&data.test_x, "test_x")?),
                test_y: on(tensor_targets(&data.test_y, "test_y")?),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::convert::descriptor_from_proto;

    #[test]
    fn a_digits_task_round_trips_through_json_and_proto() {
        let task = TaskSpec::Digits {
            classes: vec![3, 5, 6, 8, 9],
        };
        let file = TaskFile::of_task(Family::Digits, "digits-mlp-64-32-5", &task).unwrap();
        assert_eq!(file.num_classes, 5);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("task.json");
        file.write(&path).unwrap();
        let read = TaskFile::read(&path).unwrap();
        assert_eq!(read, file);
        // The proto carries the same descriptor the featurizer made.
        let back = descriptor_from_proto(&read.to_proto(), "task").unwrap();
        assert_eq!(back, file.descriptor());
        // The data section gives back the family's tensors.
        let original = Family::Digits.data(&task, Device::Cpu).unwrap();
        let (objective, data) = read.task_data(Device::Cpu).unwrap();
        assert_eq!(objective, Objective::Classification);
        assert!(data.train_x.allclose(&original.train_x, 0.0, 0.0, false));
        assert!(data.test_y.equal(&original.test_y));
    }

    #[test]
    fn bad_files_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("task.json");
        std::fs::write(&path, r#"{"architecture": "a"}"#).unwrap();
        let err = TaskFile::read(&path).unwrap_err().to_string();
        assert!(err.contains("missing field `features`"), "{err}");
        std::fs::write(&path, r#"{"architecture": "a", "features": {}}"#).unwrap();
        let file = TaskFile::read(&path).unwrap();
        let err = file.task_data(Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("no data section"), "{err}");
        let mut file = file;
        file.data = Some(TaskFileData {
            objective: Objective::Regression,
            train_x: vec![vec![1.0], vec![1.0, 2.0]],
            train_y: Targets::Values(vec![vec![1.0], vec![2.0]]),
            test_x: vec![],
            test_y: Targets::Values(vec![]),
        });
        let err = file.task_data(Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("train_x[1] has 2 values"), "{err}");
    }
}
