//! The server as clients see it: health per service, reflection, metadata,
//! limits, metrics, and graceful shutdown.

use std::time::Duration;

use crate::common::raw::call_raw;
use crate::common::{metric_value, spawn_server};
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
async fn undecodable_bodies_are_invalid_arguments_on_every_method() {
    use prost::Message;
    let test = spawn_server(|_| {}).await;
    let channel = test.channel().await;
    let files = prost_types::FileDescriptorSet::decode(weightgen::proto::FILE_DESCRIPTOR_SET)
        .expect("the embedded descriptor set decodes");
    // A field number 0 tag; a length-delimited field 1 longer than the body;
    // a varint that never ends.
    let bodies = [
        vec![0x00, 0x01],
        vec![0x0a, 0x7f, 0x01],
        vec![0x08, 0xff, 0xff],
    ];
    let mut methods = 0;
    for file in &files.file {
        for service in &file.service {
            for method in &service.method {
                let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                for body in &bodies {
                    let err = call_raw(channel.clone(), method, path.clone(), body.clone())
                        .await
                        .expect_err("an undecodable body is refused");
                    assert_eq!(
                        err.code(),
                        Code::InvalidArgument,
                        "{path} {body:?}: {err:?}"
                    );
                    assert!(
                        err.message().starts_with("message body: "),
                        "{path}: {}",
                        err.message()
                    );
                }
                methods += 1;
            }
        }
    }
    assert_eq!(methods, 19, "every weightgen method was tried");
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
    // At least these three: other tests' servers share the recorder.
    assert!(after - before >= 3.0, "{text}");
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
    assert!(
        err.to_string()
            .starts_with("the catalog is unavailable (postgres://127.0.0.1:1/nowhere: "),
        "{err}"
    );
    first.server.shutdown().await.unwrap();
}

