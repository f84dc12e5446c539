//! The catalog over gRPC: upload → list → get → download keeps the bytes;
//! an upload with a wrong size, SHA-256 or layout, over the size limit, or
//! for an unknown architecture is refused naming the field and stores
//! nothing; an identical upload is deduplicated.

use std::collections::HashMap;

use std::time::{Duration, Instant};

use crate::common::proxy::{Mode, Proxy};
use crate::common::services::TestDatabase;
use crate::common::{spawn_server, try_download};
use prost::Message;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use weightgen::blobs::sha256_hex;
use weightgen::proto::v1::catalog_service_client::CatalogServiceClient;
use weightgen::proto::v1::{
    DownloadCheckpointRequest, FeatureValue, GetZooModelRequest, ListArchitecturesRequest,
    ListZooModelsRequest, TaskDescriptor, UploadCheckpointRequest, UploadCheckpointResponse,
    UploadHeader, download_checkpoint_request::Target, download_checkpoint_response::Part,
    upload_checkpoint_request,
};
use weightgen::tasks::Family;

type Client = CatalogServiceClient<tonic::transport::Channel>;

/// A digits MLP checkpoint with deterministic values (pure Rust, no tch).
fn checkpoint(scale: f32, drop_last: bool) -> Vec<u8> {
    let spec = Family::Digits.network("").unwrap().spec;
    let mut tensors = spec.tensors.clone();
    if drop_last {
        tensors.pop();
    }
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|t| {
            let n: usize = t.shape.iter().product();
            let bytes = (0..n)
                .flat_map(|i| ((i as f32 * 0.37).sin() * scale).to_le_bytes())
                .collect();
            (t.name.clone(), t.shape.clone(), bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(name, shape, bytes)| {
            (
                name.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize(views, None).unwrap()
}

fn header(file: &[u8], architecture: &str) -> UploadHeader {
    let mut features = HashMap::new();
    features.insert("input_mean".to_owned(), FeatureValue { values: vec![4.5] });
    UploadHeader {
        architecture: architecture.into(),
        family: "digits".into(),
        task: Some(TaskDescriptor {
            architecture: architecture.into(),
            features,
            ..Default::default()
        }),
        metrics: [("test_accuracy".to_owned(), 0.93)].into_iter().collect(),
        seed: 7,
        training_config_json: r#"{"lr": 0.01}"#.into(),
        size_bytes: file.len() as u64,
        sha256: sha256_hex(file),
        filename: "mine.safetensors".into(),
    }
}

async fn upload(
    client: &mut Client,
    header: UploadHeader,
    file: &[u8],
) -> Result<UploadCheckpointResponse, tonic::Status> {
    let mut messages = vec![UploadCheckpointRequest {
        part: Some(upload_checkpoint_request::Part::Header(header)),
    }];
    for chunk in file.chunks(4096) {
        messages.push(UploadCheckpointRequest {
            part: Some(upload_checkpoint_request::Part::Chunk(chunk.to_vec())),
        });
    }
    client
        .upload_checkpoint(tokio_stream::iter(messages))
        .await
        .map(tonic::Response::into_inner)
}

/// Downloads zoo model `id`: its bytes (each chunk at most 1 MiB), the
/// header's and the trailer's SHA-256.
async fn download(client: &mut Client, id: &str) -> (Vec<u8>, String, String) {
    let mut stream = client
        .download_checkpoint(DownloadCheckpointRequest {
            target: Some(Target::ZooModelId(id.to_owned())),
        })
        .await
        .unwrap()
        .into_inner();
    let (mut downloaded, mut declared, mut trailer) = (Vec::new(), String::new(), String::new());
    while let Some(message) = stream.next().await {
        match message.unwrap().part.unwrap() {
            Part::Header(h) => declared = h.sha256,
            Part::Chunk(c) => {
                assert!(c.len() <= 1 << 20);
                downloaded.extend_from_slice(&c);
            }
            Part::Trailer(t) => trailer = t.sha256,
        }
    }
    (downloaded, declared, trailer)
}

async fn stored_models(client: &mut Client) -> u64 {
    client
        .list_zoo_models(ListZooModelsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_list_get_download_round_trip_and_bad_uploads_store_nothing() {
    let test = spawn_server(|c| c.max_upload_bytes = 64 * 1024).await;
    let mut client = Client::new(test.channel().await);
    let arch = "digits-mlp-64-32-5";
    let file = checkpoint(0.1, false);

    // Refused uploads, each naming its field; nothing is stored.
    let mut wrong_sha = header(&file, arch);
    wrong_sha.sha256 = sha256_hex(b"something else");
    let mut short = header(&file, arch);
    short.size_bytes -= 1;
    let bad_layout = checkpoint(0.1, true);
    let mut nan = checkpoint(0.1, false);
    let at = nan.len() - 4;
    nan[at..].copy_from_slice(&f32::NAN.to_le_bytes());
    let mut too_big = header(&file, arch);
    too_big.size_bytes = 1 << 20;
    for (what, header, bytes, code, field) in [
        (
            "wrong sha256",
            wrong_sha,
            file.clone(),
            Code::InvalidArgument,
            "header.sha256:",
        ),
        (
            "more bytes than declared",
            short,
            file.clone(),
            Code::InvalidArgument,
            "header.size_bytes:",
        ),
        (
            "missing tensor",
            header(&bad_layout, arch),
            bad_layout.clone(),
            Code::InvalidArgument,
            "file.tensors:",
        ),
        (
            "NaN weight",
            header(&nan, arch),
            nan.clone(),
            Code::InvalidArgument,
            "file.tensors:",
        ),
        (
            "over the size limit",
            too_big,
            file.clone(),
            Code::ResourceExhausted,
            "header.size_bytes:",
        ),
        (
            "unknown architecture",
            header(&file, "nope"),
            file.clone(),
            Code::NotFound,
            "header.architecture:",
        ),
        (
            "garbage",
            header(b"not safetensors", arch),
            b"not safetensors".to_vec(),
            Code::InvalidArgument,
            "file.file:",
        ),
    ] {
        let err = upload(&mut client, header, &bytes).await.unwrap_err();
        assert_eq!(err.code(), code, "{what}: {}", err.message());
        assert!(
            err.message().starts_with(field),
            "{what}: {}",
            err.message()
        );
    }
    assert_eq!(stored_models(&mut client).await, 0);
    assert!(test.server.blobs().list().await.unwrap().is_empty());
    // Not even the built-in architecture the refused files named.
    assert!(
        test.server
            .catalog()
            .architecture(arch)
            .await
            .unwrap()
            .is_none(),
        "a refused upload registered {arch}"
    );

    // A good upload, then the same file again: deduplicated.
    let added = upload(&mut client, header(&file, arch), &file)
        .await
        .unwrap();
    assert!(!added.deduplicated);
    let model = added.model.unwrap();
    assert_eq!(
        (model.sha256.as_str(), model.size_bytes),
        (sha256_hex(&file).as_str(), file.len() as u64)
    );
    let again = upload(&mut client, header(&file, arch), &file)
        .await
        .unwrap();
    assert!(again.deduplicated);
    assert_eq!(again.model.unwrap().id, model.id);
    assert!(
        test.server
            .catalog()
            .architecture(arch)
            .await
            .unwrap()
            .is_some()
    );

    // Listed, described, and downloaded byte for byte.
    let listed = client
        .list_zoo_models(ListZooModelsRequest {
            architecture: arch.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.total, 1);
    let got = client
        .get_zoo_model(GetZooModelRequest {
            id: model.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.metrics["test_accuracy"], 0.93);
    assert_eq!(got.seed, 7);
    assert_eq!(got.task.unwrap().features["input_mean"].values, vec![4.5]);
    let (downloaded, declared, trailer) = download(&mut client, &model.id).await;
    assert_eq!(downloaded, file);
    assert_eq!(
        (declared.as_str(), trailer.as_str()),
        (model.sha256.as_str(), model.sha256.as_str())
    );
    let err = client
        .download_checkpoint(DownloadCheckpointRequest {
            target: Some(Target::DenoiserId("nope".into())),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let archs = client
        .list_architectures(ListArchitecturesRequest {
            family: "digits".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        archs
            .architectures
            .iter()
            .any(|a| a.name == arch && a.num_parameters == 2245)
    );
    test.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_page_size_works_and_pages_fit_the_response_limit() {
    const LIMIT: usize = 16 * 1024;
    let test = spawn_server(|c| c.max_response_bytes = LIMIT).await;
    let mut client = Client::new(test.channel().await);
    let arch = "digits-mlp-64-32-5";
    for n in 0..80 {
        let file = checkpoint(0.1 + n as f32 * 0.01, false);
        let mut header = header(&file, arch);
        header.seed = n;
        upload(&mut client, header, &file).await.unwrap();
    }
    let list = |size: u32, token: String| ListZooModelsRequest {
        page: Some(weightgen::proto::v1::PageRequest {
            page_size: size,
            page_token: token,
        }),
        ..Default::default()
    };
    // The documented maximum (1000) and a larger, clamped size both answer;
    // the page is cut to the response limit and paging visits every model once.
    for size in [1000, 1001, u32::MAX] {
        let mut seen = std::collections::HashSet::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let page = client
                .list_zoo_models(list(size, token))
                .await
                .unwrap_or_else(|e| panic!("page_size {size}: {e:?}"))
                .into_inner();
            assert!(page.encoded_len() <= LIMIT, "{} bytes", page.encoded_len());
            assert_eq!(page.total, 80);
            for model in &page.models {
                assert!(seen.insert(model.id.clone()), "{} listed twice", model.id);
            }
            pages += 1;
            token = page.next_page_token;
            if token.is_empty() {
                break;
            }
        }
        assert_eq!(seen.len(), 80, "page_size {size}");
        assert!(
            pages > 1,
            "80 models fit one {LIMIT}-byte page: the test proves nothing"
        );
    }
    test.server.shutdown().await.unwrap();
}

/// A free local port (bound, then released for the server to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Starts the server binary on `data` and waits until it answers.
async fn start_server(data: &std::path::Path) -> (std::process::Child, Client) {
    let port = free_port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_weightgen-server"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            "off",
        ])
        .arg("--data-dir")
        .arg(data)
        .args(["--device", "cpu", "--log-filter", "warn"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start weightgen-server");
    for _ in 0..200 {
        if let Ok(channel) =
            tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
                .unwrap()
                .connect()
                .await
        {
            return (child, Client::new(channel));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("weightgen-server did not start on port {port}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_killed_at_any_point_leave_nothing_behind_after_the_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let arch = "digits-mlp-64-32-5";
    // SIGKILL the server at many points of 6 concurrent uploads each round.
    for (round, delay_ms) in [0u64, 2, 5, 10, 20, 40, 80, 160].into_iter().enumerate() {
        let (mut child, client) = start_server(&data).await;
        let mut uploads = Vec::new();
        for k in 0..6u64 {
            let mut client = client.clone();
            let file = checkpoint(1.0 + (round as f32) + k as f32 * 0.1, false);
            let mut header = header(&file, arch);
            header.seed = k;
            uploads.push(tokio::spawn(async move {
                upload(&mut client, header, &file).await
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
        child.kill().expect("SIGKILL the server");
        child.wait().unwrap();
        for call in uploads {
            // Each upload either landed before the kill or failed with it.
            let _ = call.await.unwrap();
        }
    }
    // What a killed writer leaves: a partial write and a blob with no row.
    let blobs = weightgen::blobs::BlobStore::local(&data.join("blobs")).unwrap();
    let orphan = blobs
        .put(bytes::Bytes::from(checkpoint(9.0, false)))
        .await
        .unwrap();
    let partial = data
        .join("blobs/sha256")
        .join(&orphan.sha256[..2])
        .join(format!("{}#3", sha256_hex(b"partial")));
    std::fs::write(&partial, b"half a checkpoint").unwrap();
    // … and a staged upload (uploads arrive into data/staging, not memory).
    std::fs::create_dir_all(data.join("staging")).unwrap();
    let staged = data.join("staging/upload-0123456789abcdef.part");
    std::fs::write(&staged, b"the first half of an upload").unwrap();

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_weightgen-worker"))
        .args(["gc", "--grace", "0s", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let text = crate::common::combined_output(&output);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("removed"), "{text}");
    assert!(!partial.exists(), "{text}");
    let left: Vec<_> = std::fs::read_dir(data.join("staging"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "staged uploads left: {left:?}; {text}");

    // No partial write, no blob without a row, no row without its blob;
    // every model listed over gRPC downloads intact after a restart.
    assert!(blobs.staging_files().await.unwrap().is_empty());
    let catalog =
        weightgen::catalog::open(&format!("sqlite://{}", data.join("catalog.db").display()))
            .await
            .unwrap();
    let mut referenced = catalog.referenced_blobs().await.unwrap();
    referenced.sort();
    referenced.dedup();
    assert_eq!(blobs.list().await.unwrap(), referenced, "{text}");
    let (mut child, mut client) = start_server(&data).await;
    let listed = client
        .list_zoo_models(ListZooModelsRequest {
            page: Some(weightgen::proto::v1::PageRequest {
                page_size: 1000,
                page_token: String::new(),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    eprintln!(
        "after 8 killed rounds of 6 uploads: {} models stored; {text}",
        listed.total
    );
    for model in &listed.models {
        let (bytes, _, _) = download(&mut client, &model.id).await;
        assert_eq!(sha256_hex(&bytes), model.sha256, "{}", model.id);
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A proxy in front of the test database's PostgreSQL.
async fn proxy_to_postgres(db: &TestDatabase) -> Proxy {
    let target = db.url.split("://").nth(1).unwrap();
    let target = target.rsplit_once('@').map_or(target, |(_, h)| h);
    Proxy::start(target.split('/').next().unwrap().parse().unwrap()).await
}

/// A proxy in front of the tests' S3 server.
async fn proxy_to_s3() -> Proxy {
    let endpoint = std::env::var("AWS_ENDPOINT").expect("AWS_ENDPOINT (scripts/test.sh sets it)");
    Proxy::start(endpoint.trim_start_matches("http://").parse().unwrap()).await
}

/// `url` with its host:port replaced by `addr`.
fn via(url: &str, addr: std::net::SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (userinfo, hostpath) = match rest.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), rest),
    };
    let path = hostpath.find('/').map_or("", |i| &hostpath[i..]);
    format!("{scheme}://{userinfo}{addr}{path}")
}

async fn catalog_health(channel: tonic::transport::Channel) -> ServingStatus {
    service_health(channel, "weightgen.v1.CatalogService").await
}

async fn service_health(channel: tonic::transport::Channel, service: &str) -> ServingStatus {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status()
}

/// Uploads one digits checkpoint: its bytes and its row.
async fn upload_one(client: &mut Client) -> (Vec<u8>, weightgen::proto::v1::ZooModel) {
    let file = checkpoint(1.0, false);
    let uploaded = upload(client, header(&file, "digits-mlp-64-32-5"), &file)
        .await
        .unwrap()
        .model
        .unwrap();
    (file, uploaded)
}

/// A list call with a 30 s deadline: its code, message and answer time.
async fn timed_list(client: &mut Client) -> (Code, String, Duration) {
    let started = Instant::now();
    let mut request = tonic::Request::new(ListZooModelsRequest::default());
    request.set_timeout(Duration::from_secs(30));
    let code = match client.list_zoo_models(request).await {
        Ok(_) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_owned()),
    };
    (code.0, code.1, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_answers_unavailable_at_once_and_heals_without_a_restart() {
    let db = TestDatabase::create("outage").await;
    let proxy = proxy_to_postgres(&db).await;
    let url = via(&db.url, proxy.addr());
    let test = spawn_server(|c| {
        c.storage.catalog = Some(url.clone());
        c.storage.catalog_call_timeout = Some(Duration::from_secs(2));
    })
    .await;
    let channel = test.channel().await;
    let mut client = CatalogServiceClient::new(channel.clone());
    let (file, uploaded) = upload_one(&mut client).await;

    for mode in [Mode::Refuse, Mode::Hang] {
        proxy.set(mode);
        // The first calls pay the acquire (refused) or call (hung) timeout,
        // then the breaker answers at once.
        let mut last = Duration::ZERO;
        for _ in 0..5 {
            let (code, message, took) = timed_list(&mut client).await;
            assert_eq!(code, Code::Unavailable, "{mode:?}: {message}");
            assert!(
                message.starts_with("the catalog is unavailable ("),
                "{message}"
            );
            assert!(message.contains(&proxy.addr().to_string()), "{message}");
            assert!(!message.contains("postgres@"), "no credentials: {message}");
            assert!(took < Duration::from_secs(4), "{mode:?}: {took:?}");
            last = took;
        }
        assert!(
            last < Duration::from_millis(300),
            "{mode:?}: breaker open, yet {last:?}"
        );
        assert_eq!(
            catalog_health(channel.clone()).await,
            ServingStatus::NotServing
        );
        backend_reads_down(&test, "catalog").await;

        proxy.set(Mode::Forward);
        let back = Instant::now();
        while catalog_health(channel.clone()).await != ServingStatus::Serving {
            assert!(
                back.elapsed() < Duration::from_secs(5),
                "{mode:?}: not healed"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (code, message, _) = timed_list(&mut client).await;
        assert_eq!(code, Code::Ok, "{mode:?}: {message}");
        let (bytes, declared, trailer) = download(&mut client, &uploaded.id).await;
        assert_eq!(bytes, file);
        assert_eq!(
            (declared.as_str(), trailer.as_str()),
            (uploaded.sha256.as_str(), uploaded.sha256.as_str())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_its_postgres_fails_within_seconds_naming_the_address() {
    // A port nothing listens on.
    let port = free_port();
    let url = format!("postgres://postgres:secret@127.0.0.1:{port}/weightgen");
    let started = Instant::now();
    let mut config = weightgen::serve::ServerConfig::with_defaults();
    config.listen = "127.0.0.1:0".parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    config.storage = weightgen::storage::StorageArgs::embedded(dir.path());
    config.storage.catalog = Some(url);
    config.storage.catalog_connect_timeout = Duration::from_secs(2);
    let error = weightgen::serve::start(config)
        .await
        .err()
        .expect("no catalog, no server");
    let message = error.to_string();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(
        message.starts_with(&format!(
            "the catalog is unavailable (postgres://127.0.0.1:{port}/weightgen: "
        )),
        "{message}"
    );
    assert!(!message.contains("secret"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_outage_answers_unavailable_naming_the_blob_store_and_heals_without_a_restart() {
    let proxy = proxy_to_s3().await;
    let blobs = crate::common::services::s3_prefix("outage");
    let test = spawn_server(|c| {
        c.storage.blobs = Some(blobs.clone());
        c.storage.s3_endpoint = Some(format!("http://{}", proxy.addr()));
        c.storage.blob_request_timeout = Duration::from_secs(1);
        c.storage.blob_retry_timeout = Duration::from_secs(1);
    })
    .await;
    let mut client = CatalogServiceClient::new(test.channel().await);
    let (_, uploaded) = upload_one(&mut client).await;

    for mode in [Mode::Refuse, Mode::Hang] {
        proxy.set(mode);
        let mut last = Duration::ZERO;
        for _ in 0..5 {
            let started = Instant::now();
            let status = try_download(&mut client, &uploaded.id).await.unwrap_err();
            last = started.elapsed();
            assert_eq!(status.code(), Code::Unavailable, "{mode:?}: {status:?}");
            assert!(
                status
                    .message()
                    .starts_with("the blob store is unavailable ("),
                "{mode:?}: {}",
                status.message()
            );
            assert!(last < Duration::from_secs(6), "{mode:?}: {last:?}");
        }
        assert!(
            last < Duration::from_millis(300),
            "{mode:?}: breaker open, yet {last:?}"
        );
        backend_reads_down(&test, "blob_store").await;
        // The catalog still answers, and a refused upload lists nothing.
        let other = checkpoint(2.0, false);
        let status = upload(&mut client, header(&other, "digits-mlp-64-32-5"), &other)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(stored_models(&mut client).await, 1);

        proxy.set(Mode::Forward);
        let back = Instant::now();
        let bytes = loop {
            match try_download(&mut client, &uploaded.id).await {
                Ok(bytes) => break bytes,
                Err(status) => {
                    assert!(
                        back.elapsed() < Duration::from_secs(5),
                        "{mode:?}: {status:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        assert_eq!(sha256_hex(&bytes), uploaded.sha256);
    }
}

/// One call's result and how long it took.
async fn timed<T>(
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> (Result<T, tonic::Status>, Duration) {
    let started = Instant::now();
    let result = call.await;
    (result, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_backends_are_answered_unavailable_before_the_clients_deadline() {
    // PostgreSQL and S3 both behind proxies that accept and never answer;
    // the server's own waits are long (call 10 s, S3 request 15 s, the
    // defaults; the pool's acquire timeout 1 s), the clients' deadlines
    // shorter.
    let db = TestDatabase::create("deadline").await;
    let pg = proxy_to_postgres(&db).await;
    let s3 = proxy_to_s3().await;
    let blobs = crate::common::services::s3_prefix("deadline");
    let url = via(&db.url, pg.addr());
    let test = spawn_server(|c| {
        c.storage.catalog = Some(url.clone());
        c.storage.blobs = Some(blobs.clone());
        c.storage.s3_endpoint = Some(format!("http://{}", s3.addr()));
    })
    .await;
    let channel = test.channel().await;
    let mut client = CatalogServiceClient::new(channel.clone());
    let (_, uploaded) = upload_one(&mut client).await;
    // Shorter than the pool's 1 s acquire timeout, so the deadline is what
    // ends the catalog's wait too.
    let deadline = Duration::from_millis(800);

    s3.set(Mode::Hang);
    for _ in 0..4 {
        let mut request = tonic::Request::new(DownloadCheckpointRequest {
            target: Some(Target::ZooModelId(uploaded.id.clone())),
        });
        request.set_timeout(deadline);
        let (result, took) = timed(client.download_checkpoint(request)).await;
        let status = result.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            status.message().starts_with(&format!(
                "the blob store is unavailable ({blobs}: no answer within"
            )) && status.message().contains("the call's deadline left for it"),
            "{}",
            status.message()
        );
        // Answered before the deadline, after waiting for the store: a wait
        // cut short by a client's deadline does not open the breaker (an
        // open one would refuse at once).
        assert!(
            took > Duration::from_millis(500) && took < deadline,
            "{took:?}"
        );
    }
    s3.set(Mode::Forward);

    pg.set(Mode::Hang);
    for _ in 0..4 {
        let mut request = tonic::Request::new(ListZooModelsRequest::default());
        request.set_timeout(deadline);
        let (result, took) = timed(client.list_zoo_models(request)).await;
        let status = result.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            status
                .message()
                .starts_with("the catalog is unavailable (postgres://")
                && status.message().contains(&pg.addr().to_string())
                && status.message().contains("the call's deadline left for it"),
            "{}",
            status.message()
        );
        assert!(
            took > Duration::from_millis(500) && took < deadline,
            "{took:?}"
        );
    }
    assert_eq!(
        catalog_health(channel.clone()).await,
        ServingStatus::Serving
    );
    pg.set(Mode::Forward);
    let (result, _) = timed(async {
        let mut request = tonic::Request::new(ListZooModelsRequest::default());
        request.set_timeout(Duration::from_secs(10));
        client.list_zoo_models(request).await
    })
    .await;
    assert_eq!(result.unwrap().into_inner().models.len(), 1);
}

/// Waits for `weightgen_backend_up{backend}` to read 0 (an open breaker
/// re-publishes it at every probe, 1 s).
async fn backend_reads_down(test: &crate::common::TestServer, backend: &str) {
    test.wait_for_metric(
        "weightgen_backend_up",
        &[("backend", backend)],
        0.0,
        Duration::from_secs(3),
    )
    .await;
}

/// `url` with `param` added to its query string.
fn with_param(url: &str, param: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{param}")
}

#[tokio::test]
async fn postgres_over_tls_verifies_the_server_certificate() {
    use sqlx::Connection;
    let ca = std::env::var("WEIGHTGEN_TEST_PG_CA").unwrap_or_else(|_| {
        panic!("WEIGHTGEN_TEST_PG_CA is not set: run the tests through scripts/test.sh, whose PostgreSQL serves TLS with a CA it makes")
    });
    let db = TestDatabase::create("tls").await;
    let verified = with_param(&db.url, &format!("sslmode=verify-full&sslrootcert={ca}"));
    // The catalog opens, migrates and answers over verified TLS ...
    let catalog = weightgen::catalog::open(&verified).await.unwrap();
    catalog.ping().await.unwrap();
    // ... and the session really is encrypted.
    let mut connection = sqlx::PgConnection::connect(&verified).await.unwrap();
    let (ssl,): (bool,) =
        sqlx::query_as("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&mut connection)
            .await
            .unwrap();
    assert!(ssl, "sslmode=verify-full gave a plaintext session");
    connection.close().await.ok();

    // A CA that did not sign the server's certificate: refused, saying why.
    let dir = tempfile::tempdir().unwrap();
    let rogue = crate::common::tls::Pki::new(dir.path(), "rogue");
    let wrong = with_param(
        &db.url,
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            rogue.ca_pem().display()
        ),
    );
    let timeouts = weightgen::catalog::CatalogTimeouts {
        connect: Duration::from_secs(1),
        acquire: Duration::from_secs(1),
    };
    let Err(err) = weightgen::catalog::open_with(&wrong, timeouts).await else {
        panic!("a server certificate from another CA was accepted")
    };
    let text = err.to_string();
    assert!(
        text.contains("UnknownIssuer") || text.contains("certificate"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_keeps_serving_through_a_postgres_outage() {
    use crate::common::generation::{
        Client as GenerationClient, descriptor, generate, small_digits_zoo_with, train_with,
        wait_ready,
    };
    let db = TestDatabase::create("gen_outage").await;
    let proxy = proxy_to_postgres(&db).await;
    // A zoo and an active denoiser in the PostgreSQL catalog (blobs in the data dir).
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    small_digits_zoo_with(&data, &["--catalog", &db.url]);
    train_with(
        &data,
        "digits-pg",
        "4",
        &["--activate", "--catalog", &db.url],
    );
    let url = via(&db.url, proxy.addr());
    let test = spawn_server(|c| {
        c.storage = weightgen::storage::StorageArgs::embedded(&data);
        c.storage.catalog = Some(url.clone());
        c.storage.catalog_call_timeout = Some(Duration::from_secs(2));
    })
    .await;
    let channel = test.channel().await;
    let mut generation = GenerationClient::new(channel.clone());
    wait_ready(&mut generation).await;
    let task = descriptor();
    let before = generate(&mut generation, &task, 5).await.unwrap();

    // PostgreSQL goes away: the catalog's calls fail fast and its health
    // turns NOT_SERVING, while the loaded denoiser keeps generating.
    proxy.set(Mode::Refuse);
    let mut catalog = CatalogServiceClient::new(channel.clone());
    let started = Instant::now();
    while catalog_health(channel.clone()).await != ServingStatus::NotServing {
        let _ = timed_list(&mut catalog).await;
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the breaker never opened"
        );
    }
    assert_eq!(
        service_health(channel.clone(), "weightgen.v1.GenerationService").await,
        ServingStatus::Serving
    );
    let during = generate(&mut generation, &task, 5).await.unwrap();
    assert_eq!(
        during.files, before.files,
        "same seed, same denoiser, same bytes"
    );
    assert_eq!(during.denoiser, "digits-pg");

    proxy.set(Mode::Forward);
    let back = Instant::now();
    while catalog_health(channel.clone()).await != ServingStatus::Serving {
        assert!(back.elapsed() < Duration::from_secs(10), "not healed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    test.server.shutdown().await.unwrap();
}
