//! Model zoos: building them from task families (resumable, shardable over
//! workers through the catalog's claimable units), ingesting users' own
//! checkpoints, and loading one as a dataset (training and evaluation).

pub mod builder;
pub mod dataset;
pub mod ingest;

pub use builder::{BuildReport, ZooBuildConfig, ZooError, build_zoo, plan_units};
pub use dataset::{AlignChoice, DatasetError, LoadOptions, ZooDataset};
pub use ingest::{AddError, IngestLine, IngestReport, add_checkpoint, ingest_dir};
