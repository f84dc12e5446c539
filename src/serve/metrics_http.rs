//! The Prometheus endpoint: a process-wide recorder, rendered on GET /metrics
//! from a separate HTTP port.

use std::sync::OnceLock;

use axum::Router;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use super::grpc_metrics::REQUEST_DURATION;

static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Histogram buckets for durations, in seconds: sub-millisecond metadata
/// calls up to DDPM-1000 sampling that takes minutes.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

/// Histogram buckets for rows per denoiser pass.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// The histograms exported with buckets (`_bucket` series that aggregate
/// across replicas, for `histogram_quantile`); any other histogram is a
/// summary of quantiles.
pub const BUCKETED_HISTOGRAMS: &[(&str, &[f64])] = &[
    (REQUEST_DURATION, DURATION_BUCKETS),
    ("weightgen_queue_wait_seconds", DURATION_BUCKETS),
    ("weightgen_sampling_seconds", DURATION_BUCKETS),
    ("weightgen_batch_samples", BATCH_BUCKETS),
];

/// Installs the process-wide metrics recorder once and returns its handle.
/// Every server in the process (several in tests) shares it.
pub fn recorder() -> Result<PrometheusHandle, String> {
    HANDLE
        .get_or_init(|| {
            let mut builder = PrometheusBuilder::new();
            for (name, buckets) in BUCKETED_HISTOGRAMS {
                builder = builder
                    .set_buckets_for_metric(Matcher::Full((*name).to_owned()), buckets)
                    .map_err(|e| e.to_string())?;
            }
            let recorder = builder.build_recorder();
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