/// `message` with "authorization: Bearer TOKEN" when a token is given.
fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("ASCII token"),
        );
    }
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles_guard_every_method_and_health_stays_open() {
    use weightgen::blobs::sha256_hex;
    use weightgen::proto::v1::{CancelJobRequest, SubmitJobRequest};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    let (read, generate, admin) = ("r-7f3a9c", "g-51be02", "a-c0ffee");
    std::fs::write(
        &file,
        format!(
            "# tokens of this test\nreader read sha256:{}\ntrainer generate sha256:{}\nops admin sha256:{}\nmeter read sha256:{} 2/min\n",
            sha256_hex(read.as_bytes()),
            sha256_hex(generate.as_bytes()),
            sha256_hex(admin.as_bytes()),
            sha256_hex(b"m-2perminute")
        ),
    )
    .unwrap();
    let test = spawn_server(|c| {
        c.auth_tokens = Some(file.clone());
        c.auth_reload_every = std::time::Duration::from_millis(200);
    })
    .await;
    let channel = test.channel().await;
    let mut catalog = CatalogServiceClient::new(channel.clone());
    let mut generation = GenerationServiceClient::new(channel.clone());
    let mut jobs = JobServiceClient::new(channel.clone());

    // No token, a malformed one, an unknown one: UNAUTHENTICATED.
    for (token, says) in [
        (None, "missing credentials"),
        (Some("wrong-token"), "unknown token"),
    ] {
        let err = catalog
            .list_zoo_models(with_token(ListZooModelsRequest::default(), token))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        assert!(err.message().contains(says), "{}", err.message());
    }
    let mut bare = tonic::Request::new(ListZooModelsRequest::default());
    bare.metadata_mut()
        .insert("authorization", "Basic dXNlcg==".parse().unwrap());
    let err = catalog.list_zoo_models(bare).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // A token with a quota of 2 calls a minute: the third is refused, naming it.
    for _ in 0..2 {
        catalog
            .list_zoo_models(with_token(
                ListZooModelsRequest::default(),
                Some("m-2perminute"),
            ))
            .await
            .expect("within the quota");
    }
    let err = catalog
        .list_zoo_models(with_token(
            ListZooModelsRequest::default(),
            Some("m-2perminute"),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message()
            .contains("\"meter\" is over its quota of 2 calls per minute"),
        "{}",
        err.message()
    );

    // read: reads only.
    catalog
        .list_zoo_models(with_token(ListZooModelsRequest::default(), Some(read)))
        .await
        .expect("read may list");
    let generate_request = || GenerateInitRequest {
        task: Some(TaskDescriptor {
            architecture: "digits-mlp-64-32-5".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let err = generation
        .generate_init(with_token(generate_request(), Some(read)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("\"reader\" has the role read")
            && err.message().contains("needs generate"),
        "{}",
        err.message()
    );
    // generate: GenerateInit passes authentication (and fails for want of
    // a denoiser); jobs and activation stay admin's.
    let err = generation
        .generate_init(with_token(generate_request(), Some(generate)))
        .await
        .unwrap_err();
    assert!(
        !matches!(err.code(), Code::Unauthenticated | Code::PermissionDenied),
        "{err:?}"
    );
    for token in [read, generate] {
        let err = jobs
            .submit_job(with_token(SubmitJobRequest::default(), Some(token)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    }
    // admin: everything (these fail on their arguments, not on the token).
    let err = jobs
        .submit_job(with_token(SubmitJobRequest::default(), Some(admin)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = jobs
        .cancel_job(with_token(
            CancelJobRequest {
                id: "no-such-job".into(),
            },
            Some(admin),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // The CLI sends --token / WEIGHTGEN_TOKEN with every call.
    let cli = |token: Option<&str>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_weightgen"));
        command.args(["--addr", &test.addr(), "server-info"]);
        command.env_remove("WEIGHTGEN_TOKEN");
        if let Some(token) = token {
            command.env("WEIGHTGEN_TOKEN", token);
        }
        command.output().unwrap()
    };
    let refused = cli(None);
    let text = crate::common::combined_output(&refused);
    assert!(
        !refused.status.success() && text.contains("Unauthenticated"),
        "{text}"
    );
    let allowed = cli(Some(read));
    let text = crate::common::combined_output(&allowed);
    assert!(allowed.status.success(), "{text}");

    // Health and reflection stay open for probes.
    assert_eq!(check(channel, "").await.unwrap(), ServingStatus::Serving);
    // Calls are counted by token name; no token appears in the metrics.
    let text = test.metrics().await;
    for name in ["reader", "trainer", "ops", "refused"] {
        assert!(
            metric_value(&text, "weightgen_calls_by_token_total", &[("token", name)])
                .is_some_and(|n| n >= 1.0),
            "{name}: {text}"
        );
    }
    for token in [read, generate, admin, "wrong-token"] {
        assert!(!text.contains(token), "{token} leaked into the metrics");
    }

    // The file is re-read without a restart: a rotated token works and the
    // revoked one stops; a change that does not parse keeps the tokens.
    let list = |token: &'static str| {
        let mut catalog = catalog.clone();
        async move {
            catalog
                .list_zoo_models(with_token(ListZooModelsRequest::default(), Some(token)))
                .await
                .map(|_| ())
                .map_err(|e| e.code())
        }
    };
    let rotated = format!("reader read sha256:{}\n", sha256_hex(b"r-rotated"));
    std::fs::write(&file, &rotated).unwrap();
    let started = std::time::Instant::now();
    while list("r-rotated").await.is_err() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "not reloaded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(list(read).await, Err(Code::Unauthenticated));
    std::fs::write(&file, "reader owner sha256:00\n").unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    assert_eq!(
        list("r-rotated").await,
        Ok(()),
        "an invalid file replaced the tokens"
    );
    test.server.shutdown().await.unwrap();
    std::fs::write(&file, &rotated).unwrap();

    // --auth-health closes health too; a bad token file stops the start.
    let strict = spawn_server(|c| {
        c.auth_tokens = Some(file.clone());
        c.auth_health = true;
    })
    .await;
    let err = check(strict.channel().await, "").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    strict.server.shutdown().await.unwrap();
    std::fs::write(&file, format!("ops owner sha256:{}\n", sha256_hex(b"x"))).unwrap();
    let mut config = weightgen::serve::ServerConfig::with_defaults();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.auth_tokens = Some(file);
    config.storage = weightgen::storage::StorageArgs::embedded(dir.path().join("never"));
    let Err(err) = weightgen::serve::start(config).await else {
        panic!("a bad token file was accepted")
    };
    assert!(
        err.to_string().contains("line 1") && err.to_string().contains("role \"owner\""),
        "{err}"
    );
    assert!(
        !dir.path().join("never").exists(),
        "a refused start touched the data dir"
    );
}

/// A client of `addr` with `tls`, and the outcome of one health check
/// through it (connecting included): Ok(()) or the error's text.
async fn health_over_tls(addr: &str, tls: weightgen::client::ClientTls) -> Result<(), String> {
    let target = weightgen::client::Target {
        addr: addr.to_owned(),
        tls: Some(tls),
        ..Default::default()
    };
    let connection = target
        .connect(Some(Duration::from_secs(5)))
        .await
        .map_err(|e| e.to_string())?;
    weightgen::client::health_status(connection, "")
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verifies_both_ends_and_picks_up_a_rotated_certificate() {
    use crate::common::tls::{Pki, Usage};
    use weightgen::client::ClientTls;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "good");
    let rogue = Pki::new(dir.path(), "rogue");
    let names = ["localhost", "127.0.0.1"];
    // The server starts with an expired certificate (rustls serves it; clients must refuse it).
    let served = pki.leaf("server", &names, Usage::Server, true);
    let fresh = pki.leaf("server-fresh", &names, Usage::Server, false);
    let trusting = |ca: std::path::PathBuf| ClientTls {
        ca: Some(ca),
        ..ClientTls::default()
    };

    let test = spawn_server(|c| {
        c.tls.cert = Some(served.cert.clone());
        c.tls.key = Some(served.key.clone());
        c.tls.tls_reload_every = Duration::from_millis(100);
        c.health_listen = weightgen::serve::MetricsListen(Some("127.0.0.1:0".parse().unwrap()));
    })
    .await;
    let addr = test.addr();
    // Probes that cannot speak TLS use the plaintext health-only port.
    let probes = test
        .server
        .health_addr()
        .expect("health port on")
        .to_string();
    let channel = weightgen::client::connect(&probes, Some(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(
        weightgen::client::health_status(channel.clone(), "")
            .await
            .unwrap(),
        ServingStatus::Serving
    );
    let err = GenerationServiceClient::new(channel)
        .server_live(ServerLiveRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    let err = health_over_tls(&addr, trusting(pki.ca_pem()))
        .await
        .unwrap_err();
    assert!(err.to_lowercase().contains("expired"), "{err}");

    // Rotated in place: new connections get the fresh certificate, no restart.
    fresh.install_as(&served);
    let started = std::time::Instant::now();
    while let Err(e) = health_over_tls(&addr, trusting(pki.ca_pem())).await {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not reloaded: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A broken rotation keeps the working certificate.
    std::fs::write(&served.cert, "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    health_over_tls(&addr, trusting(pki.ca_pem()))
        .await
        .unwrap();

    // The wrong CA, a wrong name, plaintext: refused, and the client says why.
    let err = health_over_tls(&addr, trusting(rogue.ca_pem()))
        .await
        .unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
    let err = health_over_tls(
        &addr,
        ClientTls {
            domain: Some("elsewhere.example".into()),
            ..trusting(pki.ca_pem())
        },
    )
    .await
    .unwrap_err();
    assert!(err.contains("not valid for name"), "{err}");
    let plain = weightgen::client::connect(&addr, Some(Duration::from_secs(5))).await;
    if let Ok(channel) = plain {
        let err = weightgen::client::health_status(channel, "")
            .await
            .unwrap_err();
        assert!(!matches!(err, weightgen::client::ClientError::Rpc(ref s) if s.code() == Code::Ok));
    }
    let metrics = test.metrics().await;
    let failures = metric_value(&metrics, "weightgen_tls_handshake_failures_total", &[]).unwrap();
    assert!(failures >= 3.0, "{failures}");
    test.server.shutdown().await.unwrap();

    // Mutual TLS: only a client certificate from the client CA gets in.
    let server = pki.leaf("server-mtls", &names, Usage::Server, false);
    let test = spawn_server(|c| {
        c.tls.cert = Some(server.cert.clone());
        c.tls.key = Some(server.key.clone());
        c.tls.client_ca = Some(pki.ca_pem());
    })
    .await;
    let addr = test.addr();
    let client = pki.leaf("client", &["trainer"], Usage::Client, false);
    let expired_client = pki.leaf("client-old", &["trainer"], Usage::Client, true);
    let rogue_client = rogue.leaf("client", &["trainer"], Usage::Client, false);
    let with = |leaf: &crate::common::tls::Leaf| ClientTls {
        identity: Some((leaf.cert.clone(), leaf.key.clone())),
        ..trusting(pki.ca_pem())
    };
    health_over_tls(&addr, with(&client)).await.unwrap();
    for (what, tls) in [
        ("no client certificate", trusting(pki.ca_pem())),
        ("an expired client certificate", with(&expired_client)),
        ("another CA's client certificate", with(&rogue_client)),
    ] {
        let result = health_over_tls(&addr, tls).await;
        assert!(result.is_err(), "{what} was let in");
    }
    test.server.shutdown().await.unwrap();

    // Files that cannot serve stop the start, naming the file.
    let mut config = weightgen::serve::ServerConfig::with_defaults();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.tls.cert = Some(pki.ca_pem());
    config.tls.key = Some(dir.path().join("missing.key"));
    config.storage = weightgen::storage::StorageArgs::embedded(dir.path().join("never"));
    let Err(err) = weightgen::serve::start(config).await else {
        panic!("a missing key was accepted")
    };
    assert!(matches!(err, ServeError::Tls(_)), "{err}");
    assert!(err.to_string().contains("missing.key"), "{err}");
}
