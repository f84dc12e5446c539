//! The server as clients see it: health per service, reflection, metadata,
//! limits, metrics, and graceful shutdown.

mod common;

use std::time::Duration;

use common::{metric_value, spawn_server};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use weightgen::proto::v1::catalog_service_client::CatalogServiceClient;
use weightgen::proto::v1::generation_service_client::GenerationServiceClient;
use weightgen::proto::v1::job_service_client::JobServiceClient;
use weightgen::proto::v1::{
    FloatTensor, GenerateInitRequest, ListZooModelsRequest, ServerLiveRequest, ServerReadyRequest,
    SupportSet, TaskDescriptor,
};
use weightgen::serve::ServeError;

const GENERATION: &str = "weightgen.v1.GenerationService";
const CATALOG: &str = "weightgen.v1.CatalogService";
const JOBS: &str = "weightgen.v1.JobService";

async fn check(
    channel: tonic::transport::Channel,
    service: &str,
) -> Result<ServingStatus, tonic::Status> {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map(|r| r.into_inner().status())
}

#[tokio::test]
async fn health_reports_each_service_and_follows_readiness() {
    let test = spawn_server(|_| {}).await;
    let channel = test.channel().await;
    assert_eq!(
        check(channel.clone(), "").await.unwrap(),
        ServingStatus::Serving
    );
    assert_eq!(
        check(channel.clone(), CATALOG).await.unwrap(),
        ServingStatus::Serving
    );
    assert_eq!(
        check(channel.clone(), JOBS).await.unwrap(),
        ServingStatus::Serving
    );
    // No denoiser is loaded: generation is not ready, and says so in both APIs.
    assert_eq!(
        check(channel.clone(), GENERATION).await.unwrap(),
        ServingStatus::NotServing
    );
    let mut generation = GenerationServiceClient::new(channel.clone());
    assert!(
        !generation
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(
        generation
            .server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    let unknown = check(channel.clone(), "weightgen.v1.NoSuchService")
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    // A watcher sees the change when a denoiser gets loaded.
    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: GENERATION.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::NotServing);
    test.server.readiness().set_denoiser_loaded(true);
    let next = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("health update within 5 s")
        .unwrap()
        .unwrap();
    assert_eq!(next.status(), ServingStatus::Serving);
    assert!(
        generation
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    drop(watch);
    test.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn server_metadata_names_torch_and_device() {
    let test = spawn_server(|_| {}).await;
    let info = weightgen::client::server_metadata(test.channel().await)
        .await
        .unwrap();
    assert_eq!(info.name, "weightgen");
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
    assert!(
        info.torch_version.starts_with("2.11.0"),
        "{}",
        info.torch_version
    );
    assert_eq!(info.device, "cpu");
    test.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_fresh_server_answers_every_service_with_real_results() {
    let test = spawn_server(|_| {}).await;
    let channel = test.channel().await;
    // An empty catalog: an empty page, not UNIMPLEMENTED.
    let listed = CatalogServiceClient::new(channel.clone())
        .list_zoo_models(ListZooModelsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((listed.models.len(), listed.total), (0, 0));
    // GenerateInit is served: a request without a task names the field.
    let err = GenerationServiceClient::new(channel)
        .generate_init(GenerateInitRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "task: required");
    test.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn oversized_requests_are_refused_and_the_server_keeps_serving() {
    let test = spawn_server(|c| c.max_request_bytes = 64 * 1024).await;
    let channel = test.channel().await;
    // A support set of 32k floats (128 KiB) is over the 64 KiB limit.
    let big = GenerateInitRequest {
        task: Some(TaskDescriptor {
            architecture: "digits-mlp".into(),
            support: Some(SupportSet {
                inputs: Some(FloatTensor {
                    shape: vec![512, 64],
                    values: vec![0.5; 512 * 64],
                }),
                targets: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let err = GenerationServiceClient::new(channel.clone())
        .generate_init(big)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(
        err.message().contains("65536"),
        "names the limit: {}",
        err.message()
    );
    assert_eq!(check(channel, "").await.unwrap(), ServingStatus::Serving);
    test.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn calls_over_the_concurrency_limit_are_shed_at_once() {
    let test = spawn_server(|c| c.max_concurrent_requests = 1).await;
    let channel = test.channel().await;
    // A health Watch stream holds the only slot for as long as it is open.
    let watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(test.server.in_flight(), 1);
    let shed = tokio::time::timeout(Duration::from_secs(5), check(channel.clone(), ""))
        .await
        .expect("answered at once, not queued")
        .unwrap_err();
    assert_eq!(shed.code(), Code::ResourceExhausted);
    assert!(
        shed.message().contains("limit of 1 concurrent"),
        "{}",
        shed.message()
    );
    drop(watch);
    // The slot frees when the stream ends.
    let mut status = Err(shed);
    for _ in 0..50 {
        status = check(channel.clone(), "").await;
        if status.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status.unwrap(), ServingStatus::Serving);
    test.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn metrics_count_calls_by_method_and_code() {
    let test = spawn_server(|_| {}).await;
    let mut jobs = JobServiceClient::new(test.channel().await);
    // The recorder is shared by every server in this test binary, so compare
    // before and after instead of assuming zero.
    let labels = [
        ("method", "weightgen.v1.JobService/GetJob"),
        ("code", "NOT_FOUND"),
    ];
    let before = metric_value(
        &test.metrics().await,
        "weightgen_grpc_requests_total",
        &labels,
    )
    .unwrap_or(0.0);
    for _ in 0..3 {
        jobs.get_job(weightgen::proto::v1::GetJobRequest { id: "nope".into() })
            .await
            .unwrap_err();
    }
    let text = test.metrics().await;
    let after = metric_value(&text, "weightgen_grpc_requests_total", &labels).unwrap();
    assert_eq!(after - before, 3.0, "{text}");
    assert!(
        metric_value(
            &text,
            "weightgen_grpc_request_duration_seconds_count",
            &[("method", "weightgen.v1.JobService/GetJob")]
        )
        .unwrap()
            >= 3.0
    );
    assert!(text.contains("weightgen_build_info{"), "{text}");
    test.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_turns_health_off_and_drains_open_streams() {
    let test = spawn_server(|c| c.shutdown_grace = Duration::from_secs(20)).await;
    let channel = test.channel().await;
    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    test.server.begin_shutdown();
    // The open stream hears that the server is going away...
    let update = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("update within 5 s")
        .unwrap()
        .unwrap();
    assert_eq!(update.status(), ServingStatus::NotServing);
    // ...new connections are refused...
    let refused = weightgen::client::connect(&test.addr(), Some(Duration::from_secs(2))).await;
    let refused = match refused {
        Err(_) => true,
        Ok(c) => check(c, "").await.is_err(),
    };
    assert!(refused, "a new connection was served during shutdown");
    // ...and the server waits while the stream is open.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !test.server.is_finished(),
        "stopped before the open stream ended"
    );
    assert_eq!(test.server.in_flight(), 1);

    drop(watch);
    drop(channel);
    let report = tokio::time::timeout(Duration::from_secs(10), test.server.wait())
        .await
        .expect("stops once the stream ends")
        .unwrap();
    assert!(report.drained, "{report:?}");
    assert_eq!(report.cut_off, 0);
    assert!(report.drain_time < Duration::from_secs(20), "{report:?}");
}

#[tokio::test]
async fn shutdown_cuts_off_streams_after_the_grace_period() {
    let test = spawn_server(|c| c.shutdown_grace = Duration::from_millis(600)).await;
    let channel = test.channel().await;
    let _watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let report = tokio::time::timeout(Duration::from_secs(10), test.server.shutdown())
        .await
        .expect("stops after the grace period")
        .unwrap();
    assert!(!report.drained);
    assert_eq!(report.cut_off, 1);
    assert!(
        report.drain_time >= Duration::from_millis(600),
        "{report:?}"
    );
}

#[tokio::test]
async fn start_fails_clearly_on_a_busy_port_a_missing_gpu_or_a_bad_catalog() {
    let first = spawn_server(|_| {}).await;
    let taken = first.server.grpc_addr();
    let dir = tempfile::tempdir().unwrap();
    let mut config = weightgen::serve::ServerConfig::with_defaults();
    config.listen = taken;
    config.metrics_listen = weightgen::serve::MetricsListen(None);
    config.storage = weightgen::storage::StorageArgs::embedded(dir.path());
    config.device = weightgen::device::DeviceChoice::Cpu;
    let err = weightgen::serve::start(config.clone())
        .await
        .err()
        .expect("port in use");
    assert!(
        matches!(err, ServeError::Bind { what: "gRPC", .. }),
        "{err}"
    );
    assert!(err.to_string().contains(&taken.to_string()), "{err}");

    config.listen = "127.0.0.1:0".parse().unwrap();
    config.device = weightgen::device::DeviceChoice::Cuda(99);
    let err = weightgen::serve::start(config.clone())
        .await
        .err()
        .expect("no cuda:99");
    assert!(matches!(err, ServeError::Device(_)), "{err}");
    assert!(err.to_string().contains("cuda:99"), "{err}");

    config.device = weightgen::device::DeviceChoice::Cpu;
    config.storage.catalog = Some("mysql://somewhere/db".into());
    let err = weightgen::serve::start(config.clone())
        .await
        .err()
        .expect("unsupported catalog");
    assert!(matches!(err, ServeError::Storage(_)), "{err}");
    assert!(err.to_string().starts_with("catalog:"), "{err}");
    config.storage.catalog = Some("postgres://postgres@127.0.0.1:1/nowhere".into());
    let err = weightgen::serve::start(config)
        .await
        .err()
        .expect("unreachable catalog");
    assert!(err.to_string().contains("catalog database"), "{err}");
    first.server.shutdown().await.unwrap();
}
