//! The catalog over gRPC: upload → list → get → download keeps the bytes;
//! an upload with a wrong size, SHA-256 or layout, over the size limit, or
//! for an unknown architecture is refused naming the field and stores
//! nothing; an identical upload is deduplicated.

mod common;

use std::collections::HashMap;

use common::spawn_server;
use tokio_stream::StreamExt;
use tonic::Code;
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
    let mut stream = client
        .download_checkpoint(DownloadCheckpointRequest {
            target: Some(Target::ZooModelId(model.id.clone())),
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
