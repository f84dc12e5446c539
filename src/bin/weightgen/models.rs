//! `weightgen models …`: the zoo models of the server's CatalogService from
//! the command line: list, get, download, upload. Also the checked checkpoint
//! download the `denoisers` commands share.

use std::fs::File;
use std::future::Future;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use indicatif::{HumanBytes, ProgressBar};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use weightgen::proto::v1 as pb;

use crate::output::{
    Failure, GetArgs, ListOptions, bytes_bar, catalog_client, collect_pages, exit_code, hex,
    json_object_flag, metrics_json, metrics_text, named_values, number_text, out, print_fields,
    print_json, print_metrics, print_table, short_name, time_json, time_text, within,
};
use pb::download_checkpoint_request::Target;

/// Largest chunk of a checkpoint per upload message (the server's limit).
const CHUNK_BYTES: usize = 1 << 20;

// JSON forms (proto field names, enums by name, timestamps in RFC 3339)

fn task_json(task: &pb::TaskDescriptor) -> Value {
    let features: std::collections::BTreeMap<&String, &Vec<f64>> =
        task.features.iter().map(|(k, v)| (k, &v.values)).collect();
    let tensor = |t: &Option<pb::FloatTensor>| {
        t.as_ref().map_or(
            Value::Null,
            |t| json!({"shape": t.shape, "values": t.values}),
        )
    };
    json!({
        "architecture": task.architecture,
        "features": features,
        "embedding": task.embedding,
        "support": task.support.as_ref().map_or(Value::Null, |s| json!({
            "inputs": tensor(&s.inputs),
            "targets": tensor(&s.targets),
        })),
        "num_classes": task.num_classes,
    })
}

fn source_name(source: i32) -> String {
    pb::ZooModelSource::try_from(source).map_or_else(
        |_| format!("unknown({source})"),
        |s| short_name(s.as_str_name(), "ZOO_MODEL_SOURCE_"),
    )
}

fn zoo_model_json(m: &pb::ZooModel) -> Value {
    json!({
        "id": m.id,
        "architecture": m.architecture,
        "family": m.family,
        "source": pb::ZooModelSource::try_from(m.source)
            .map_or_else(|_| json!(m.source), |s| json!(s.as_str_name())),
        "task": m.task.as_ref().map_or(Value::Null, task_json),
        "seed": m.seed,
        "metrics": metrics_json(&m.metrics),
        "training_config_json": m.training_config_json,
        "sha256": m.sha256,
        "size_bytes": m.size_bytes,
        "created_at": time_json(m.created_at.as_ref()),
    })
}

fn short_sha(sha: &str) -> String {
    sha.chars().take(12).collect()
}

#[derive(Subcommand)]
pub enum ModelsCommand {
    /// List zoo models, newest first, following every page up to --limit.
    List {
        /// Only models of this architecture.
        #[arg(long)]
        architecture: Option<String>,
        /// Only models of this task family.
        #[arg(long)]
        family: Option<String>,
        #[command(flatten)]
        options: ListOptions,
    },
    /// Describe one zoo model: architecture, task, seed, metrics, training
    /// configuration, size and SHA-256.
    Get(GetArgs),
    /// Download a zoo model's safetensors file; its size and SHA-256 are
    /// checked against what the server reports before the file is written.
    /// --timeout limits the time without progress, not the whole transfer.
    Download(DownloadArgs),
    /// Upload a safetensors checkpoint to the server's "uploaded" zoo, in
    /// chunks of 1 MiB with its size and SHA-256. The server checks it against
    /// the architecture and stores an identical file only once. --timeout
    /// limits the time without progress, not the whole transfer.
    Upload(Box<UploadArgs>),
}

