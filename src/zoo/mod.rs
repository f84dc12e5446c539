//! Model zoos: building them from task families (resumable, shardable over
//! workers through the catalog's claimable units), ingesting users' own
//! checkpoints, and loading one as a dataset (training and evaluation);
//! a `words` zoo's adapters and the base model they share (`words`).

pub mod builder;
pub mod dataset;
pub mod ingest;
pub mod words;

pub use builder::{BuildReport, ZooBuildConfig, ZooError, build_zoo, plan_units};
pub use dataset::{AlignChoice, DatasetError, LoadOptions, ZooDataset};
pub use ingest::{AddError, IngestLine, IngestReport, add_checkpoint, ingest_dir};
pub use words::{WordsBase, WordsBaseConfig, ensure_base};
