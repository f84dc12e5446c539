//! weightgen: task-conditioned diffusion over neural-network weights, served
//! over gRPC.
//!
//! The library holds everything; the three binaries in `src/bin/` are thin
//! `main`s over it. See `docs/ARCHITECTURE.md` for the module map.

pub mod backend;
pub mod blobs;
pub mod breaker;
pub mod cancel;
pub mod catalog;
pub mod client;
pub mod device;
pub mod diffusion;
pub mod eval;
pub mod figures;
pub mod gc;
pub mod jobs;
pub mod model;
pub mod plot;
pub mod proto;
pub mod rng;
pub mod serve;
pub mod storage;
pub mod tasks;
pub mod telemetry;
pub mod torch_info;
pub mod train;
pub mod weights;
pub mod zoo;
