//! The gRPC server: services, the tower stack around them, health,
//! reflection, metrics and lifecycle. Transport code here never touches a
//! tensor; model work goes to the model thread in [`crate::backend`].

pub mod admission;
pub mod auth;
pub mod body;
pub mod catalog;
pub mod codec;
pub mod config;
pub mod convert;
pub mod deadline;
pub mod denoisers;
pub mod generate_init;
pub mod generation;
pub mod grpc_metrics;
pub mod health;
pub mod jobs;
pub mod metrics_http;
pub mod readiness;
pub mod reload;
pub mod server;
pub mod status;
pub mod tls;
pub mod trace_context;

pub use config::{MetricsListen, ServerConfig};
pub use readiness::Readiness;
pub use server::{
    RunningServer, ServeError, ShutdownReport, run_until_signal, shutdown_signal, start,
};