#[derive(Args)]
pub struct DownloadArgs {
    /// Id of what to download.
    pub id: String,
    /// Output file (default: the file name the server suggests, in the
    /// current directory). Written as FILE.part, renamed once checked.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

#[derive(Args)]
pub struct UploadArgs {
    /// The safetensors file.
    file: PathBuf,
    /// Architecture the checkpoint must match, e.g. "digits-mlp-64-32-5".
    #[arg(long)]
    architecture: String,
    /// Task family the checkpoint belongs to, e.g. "digits".
    #[arg(long)]
    family: Option<String>,
    /// A feature of the task it was trained on, NAME=V1,V2,… (repeat for each
    /// feature), as the architecture's feature schema names them.
    #[arg(long = "feature", value_name = "NAME=VALUES")]
    features: Vec<String>,
    /// Number of classes of the task it was trained on (classification).
    #[arg(long, default_value_t = 0)]
    num_classes: u32,
    /// A metric measured on it, NAME=VALUE (repeat), e.g. test_accuracy=0.93.
    #[arg(long = "metric", value_name = "NAME=VALUE")]
    metrics: Vec<String>,
    /// Training seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Training configuration as a JSON object, e.g. '{"lr": 0.01}'.
    #[arg(long, value_name = "JSON")]
    training_config: Option<String>,
    /// Print the stored model as one JSON object (proto field names).
    #[arg(long)]
    json: bool,
}

/// `weightgen models …`.
pub async fn models(addr: &str, timeout: Duration, command: ModelsCommand) -> ExitCode {
    let (name, result) = match command {
        ModelsCommand::List {
            architecture,
            family,
            options,
        } => (
            "models list",
            list_models(addr, timeout, architecture, family, options).await,
        ),
        ModelsCommand::Get(GetArgs { id, json }) => {
            ("models get", get_model(addr, timeout, id, json).await)
        }
        ModelsCommand::Download(args) => (
            "models download",
            download(addr, timeout, Target::ZooModelId(args.id), args.output).await,
        ),
        ModelsCommand::Upload(args) => ("models upload", upload(addr, timeout, *args).await),
    };
    exit_code(name, result)
}

fn model_row(m: &pb::ZooModel) -> Vec<String> {
    vec![
        m.id.clone(),
        m.architecture.clone(),
        if m.family.is_empty() {
            "-".into()
        } else {
            m.family.clone()
        },
        source_name(m.source),
        HumanBytes(m.size_bytes).to_string(),
        short_sha(&m.sha256),
        time_text(m.created_at.as_ref()),
        metrics_text(&m.metrics),
    ]
}

async fn list_models(
    addr: &str,
    timeout: Duration,
    architecture: Option<String>,
    family: Option<String>,
    ListOptions { limit, json }: ListOptions,
) -> Result<ExitCode, Failure> {
    let catalog = catalog_client(addr, Some(timeout)).await?;
    let (models, total) = collect_pages(limit, |page| {
        let mut catalog = catalog.clone();
        let request = pb::ListZooModelsRequest {
            architecture: architecture.clone().unwrap_or_default(),
            family: family.clone().unwrap_or_default(),
            page: Some(page),
        };
        async move {
            let r = catalog.list_zoo_models(request).await?.into_inner();
            Ok((r.models, r.next_page_token, Some(r.total)))
        }
    })
    .await?;
    if json {
        models
            .iter()
            .map(zoo_model_json)
            .for_each(|m| print_json(&m));
        return Ok(ExitCode::SUCCESS);
    }
    if models.is_empty() {
        eprintln!("no zoo models");
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = models.iter().map(model_row).collect();
    print_table(
        &[
            "ID",
            "ARCHITECTURE",
            "FAMILY",
            "SOURCE",
            "SIZE",
            "SHA256",
            "CREATED",
            "METRICS",
        ],
        &rows,
    );
    if let Some(total) = total.filter(|t| *t > models.len() as u64) {
        eprintln!("{} of {total} models shown (see --limit)", models.len());
    }
    Ok(ExitCode::SUCCESS)
}

fn task_text(task: &pb::TaskDescriptor) -> String {
    let mut names: Vec<&String> = task.features.keys().collect();
    names.sort();
    let mut parts: Vec<String> = names
        .into_iter()
        .map(|k| {
            let values: Vec<String> = task.features[k]
                .values
                .iter()
                .map(|v| number_text(*v))
                .collect();
            format!("{k}={}", values.join(","))
        })
        .collect();
    if let Some(inputs) = task.support.as_ref().and_then(|s| s.inputs.as_ref()) {
        parts.push(format!("support {:?}", inputs.shape));
    }
    if task.num_classes > 0 {
        parts.push(format!("{} classes", task.num_classes));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

async fn get_model(
    addr: &str,
    timeout: Duration,
    id: String,
    json: bool,
) -> Result<ExitCode, Failure> {
    let mut catalog = catalog_client(addr, Some(timeout)).await?;
    let m = catalog
        .get_zoo_model(pb::GetZooModelRequest { id })
        .await?
        .into_inner();
    if json {
        print_json(&zoo_model_json(&m));
        return Ok(ExitCode::SUCCESS);
    }
    print_fields(&[
        ("id", m.id.clone()),
        ("architecture", m.architecture.clone()),
        ("family", m.family.clone()),
        ("source", source_name(m.source)),
        (
            "task",
            m.task.as_ref().map_or_else(|| "-".into(), task_text),
        ),
        ("seed", m.seed.to_string()),
        (
            "training config",
            match m.training_config_json.trim() {
                "" | "null" => "-".to_owned(),
                text => text.to_owned(),
            },
        ),
        (
            "size",
            format!("{} ({} bytes)", HumanBytes(m.size_bytes), m.size_bytes),
        ),
        ("sha256", m.sha256.clone()),
        ("created", time_text(m.created_at.as_ref())),
    ]);
    print_metrics(&m.metrics);
    Ok(ExitCode::SUCCESS)
}

/// The local path for a download: `output`, or the server's suggested
/// name (its last component only) in the current directory.
fn download_path(output: Option<PathBuf>, suggested: &str, id: &str) -> PathBuf {
    output.unwrap_or_else(|| {
        Path::new(suggested)
            .file_name()
            .map_or_else(|| PathBuf::from(format!("{id}.safetensors")), PathBuf::from)
    })
}

/// `path` with ".part" appended.
fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".part");
    PathBuf::from(name)
}

/// Streams a checkpoint to disk, checking it against the header's size and
/// SHA-256 and the trailer's SHA-256 before renaming it into place.
pub async fn download(
    addr: &str,
    timeout: Duration,
    target: Target,
    output: Option<PathBuf>,
) -> Result<ExitCode, Failure> {
    use pb::download_checkpoint_response::Part;
    let id = match &target {
        Target::ZooModelId(id) | Target::DenoiserId(id) => id.clone(),
    };
    let bad = |reason: String| Failure::Failed(format!("malformed download of {id}: {reason}"));
    // No per-call limit on the channel: the stream may take longer than
    // --timeout; instead each message must arrive within it.
    let mut catalog = catalog_client(addr, None).await?;
    let mut stream = within(
        timeout,
        catalog.download_checkpoint(pb::DownloadCheckpointRequest {
            target: Some(target),
        }),
    )
    .await?
    .into_inner();
    let header = match within(timeout, stream.message()).await? {
        Some(pb::DownloadCheckpointResponse {
            part: Some(Part::Header(h)),
        }) => h,
        Some(_) => return Err(bad("the first message is not a header".into())),
        None => return Err(bad("the stream ended before the header".into())),
    };
    let path = download_path(output, &header.filename, &id);
    let partial = partial_path(&path);
    let file = File::create(&partial)
        .map_err(|e| Failure::Failed(format!("{}: {e}", partial.display())))?;
    let bar = bytes_bar(header.size_bytes, "downloading");
    let received = receive(
        &mut stream,
        BufWriter::new(file),
        &header,
        timeout,
        &bar,
        &partial,
        bad,
    )
    .await;
    bar.finish_and_clear();
    if let Err(e) = received {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, &path).map_err(|e| {
        let _ = std::fs::remove_file(&partial);
        Failure::Failed(format!("{}: {e}", path.display()))
    })?;
    out!(
        "wrote {} ({} bytes, sha256 {})",
        path.display(),
        header.size_bytes,
        header.sha256
    );
    Ok(ExitCode::SUCCESS)
}

/// The chunks and trailer of a download, written to `out` and checked.
async fn receive(
    stream: &mut tonic::Streaming<pb::DownloadCheckpointResponse>,
    mut out: BufWriter<File>,
    header: &pb::CheckpointHeader,
    timeout: Duration,
    bar: &ProgressBar,
    partial: &Path,
    bad: impl Fn(String) -> Failure,
) -> Result<(), Failure> {
    use pb::download_checkpoint_response::Part;
    let io = |e: std::io::Error| Failure::Failed(format!("{}: {e}", partial.display()));
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut trailer = None;
    while let Some(message) = within(timeout, stream.message()).await? {
        match message.part {
            Some(Part::Chunk(chunk)) => {
                if trailer.is_some() {
                    return Err(bad("a chunk after the trailer".into()));
                }
                received += chunk.len() as u64;
                if received > header.size_bytes {
                    return Err(bad(format!(
                        "more than the {} bytes the header declared",
                        header.size_bytes
                    )));
                }
                hasher.update(&chunk);
                out.write_all(&chunk).map_err(io)?;
                bar.set_position(received);
            }
            Some(Part::Trailer(t)) => trailer = Some(t),
            Some(Part::Header(_)) => return Err(bad("a second header".into())),
            None => return Err(bad("an empty message".into())),
        }
    }
    let trailer = trailer.ok_or_else(|| bad("the stream ended before the trailer".into()))?;
    if received != header.size_bytes {
        return Err(bad(format!(
            "received {received} bytes, the header declared {}",
            header.size_bytes
        )));
    }
    let actual = hex(&hasher.finalize());
    if actual != header.sha256 || actual != trailer.sha256 {
        return Err(bad(format!(
            "the bytes hash to {actual}; the header says {}, the trailer {}",
            header.sha256, trailer.sha256
        )));
    }
    out.into_inner()
        .map_err(|e| io(e.into_error()))?
        .sync_all()
        .map_err(io)
}

/// Size and lowercase hex SHA-256 of a file, read in chunks.
fn size_and_sha256(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; CHUNK_BYTES];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buffer[..n]);
    }
    Ok((size, hex(&hasher.finalize())))
}

