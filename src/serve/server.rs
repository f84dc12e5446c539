//! Starting, running and stopping `weightgen-server`: listeners, the tonic
//! stack (limits, timeouts, admission, metrics), health, reflection, the
//! metrics endpoint and graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tower::ServiceBuilder;

use super::admission::Admission;
use super::auth::{AuthLayer, Quotas, Tokens, watch_token_file};
use super::catalog::CatalogApi;
use super::config::ServerConfig;
use super::deadline::DeadlineLayer;
use super::denoisers::{DenoiserRegistry, reload_loop};
use super::generation::{GenerationApi, ServerInfo};
use super::grpc_metrics::{GrpcMetricsLayer, KnownMethods};
use super::health;
use super::jobs::JobsApi;
use super::metrics_http;
use super::readiness::Readiness;
use super::tls;
use crate::backend::{BatchConfig, ModelThread};
use crate::blobs::BlobStore;
use crate::breaker::BackendGuard;
use crate::catalog::Catalog;
use crate::device::{DeviceError, device_name};
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::proto::v1::catalog_service_server::CatalogServiceServer;
use crate::proto::v1::generation_service_server::GenerationServiceServer;
use crate::proto::v1::job_service_server::JobServiceServer;
use crate::torch_info::TorchInfo;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The data directory could not be created.
    #[error("creating data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The catalog or the blob store could not be opened.
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    /// A listener could not bind its address.
    #[error("binding the {what} address {addr}: {source}")]
    Bind {
        /// "gRPC" or "metrics".
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The requested device cannot be used.
    #[error("--device: {0}")]
    Device(#[from] DeviceError),
    /// The token file cannot be used.
    #[error(transparent)]
    Auth(#[from] super::auth::AuthError),
    /// The TLS certificate, key or client CA cannot be used.
    #[error(transparent)]
    Tls(#[from] super::tls::TlsError),
    /// The metrics recorder or descriptor set could not be set up.
    #[error("setting up {what}: {detail}")]
    Setup {
        /// What failed.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// The gRPC transport failed while serving.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A server task panicked or was cancelled.
    #[error("server task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// How shutdown went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Every call in flight finished before the grace period ended.
    pub drained: bool,
    /// Calls still running when the grace period ended (cut off).
    pub cut_off: usize,
    /// Time from the start of shutdown to the end of draining.
    pub drain_time: Duration,
}

/// A started server: its addresses, its readiness flag, and the means to stop it.
pub struct RunningServer {
    catalog: Arc<dyn Catalog>,
    blobs: BlobStore,
    grpc_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    health_addr: Option<SocketAddr>,
    readiness: Readiness,
    admission: Admission,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<ShutdownReport, ServeError>>,
}

impl RunningServer {
    /// The catalog the server opened.
    pub fn catalog(&self) -> &Arc<dyn Catalog> {
        &self.catalog
    }

    /// The blob store the server opened.
    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    /// Address the gRPC server listens on (with the real port when 0 was asked).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// Address of the Prometheus endpoint, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Address of the plaintext health-only port, when enabled.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_addr
    }

    /// The readiness flag that the denoiser loader sets.
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    /// Calls in flight now (streams count until they end).
    pub fn in_flight(&self) -> usize {
        self.admission.in_flight()
    }

    /// Starts graceful shutdown (idempotent): health turns NOT_SERVING, new
    /// connections and calls are refused, in-flight calls may finish within
    /// the grace period.
    pub fn begin_shutdown(&self) {
        self.stop.send_replace(true);
    }

    /// Whether the server has stopped.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits until the server has stopped.
    pub async fn wait(self) -> Result<ShutdownReport, ServeError> {
        self.task.await?
    }

    /// Shuts down gracefully and waits for the end.
    pub async fn shutdown(self) -> Result<ShutdownReport, ServeError> {
        self.begin_shutdown();
        self.wait().await
    }
}

/// Starts the server: creates the data directory, checks the device, binds
/// both listeners and serves in background tasks.
pub async fn start(config: ServerConfig) -> Result<RunningServer, ServeError> {
    let tokens = match &config.auth_tokens {
        Some(path) => Some((path.clone(), Tokens::load(path)?)),
        None => {
            tracing::warn!(
                "no --auth-tokens: every call is allowed without credentials (keep the port private)"
            );
            None
        }
    };
    let tls = match config.tls.files() {
        Some(files) => Some((
            files.mutual(),
            tls::watch(files, config.tls.tls_reload_every)?,
        )),
        None => None,
    };
    if tls.is_none() && config.auth_tokens.is_some() {
        tracing::warn!(
            "bearer tokens over plaintext: anyone on the path can read them (set --tls-cert and --tls-key, or terminate TLS in front)"
        );
    }
    let data_dir = &config.storage.data_dir;
    std::fs::create_dir_all(data_dir).map_err(|source| ServeError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    let storage = config.storage.for_server().open_guarded().await?;
    let (catalog_store, blobs) = (storage.catalog.clone(), storage.blobs.clone());
    tokio::spawn(sweep_blobs(
        catalog_store.clone(),
        blobs.clone(),
        config.storage.upload_staging(),
        config.gc_grace,
    ));
    // Asking libtorch initializes CUDA, which blocks for a while on a GPU host.
    let choice = config.device;
    let (torch, device) = tokio::task::spawn_blocking(move || {
        let torch = TorchInfo::detect();
        let device = choice.resolve_with(if torch.cuda_available {
            torch.cuda_device_count
        } else {
            0
        });
        (torch, device)
    })
    .await?;
    let device = device?;
    let info = ServerInfo {
        torch,
        device: device_name(device),
    };

    let prometheus = metrics_http::recorder().map_err(|detail| ServeError::Setup {
        what: "the metrics recorder",
        detail,
    })?;
    let methods = KnownMethods::from_descriptor_sets(&[
        FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ])
    .map_err(|e| ServeError::Setup {
        what: "the method list",
        detail: e.to_string(),
    })?;

    let grpc_listener = bind("gRPC", config.listen).await?;
    let grpc_addr = local_addr("gRPC", &grpc_listener, config.listen)?;
    let metrics_listener = match config.metrics_listen.0 {
        Some(addr) => Some(bind("metrics", addr).await?),
        None => None,
    };
    let metrics_addr = match (&metrics_listener, config.metrics_listen.0) {
        (Some(listener), Some(addr)) => Some(local_addr("metrics", listener, addr)?),
        _ => None,
    };

    let health_listener = match config.health_listen.0 {
        Some(addr) => Some((bind("health", addr).await?, addr)),
        None => None,
    };
    let health_addr = match &health_listener {
        Some((listener, addr)) => Some(local_addr("health", listener, *addr)?),
        None => None,
    };

    let readiness = Readiness::new();
    let batching = BatchConfig {
        max_batch: config.max_batch.max(1),
        max_active: config.max_active.max(1),
        max_queue: config.max_queue.max(1),
        stream_window: config.stream_window,
        cuda_graphs: config.cuda_graphs,
    };
    crate::backend::cuda_graph::set_sync_debug(config.cuda_sync_debug);
    let model = ModelThread::spawn(device, batching).map_err(|e| ServeError::Setup {
        what: "the model thread",
        detail: e.to_string(),
    })?;
    let registry = Arc::new(DenoiserRegistry::new(model, readiness.clone()));
    if let Err(e) = registry.refresh(&catalog_store, &blobs).await {
        tracing::warn!(error = %e, "loading the active denoisers failed; retrying in the background");
    }
    let admission = Admission::new(config.max_concurrent_requests);
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health_service_for_probes = health_service.clone();
    health::set_running(&reporter, readiness.is_ready()).await;
    health::set_catalog(&reporter, storage.catalog_guard.is_up()).await;

    let reflection_v1 = reflection_builder()
        .build_v1()
        .map_err(|e| ServeError::Setup {
            what: "reflection v1",
            detail: e.to_string(),
        })?;
    let reflection_v1alpha =
        reflection_builder()
            .build_v1alpha()
            .map_err(|e| ServeError::Setup {
                what: "reflection v1alpha",
                detail: e.to_string(),
            })?;

    let quotas = Quotas::default();
    let generation = GenerationServiceServer::new(GenerationApi::new(
        info.clone(),
        readiness.clone(),
        registry.clone(),
        catalog_store.clone(),
        config.max_samples,
        quotas.clone(),
    ))
    .max_decoding_message_size(config.max_request_bytes)
    .max_encoding_message_size(config.max_response_bytes);
    let catalog = CatalogServiceServer::new(CatalogApi::new(
        catalog_store.clone(),
        blobs.clone(),
        config.max_upload_bytes,
        config.max_response_bytes,
        config.storage.upload_staging(),
    ))
    .max_decoding_message_size(config.max_request_bytes)
    .max_encoding_message_size(config.max_response_bytes);
    let jobs = JobServiceServer::new(JobsApi::new(catalog_store.clone()))
        .max_decoding_message_size(config.max_request_bytes)
        .max_encoding_message_size(config.max_response_bytes);

    let layers = ServiceBuilder::new()
        .layer(GrpcMetricsLayer::new(methods))
        .layer(AuthLayer::new(
            tokens.map(|(path, tokens)| watch_token_file(path, tokens, config.auth_reload_every)),
            !config.auth_health,
            quotas.clone(),
        ))
        .layer(admission.clone())
        .layer(DeadlineLayer::new(config.request_timeout))
        .into_inner();
    let (stop_grpc, stop_grpc_rx) = oneshot::channel::<()>();
    let router = Server::builder()
        .max_concurrent_streams(config.max_streams_per_connection)
        .http2_keepalive_interval(Some(config.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(config.http2_keepalive_timeout))
        .tcp_nodelay(true)
        .layer(layers)
        .add_service(health_service.clone())
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(generation)
        .add_service(catalog)
        .add_service(jobs);
    let stopped = async {
        let _ = stop_grpc_rx.await;
    };
    let grpc = match &tls {
        Some((_, configs)) => tokio::spawn(router.serve_with_incoming_shutdown(
            tls::incoming(
                grpc_listener,
                configs.clone(),
                tls::DEFAULT_HANDSHAKE_TIMEOUT,
            ),
            stopped,
        )),
        None => tokio::spawn(
            router.serve_with_incoming_shutdown(TcpListenerStream::new(grpc_listener), stopped),
        ),
    };

    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(reload_loop(
        registry.clone(),
        catalog_store.clone(),
        blobs.clone(),
        config.reload_interval,
        stop_rx.clone(),
    ));
    // The probes' port: the same health reporter, nothing else, no TLS, no token.
    let health_task = health_listener.map(|(listener, _)| {
        let mut stop_rx = stop_rx.clone();
        tokio::spawn(
            Server::builder()
                .add_service(health_service_for_probes)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                    let _ = stop_rx.wait_for(|stopping| *stopping).await;
                }),
        )
    });
    let metrics_task = metrics_listener.map(|listener| {
        let mut stop_rx = stop_rx.clone();
        tokio::spawn(metrics_http::serve(listener, prometheus, async move {
            let _ = stop_rx.wait_for(|stopping| *stopping).await;
        }))
    });

    tracing::info!(
        grpc = %grpc_addr,
        tls = match &tls {
            Some((true, _)) => "mutual",
            Some((false, _)) => "on",
            None => "off",
        },
        metrics = %metrics_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
        health = %health_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
        device = %info.device,
        torch = info.torch.version,
        cuda = info.torch.cuda_available,
        data_dir = %data_dir.display(),
        catalog = catalog_store.backend(),
        blobs = %blobs.url(),
        "weightgen-server listening"
    );

    let task = tokio::spawn(supervise(Supervised {
        grpc,
        stop_grpc,
        stop_rx,
        metrics_task,
        health_task,
        reporter,
        readiness: readiness.clone(),
        catalog_guard: storage.catalog_guard.clone(),
        admission: admission.clone(),
        grace: config.shutdown_grace,
    }));

    Ok(RunningServer {
        catalog: catalog_store,
        blobs,
        grpc_addr,
        metrics_addr,
        health_addr,
        readiness,
        admission,
        stop,
        task,
    })
}

/// Runs until SIGTERM or ctrl-c, then shuts down gracefully.
pub async fn run_until_signal(config: ServerConfig) -> Result<ShutdownReport, ServeError> {
    let server = start(config).await?;
    shutdown_signal().await;
    tracing::info!("shutdown signal received");
    server.shutdown().await
}

/// Resolves on SIGTERM or ctrl-c (SIGINT).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { what, addr, source })
}

fn local_addr(
    what: &'static str,
    listener: &TcpListener,
    addr: SocketAddr,
) -> Result<SocketAddr, ServeError> {
    listener
        .local_addr()
        .map_err(|source| ServeError::Bind { what, addr, source })
}

/// What the supervising task owns.
struct Supervised {
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    stop_grpc: oneshot::Sender<()>,
    stop_rx: watch::Receiver<bool>,
    metrics_task: Option<JoinHandle<std::io::Result<()>>>,
    health_task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    reporter: HealthReporter,
    readiness: Readiness,
    catalog_guard: BackendGuard,
    admission: Admission,
    grace: Duration,
}

/// Resolves once shutdown is asked for (or its sender is gone).
async fn stop_requested(stop_rx: &mut watch::Receiver<bool>) {
    let _ = stop_rx.wait_for(|stopping| *stopping).await;
}

/// Mirrors readiness into health until shutdown is asked for, then drains.
async fn supervise(s: Supervised) -> Result<ShutdownReport, ServeError> {
    let Supervised {
        mut grpc,
        stop_grpc,
        mut stop_rx,
        metrics_task,
        health_task,
        reporter,
        readiness,
        catalog_guard,
        admission,
        grace,
    } = s;
    let mut ready_rx = readiness.subscribe();
    let mut mirror_readiness = true;
    let mut catalog_rx = catalog_guard.subscribe();
    let mut mirror_catalog = true;
    loop {
        tokio::select! {
            () = stop_requested(&mut stop_rx) => break,
            changed = catalog_rx.changed(), if mirror_catalog => {
                if changed.is_ok() {
                    let up = *catalog_rx.borrow_and_update();
                    health::set_catalog(&reporter, up).await;
                } else {
                    mirror_catalog = false;
                }
            }
            changed = ready_rx.changed(), if mirror_readiness => {
                if changed.is_ok() {
                    let ready = *ready_rx.borrow_and_update();
                    health::set_generation(&reporter, ready).await;
                } else {
                    // Every owner of the flag is gone: the last status stays.
                    mirror_readiness = false;
                }
            }
            result = &mut grpc => {
                // The transport stopped by itself: report why.
                result??;
                return Ok(ShutdownReport { drained: true, cut_off: 0, drain_time: Duration::ZERO });
            }
        }
    }

    let started = Instant::now();
    tracing::info!(
        in_flight = admission.in_flight(),
        grace = ?grace,
        "shutting down: refusing new calls, draining in-flight calls"
    );
    health::set_stopping(&reporter).await;
    let _ = stop_grpc.send(());
    let report = match tokio::time::timeout(grace, &mut grpc).await {
        Ok(result) => {
            result??;
            ShutdownReport {
                drained: true,
                cut_off: 0,
                drain_time: started.elapsed(),
            }
        }
        Err(_) => {
            let cut_off = admission.in_flight();
            tracing::warn!(
                cut_off,
                "grace period over: stopping with calls still in flight"
            );
            grpc.abort();
            ShutdownReport {
                drained: false,
                cut_off,
                drain_time: started.elapsed(),
            }
        }
    };
    if let Some(task) = metrics_task
        && let Ok(Err(e)) = task.await
    {
        tracing::warn!(error = %e, "metrics endpoint ended with an error");
    }
    if let Some(task) = health_task
        && let Ok(Err(e)) = task.await
    {
        tracing::warn!(error = %e, "health port ended with an error");
    }
    tracing::info!(?report, "weightgen-server stopped");
    Ok(report)
}

/// The start-up sweep of what killed processes left in the blob store
/// (`crate::gc`); a failure is logged, never fatal.
async fn sweep_blobs(
    catalog: Arc<dyn Catalog>,
    blobs: BlobStore,
    upload_staging: PathBuf,
    grace: Duration,
) {
    let config = crate::gc::GcConfig {
        grace,
        dry_run: false,
        upload_staging: Some(upload_staging),
    };
    if let Err(e) = crate::gc::collect(catalog.as_ref(), &blobs, &config).await {
        tracing::warn!(error = %e, "start-up sweep of the blob store failed");
    }
}
