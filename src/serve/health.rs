//! grpc.health.v1 statuses per service: the overall server (""), the catalog
//! and jobs services while the server runs and the catalog answers (its
//! breaker is closed), and the generation service only while a denoiser is
//! loaded (it needs neither backend then). Everything turns NOT_SERVING when shutdown
//! starts, before connections are drained.

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::proto::v1::{catalog_service_server, generation_service_server, job_service_server};

/// Health name of the whole server.
pub const SERVER: &str = "";

/// Sets every status for a running server; `generation_ready` says whether a
/// denoiser is loaded.
pub async fn set_running(reporter: &HealthReporter, generation_ready: bool) {
    reporter
        .set_service_status(SERVER, ServingStatus::Serving)
        .await;
    reporter
        .set_service_status(catalog_service_server::SERVICE_NAME, ServingStatus::Serving)
        .await;
    reporter
        .set_service_status(job_service_server::SERVICE_NAME, ServingStatus::Serving)
        .await;
    set_generation(reporter, generation_ready).await;
}

/// Sets the generation service's status from its readiness.
pub async fn set_generation(reporter: &HealthReporter, ready: bool) {
    let status = if ready {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter
        .set_service_status(generation_service_server::SERVICE_NAME, status)
        .await;
}

/// Sets the catalog and jobs services' status from the catalog's breaker.
pub async fn set_catalog(reporter: &HealthReporter, up: bool) {
    let status = if up {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    for name in [
        catalog_service_server::SERVICE_NAME,
        job_service_server::SERVICE_NAME,
    ] {
        reporter.set_service_status(name, status).await;
    }
}

/// Marks everything NOT_SERVING, at the start of shutdown.
pub async fn set_stopping(reporter: &HealthReporter) {
    for name in [SERVER]
        .into_iter()
        .chain(crate::proto::SERVICE_NAMES.iter().copied())
    {
        reporter
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
}
