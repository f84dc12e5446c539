//! The Prometheus endpoint: a process-wide recorder, rendered on GET /metrics
//! from a separate HTTP port.

use std::sync::OnceLock;

use axum::Router;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use super::grpc_metrics::REQUEST_DURATION;

static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Histogram buckets for call durations, in seconds: sub-millisecond metadata
/// calls up to DDPM-1000 sampling that takes minutes.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

/// Installs the process-wide metrics recorder once and returns its handle.
/// Every server in the process (several in tests) shares it.
pub fn recorder() -> Result<PrometheusHandle, String> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(REQUEST_DURATION.to_owned()),
                    DURATION_BUCKETS,
                )
                .map_err(|e| e.to_string())?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
            metrics::gauge!(
                "weightgen_build_info",
                "version" => env!("CARGO_PKG_VERSION"),
                "torch_version" => crate::torch_info::TORCH_VERSION
            )
            .set(1.0);
            Ok(handle)
        })
        .clone()
}

/// Serves GET /metrics until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            async move {
                handle.run_upkeep();
                handle.render()
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