/// The upload's chunks, read from the file as the transport asks for them;
/// records progress and the first read error.
struct FileChunks {
    file: File,
    sent: u64,
    size: u64,
    bar: ProgressBar,
    last_progress: Arc<Mutex<Instant>>,
    error: Arc<Mutex<Option<String>>>,
}

impl Iterator for FileChunks {
    type Item = pb::UploadCheckpointRequest;

    fn next(&mut self) -> Option<Self::Item> {
        if self.sent >= self.size {
            return None;
        }
        let want = (self.size - self.sent).min(CHUNK_BYTES as u64) as usize;
        let mut buffer = vec![0u8; want];
        let mut filled = 0;
        let failure = loop {
            match self.file.read(&mut buffer[filled..]) {
                Ok(0) => break (filled == 0).then(|| "the file shrank while uploading".into()),
                Ok(n) => {
                    filled += n;
                    if filled == want {
                        break None;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Some(e.to_string()),
            }
        };
        if let Some(reason) = failure {
            *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
            return None;
        }
        buffer.truncate(filled);
        self.sent += filled as u64;
        self.bar.set_position(self.sent);
        *self.last_progress.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        Some(pb::UploadCheckpointRequest {
            part: Some(pb::upload_checkpoint_request::Part::Chunk(buffer)),
        })
    }
}

/// `call`, failing once nothing has progressed for `limit` (progress being
/// the time in `last_progress`).
async fn idle_limited<T>(
    call: impl Future<Output = Result<T, tonic::Status>>,
    last_progress: &Mutex<Instant>,
    limit: Duration,
) -> Result<T, Failure> {
    let mut call = std::pin::pin!(call);
    loop {
        let idle = last_progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed();
        if idle >= limit {
            return Err(Failure::Failed(format!(
                "no progress for {} (see --timeout)",
                humantime::format_duration(limit)
            )));
        }
        tokio::select! {
            result = &mut call => return result.map_err(Failure::from),
            () = tokio::time::sleep(limit - idle) => {}
        }
    }
}

/// The UploadHeader the flags describe, without size and digest.
fn upload_header(args: &UploadArgs) -> Result<pb::UploadHeader, Failure> {
    if args.architecture.trim().is_empty() {
        return Err(Failure::Usage("--architecture: required".into()));
    }
    let features: std::collections::HashMap<String, pb::FeatureValue> =
        named_values("feature", &args.features)?
            .into_iter()
            .map(|(name, values)| (name, pb::FeatureValue { values }))
            .collect();
    let mut metrics = std::collections::HashMap::new();
    for (name, values) in named_values("metric", &args.metrics)? {
        match values.as_slice() {
            [value] => {
                metrics.insert(name, *value);
            }
            _ => {
                return Err(Failure::Usage(format!(
                    "--metric {name}: expected one value"
                )));
            }
        }
    }
    let training_config_json =
        json_object_flag("training-config", args.training_config.as_deref())?;
    let task = (!features.is_empty() || args.num_classes > 0).then(|| pb::TaskDescriptor {
        architecture: args.architecture.clone(),
        features,
        embedding: Vec::new(),
        support: None,
        num_classes: args.num_classes,
    });
    Ok(pb::UploadHeader {
        architecture: args.architecture.clone(),
        family: args.family.clone().unwrap_or_default(),
        task,
        metrics,
        seed: args.seed,
        training_config_json,
        size_bytes: 0,
        sha256: String::new(),
        filename: args
            .file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    })
}

async fn upload(addr: &str, timeout: Duration, args: UploadArgs) -> Result<ExitCode, Failure> {
    let mut header = upload_header(&args)?;
    let path = &args.file;
    let local = |e: std::io::Error| Failure::Failed(format!("{}: {e}", path.display()));
    let (size, sha256) = size_and_sha256(path).map_err(local)?;
    if size == 0 {
        return Err(Failure::Failed(format!(
            "{}: the file is empty",
            path.display()
        )));
    }
    header.size_bytes = size;
    header.sha256 = sha256;
    let file = File::open(path).map_err(local)?;
    // No per-call limit on the channel: the upload may take longer than
    // --timeout; instead it fails when nothing moves for that long.
    let mut catalog = catalog_client(addr, None).await?;
    let bar = bytes_bar(size, "uploading");
    let last_progress = Arc::new(Mutex::new(Instant::now()));
    let read_error = Arc::new(Mutex::new(None));
    let chunks = FileChunks {
        file,
        sent: 0,
        size,
        bar: bar.clone(),
        last_progress: last_progress.clone(),
        error: read_error.clone(),
    };
    let first = pb::UploadCheckpointRequest {
        part: Some(pb::upload_checkpoint_request::Part::Header(header.clone())),
    };
    let requests = tokio_stream::iter(std::iter::once(first).chain(chunks));
    let result = idle_limited(catalog.upload_checkpoint(requests), &last_progress, timeout).await;
    bar.finish_and_clear();
    if let Some(reason) = read_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(Failure::Failed(format!("{}: {reason}", path.display())));
    }
    let response = result?.into_inner();
    let model = response
        .model
        .ok_or_else(|| Failure::Failed("the server's answer names no model".into()))?;
    if args.json {
        let mut value = zoo_model_json(&model);
        if let Value::Object(fields) = &mut value {
            fields.insert("deduplicated".into(), response.deduplicated.into());
        }
        print_json(&value);
    } else if response.deduplicated {
        out!(
            "{} is already stored as {} ({}, {} bytes, sha256 {})",
            path.display(),
            model.id,
            model.architecture,
            model.size_bytes,
            model.sha256
        );
    } else {
        out!(
            "uploaded {} as {} ({}, {} bytes, sha256 {})",
            path.display(),
            model.id,
            model.architecture,
            model.size_bytes,
            model.sha256
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_paths_stay_local() {
        assert_eq!(
            partial_path(Path::new("out/a.safetensors")),
            PathBuf::from("out/a.safetensors.part")
        );
        assert_eq!(
            download_path(None, "../../etc/x.safetensors", "m"),
            PathBuf::from("x.safetensors")
        );
    }
}
