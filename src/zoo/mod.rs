//! Model zoos: building them from task families (resumable, shardable over
//! workers through the catalog's claimable units) and ingesting users' own
//! checkpoints.

pub mod builder;
pub mod ingest;

pub use builder::{BuildReport, ZooBuildConfig, ZooError, build_zoo, plan_units};
pub use ingest::{AddError, IngestLine, IngestReport, add_checkpoint, ingest_dir};
