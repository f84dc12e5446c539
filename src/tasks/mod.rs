//! Task families and the descriptor featurizer shared by zoo building,
//! training, serving and evaluation: what a task is, its data and split,
//! the small networks its zoo models use, how they are trained, and the
//! feature schema every zoo and denoiser records.

pub mod families;
pub mod featurizer;
pub mod nets;
pub mod schema;
pub mod train;
pub mod words;

pub use families::{Family, HeldOutSplit, TaskError, TaskSpec};
pub use featurizer::{Descriptor, FeatureError, describe};
pub use nets::{NetKind, Network};
pub use schema::{FeatureSchema, FeatureSpec, SupportInputs, SupportSpec};
pub use train::{Objective, TaskData, TrainConfig, TrainedModel};
