//! Task families and the descriptor featurizer shared by zoo building,
//! training, serving and evaluation. This version holds the feature schema
//! that every denoiser records.

pub mod schema;

pub use schema::{FeatureSchema, FeatureSpec, SupportSpec};
