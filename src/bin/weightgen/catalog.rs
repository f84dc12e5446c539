//! `weightgen architectures`, `weightgen models …` and `weightgen denoisers …`:
//! the server's CatalogService from the command line. Also the helpers the
//! `jobs` commands share: failures and their exit status, paging, aligned
//! tables, progress bars, JSON output.

use std::fs::File;
use std::future::Future;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use clap::{Args, Subcommand};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use weightgen::client::{self, ClientError};
use weightgen::proto::v1 as pb;

use pb::catalog_service_client::CatalogServiceClient;
use pb::download_checkpoint_request::Target;

/// `println!` that ignores a closed stdout (output piped into `head`, say)
/// instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}
pub(crate) use out;

/// Largest chunk of a checkpoint per upload message (the server's limit).
const CHUNK_BYTES: usize = 1 << 20;
/// Largest page asked of the server (its maximum).
const MAX_PAGE: u32 = 1000;

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

/// Why a command failed, and so its exit status.
#[derive(Debug)]
pub enum Failure {
    /// A flag value refused before any call (exit 2).
    Usage(String),
    /// A call, a transfer or a local file failed (exit 1).
    Failed(String),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Self::Failed(e.to_string())
    }
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        ClientError::Rpc(status).into()
    }
}

/// The exit status of a command's result; a failure is printed as
/// `weightgen: COMMAND: …` on stderr.
pub fn exit_code(command: &str, result: Result<ExitCode, Failure>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(Failure::Usage(message)) => {
            eprintln!("weightgen: {command}: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Failed(message)) => {
            eprintln!("weightgen: {command}: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `future`, failing when it takes longer than `limit`.
pub async fn within<T>(
    limit: Duration,
    future: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(limit, future).await {
        Ok(result) => result.map_err(Failure::from),
        Err(_) => Err(Failure::Failed(format!(
            "no answer within {} (see --timeout)",
            humantime::format_duration(limit)
        ))),
    }
}

/// Follows `next_page_token` until `limit` items (0 = all) or the last page.
/// `fetch` returns one page's items, its next token and, where the call
/// reports one, the total number of matches; the last total seen comes back.
pub async fn collect_pages<T, F, Fut>(
    limit: u64,
    mut fetch: F,
) -> Result<(Vec<T>, Option<u64>), Failure>
where
    F: FnMut(pb::PageRequest) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, String, Option<u64>), tonic::Status>>,
{
    let mut items = Vec::new();
    let mut token = String::new();
    let mut total = None;
    loop {
        let page_size = if limit == 0 {
            MAX_PAGE
        } else {
            (limit - items.len() as u64).min(u64::from(MAX_PAGE)) as u32
        };
        let (page, next, page_total) = fetch(pb::PageRequest {
            page_size,
            page_token: token.clone(),
        })
        .await?;
        total = page_total.or(total);
        items.extend(page);
        if limit > 0 && items.len() as u64 >= limit {
            items.truncate(limit as usize);
            break;
        }
        if next.is_empty() {
            break;
        }
        if next == token {
            return Err(Failure::Failed(format!(
                "the server returned page token {next:?} twice"
            )));
        }
        token = next;
    }
    Ok((items, total))
}

/// Prints `rows` under `header`, each column padded to its widest cell.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (cell, width) in cells.iter().zip(&widths) {
            text.push_str(&format!("{cell:<width$}  "));
        }
        out!("{}", text.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Prints `key: value` lines with the keys aligned.
pub fn print_fields(fields: &[(&str, String)]) {
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    for (key, value) in fields {
        out!("{:<width$} {value}", format!("{key}:"));
    }
}

/// Prints one JSON value on one line.
pub fn print_json(value: &Value) {
    out!("{value}");
}

/// A proto enum's name without its prefix, in lowercase: "JOB_STATE_QUEUED"
/// with prefix "JOB_STATE_" is "queued".
pub fn short_name(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

fn system_time(t: &prost_types::Timestamp) -> Option<SystemTime> {
    let seconds = u64::try_from(t.seconds).ok()?;
    let nanos = u32::try_from(t.nanos).ok()?.min(999_999_999);
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(seconds, nanos))
}

/// A timestamp as RFC 3339 in UTC to the second, or "-".
pub fn time_text(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(system_time).map_or_else(
        || "-".to_owned(),
        |t| humantime::format_rfc3339_seconds(t).to_string(),
    )
}

/// A timestamp as an RFC 3339 JSON string, or null.
pub fn time_json(t: Option<&prost_types::Timestamp>) -> Value {
    t.and_then(system_time).map_or(Value::Null, |t| {
        Value::String(humantime::format_rfc3339_millis(t).to_string())
    })
}

/// A number for a table: up to 4 decimals, trailing zeros dropped.
pub fn number_text(x: f64) -> String {
    if x != 0.0 && (x.abs() < 1e-3 || x.abs() >= 1e7) {
        let text = format!("{x:.3e}");
        return match text.split_once('e') {
            Some((mantissa, exponent)) => format!(
                "{}e{exponent}",
                mantissa.trim_end_matches('0').trim_end_matches('.')
            ),
            None => text,
        };
    }
    let text = format!("{x:.4}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" { "0" } else { text }.to_owned()
}

/// Prints "metrics:" and one aligned "name  value" line per metric, or
/// "metrics: -".
pub fn print_metrics(metrics: &std::collections::HashMap<String, f64>) {
    if metrics.is_empty() {
        out!("metrics: -");
        return;
    }
    let mut names: Vec<&String> = metrics.keys().collect();
    names.sort();
    let width = names.iter().map(|n| n.len()).max().unwrap_or(0);
    out!("metrics:");
    for name in names {
        out!("  {name:<width$}  {}", number_text(metrics[name]));
    }
}

/// Metrics as "name=value" pairs sorted by name.
pub fn metrics_text(metrics: &std::collections::HashMap<String, f64>) -> String {
    let mut names: Vec<&String> = metrics.keys().collect();
    names.sort();
    let pairs: Vec<String> = names
        .into_iter()
        .map(|k| format!("{k}={}", number_text(metrics[k])))
        .collect();
    if pairs.is_empty() {
        "-".to_owned()
    } else {
        pairs.join(" ")
    }
}

fn metrics_json(metrics: &std::collections::HashMap<String, f64>) -> Value {
    let sorted: std::collections::BTreeMap<&String, &f64> = metrics.iter().collect();
    json!(sorted)
}

/// Whether progress is drawn (stderr is a terminal).
pub fn on_terminal() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
}

/// A spinner with a message on a terminal, hidden otherwise.
pub fn spinner(message: String) -> ProgressBar {
    let bar = if on_terminal() {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// A progress bar in bytes on a terminal, hidden otherwise.
fn bytes_bar(total: u64, message: &str) -> ProgressBar {
    let bar = if on_terminal() {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(message.to_owned());
    bar
}

/// Lowercase hex of a digest.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// NAME=V1,V2,… flags as a map (errors name the flag).
fn named_values(flag: &str, args: &[String]) -> Result<Vec<(String, Vec<f64>)>, Failure> {
    args.iter()
        .map(|arg| {
            let (name, values) = arg
                .split_once('=')
                .filter(|(name, _)| !name.is_empty())
                .ok_or_else(|| {
                    Failure::Usage(format!("--{flag} {arg:?}: expected NAME=VALUE[,VALUE…]"))
                })?;
            let values = values
                .split(',')
                .map(|v| v.trim().parse::<f64>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Failure::Usage(format!("--{flag} {name}: {e}")))?;
            if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
                return Err(Failure::Usage(format!(
                    "--{flag} {name}: {bad} is not a finite number"
                )));
            }
            Ok((name.to_owned(), values))
        })
        .collect()
}

async fn catalog_client(
    addr: &str,
    timeout: Option<Duration>,
) -> Result<CatalogServiceClient<Channel>, Failure> {
    Ok(CatalogServiceClient::new(
        client::connect(addr, timeout).await?,
    ))
}

// ---------------------------------------------------------------------------
// JSON forms (proto field names, enums by name, timestamps in RFC 3339)
// ---------------------------------------------------------------------------

fn architecture_json(a: &pb::ArchitectureSpec) -> Value {
    json!({
        "name": a.name,
        "family": a.family,
        "num_parameters": a.num_parameters,
        "tensors": a.tensors.iter().map(|t| json!({
            "name": t.name,
            "shape": t.shape,
            "dtype": pb::DType::try_from(t.dtype).map_or("DTYPE_UNSPECIFIED", |d| d.as_str_name()),
            "layer": t.layer,
        })).collect::<Vec<_>>(),
        "layers": a.layers.iter().map(|l| json!({
            "name": l.name,
            "kind": l.kind,
            "tensors": l.tensors,
        })).collect::<Vec<_>>(),
    })
}

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

fn schema_json(s: &pb::FeatureSchema) -> Value {
    json!({
        "features": s.features.iter().map(|f| json!({
            "name": f.name,
            "description": f.description,
            "length": f.length,
            "min": f.min,
            "max": f.max,
            "required": f.required,
        })).collect::<Vec<_>>(),
        "embedding_dim": s.embedding_dim,
        "support": s.support.as_ref().map_or(Value::Null, |s| json!({
            "input_shape": s.input_shape,
            "target_shape": s.target_shape,
            "classification": s.classification,
            "min_examples": s.min_examples,
            "max_examples": s.max_examples,
            "required": s.required,
        })),
    })
}

fn sampler_name(sampler: i32) -> String {
    pb::Sampler::try_from(sampler).map_or_else(
        |_| format!("unknown({sampler})"),
        |s| short_name(s.as_str_name(), "SAMPLER_"),
    )
}

fn denoiser_json(d: &pb::DenoiserInfo) -> Value {
    json!({
        "id": d.id,
        "version": d.version,
        "architecture": d.architecture,
        "active": d.active,
        "feature_schema": d.feature_schema.as_ref().map_or(Value::Null, schema_json),
        "timesteps": d.timesteps,
        "schedule": d.schedule,
        "kind": d.kind,
        "latent_dim": d.latent_dim,
        "default_sampler": pb::Sampler::try_from(d.default_sampler)
            .map_or_else(|_| json!(d.default_sampler), |s| json!(s.as_str_name())),
        "default_steps": d.default_steps,
        "metrics": metrics_json(&d.metrics),
        "zoo_models": d.zoo_models,
        "config_json": d.config_json,
        "sha256": d.sha256,
        "size_bytes": d.size_bytes,
        "created_at": time_json(d.created_at.as_ref()),
    })
}

fn short_sha(sha: &str) -> String {
    sha.chars().take(12).collect()
}

// ---------------------------------------------------------------------------
// weightgen architectures
// ---------------------------------------------------------------------------

#[derive(Args)]
pub struct ArchitecturesArgs {
    /// Only the architectures of this task family, e.g. "digits".
    #[arg(long)]
    family: Option<String>,
    /// Print one JSON object per architecture and line, with its tensors and
    /// layers (proto field names).
    #[arg(long)]
    json: bool,
}

/// `weightgen architectures`.
pub async fn architectures(addr: &str, timeout: Duration, args: ArchitecturesArgs) -> ExitCode {
    exit_code(
        "architectures",
        list_architectures(addr, timeout, args).await,
    )
}

async fn list_architectures(
    addr: &str,
    timeout: Duration,
    args: ArchitecturesArgs,
) -> Result<ExitCode, Failure> {
    let mut catalog = catalog_client(addr, Some(timeout)).await?;
    let archs = catalog
        .list_architectures(pb::ListArchitecturesRequest {
            family: args.family.unwrap_or_default(),
        })
        .await?
        .into_inner()
        .architectures;
    if args.json {
        archs
            .iter()
            .map(architecture_json)
            .for_each(|a| print_json(&a));
    } else if archs.is_empty() {
        eprintln!("no architectures registered");
    } else {
        let rows: Vec<Vec<String>> = archs
            .iter()
            .map(|a| {
                vec![
                    a.name.clone(),
                    if a.family.is_empty() {
                        "-".into()
                    } else {
                        a.family.clone()
                    },
                    a.num_parameters.to_string(),
                    a.tensors.len().to_string(),
                    a.layers.len().to_string(),
                ]
            })
            .collect();
        print_table(
            &["NAME", "FAMILY", "PARAMETERS", "TENSORS", "LAYERS"],
            &rows,
        );
    }
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------
// weightgen models
// ---------------------------------------------------------------------------

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
        /// Most models to list; 0 lists them all.
        #[arg(long, default_value_t = 100)]
        limit: u64,
        /// Print one JSON object per model and line (proto field names).
        #[arg(long)]
        json: bool,
    },
    /// Describe one zoo model: architecture, task, seed, metrics, training
    /// configuration, size and SHA-256.
    Get {
        /// Zoo model id.
        id: String,
        /// Print the model as one JSON object (proto field names).
        #[arg(long)]
        json: bool,
    },
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
    id: String,
    /// Output file (default: the file name the server suggests, in the
    /// current directory). Written as FILE.part, renamed once checked.
    #[arg(short, long)]
    output: Option<PathBuf>,
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
            limit,
            json,
        } => (
            "models list",
            list_models(addr, timeout, architecture, family, limit, json).await,
        ),
        ModelsCommand::Get { id, json } => ("models get", get_model(addr, timeout, id, json).await),
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
    limit: u64,
    json: bool,
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
async fn download(
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
    let training_config_json = match &args.training_config {
        None => String::new(),
        Some(text) => {
            let value: Value = serde_json::from_str(text)
                .map_err(|e| Failure::Usage(format!("--training-config: {e}")))?;
            if !value.is_object() {
                return Err(Failure::Usage(
                    "--training-config: must be a JSON object".into(),
                ));
            }
            value.to_string()
        }
    };
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

// ---------------------------------------------------------------------------
// weightgen denoisers
// ---------------------------------------------------------------------------

#[derive(Subcommand)]
pub enum DenoisersCommand {
    /// List denoiser versions, newest first, following every page up to
    /// --limit; "*" marks the active one of each architecture.
    List {
        /// Only denoisers of this architecture.
        #[arg(long)]
        architecture: Option<String>,
        /// Most denoisers to list; 0 lists them all.
        #[arg(long, default_value_t = 100)]
        limit: u64,
        /// Print one JSON object per denoiser and line (proto field names).
        #[arg(long)]
        json: bool,
    },
    /// Describe one denoiser version: architecture, variant, schedule,
    /// feature schema, metrics, checksum.
    Get {
        /// Denoiser id.
        id: String,
        /// Print the denoiser as one JSON object (proto field names).
        #[arg(long)]
        json: bool,
    },
    /// Download a denoiser's checkpoint file; its size and SHA-256 are
    /// checked against what the server reports before the file is written.
    Download(DownloadArgs),
    /// Make a denoiser version the active one for its architecture (also to
    /// roll back); running servers swap it in without a restart.
    Activate {
        /// Denoiser id.
        id: String,
    },
}

/// `weightgen denoisers …`.
pub async fn denoisers(addr: &str, timeout: Duration, command: DenoisersCommand) -> ExitCode {
    let (name, result) = match command {
        DenoisersCommand::List {
            architecture,
            limit,
            json,
        } => (
            "denoisers list",
            list_denoisers(addr, timeout, architecture, limit, json).await,
        ),
        DenoisersCommand::Get { id, json } => {
            ("denoisers get", get_denoiser(addr, timeout, id, json).await)
        }
        DenoisersCommand::Download(args) => (
            "denoisers download",
            download(addr, timeout, Target::DenoiserId(args.id), args.output).await,
        ),
        DenoisersCommand::Activate { id } => (
            "denoisers activate",
            activate_denoiser(addr, timeout, id).await,
        ),
    };
    exit_code(name, result)
}

async fn list_denoisers(
    addr: &str,
    timeout: Duration,
    architecture: Option<String>,
    limit: u64,
    json: bool,
) -> Result<ExitCode, Failure> {
    let catalog = catalog_client(addr, Some(timeout)).await?;
    let (denoisers, _) = collect_pages(limit, |page| {
        let mut catalog = catalog.clone();
        let request = pb::ListDenoisersRequest {
            architecture: architecture.clone().unwrap_or_default(),
            page: Some(page),
        };
        async move {
            let r = catalog.list_denoisers(request).await?.into_inner();
            Ok((r.denoisers, r.next_page_token, None))
        }
    })
    .await?;
    if json {
        denoisers
            .iter()
            .map(denoiser_json)
            .for_each(|d| print_json(&d));
        return Ok(ExitCode::SUCCESS);
    }
    if denoisers.is_empty() {
        eprintln!("no denoisers");
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = denoisers
        .iter()
        .map(|d| {
            vec![
                if d.active { "*" } else { "" }.to_owned(),
                d.id.clone(),
                format!("v{}", d.version),
                d.architecture.clone(),
                d.kind.clone(),
                d.zoo_models.to_string(),
                HumanBytes(d.size_bytes).to_string(),
                time_text(d.created_at.as_ref()),
            ]
        })
        .collect();
    print_table(
        &[
            "",
            "ID",
            "VERSION",
            "ARCHITECTURE",
            "KIND",
            "ZOO MODELS",
            "SIZE",
            "CREATED",
        ],
        &rows,
    );
    Ok(ExitCode::SUCCESS)
}

fn schema_text(schema: &pb::FeatureSchema) -> String {
    let mut parts: Vec<String> = schema
        .features
        .iter()
        .map(|f| {
            format!(
                "{}[{}]{} in [{}, {}]",
                f.name,
                f.length,
                if f.required { "" } else { "?" },
                number_text(f.min),
                number_text(f.max)
            )
        })
        .collect();
    if schema.embedding_dim > 0 {
        parts.push(format!("embedding[{}]", schema.embedding_dim));
    }
    if let Some(s) = &schema.support {
        parts.push(format!(
            "support {}-{} × {:?}{}",
            s.min_examples,
            s.max_examples,
            s.input_shape,
            if s.required { "" } else { "?" }
        ));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

fn print_denoiser(d: &pb::DenoiserInfo) {
    print_fields(&[
        ("id", d.id.clone()),
        ("version", d.version.to_string()),
        ("architecture", d.architecture.clone()),
        ("active", d.active.to_string()),
        ("kind", d.kind.clone()),
        (
            "diffusion",
            format!(
                "T={}, {} schedule, latent dim {}",
                d.timesteps,
                if d.schedule.is_empty() {
                    "unknown"
                } else {
                    &d.schedule
                },
                d.latent_dim
            ),
        ),
        (
            "sampling default",
            format!(
                "{} {} steps",
                sampler_name(d.default_sampler),
                d.default_steps
            ),
        ),
        (
            "features",
            d.feature_schema
                .as_ref()
                .map_or_else(|| "-".into(), schema_text),
        ),
        ("zoo models", d.zoo_models.to_string()),
        (
            "size",
            format!("{} ({} bytes)", HumanBytes(d.size_bytes), d.size_bytes),
        ),
        ("sha256", d.sha256.clone()),
        ("created", time_text(d.created_at.as_ref())),
    ]);
    print_metrics(&d.metrics);
}

async fn get_denoiser(
    addr: &str,
    timeout: Duration,
    id: String,
    json: bool,
) -> Result<ExitCode, Failure> {
    let mut catalog = catalog_client(addr, Some(timeout)).await?;
    let d = catalog
        .get_denoiser(pb::GetDenoiserRequest { id })
        .await?
        .into_inner();
    if json {
        print_json(&denoiser_json(&d));
    } else {
        print_denoiser(&d);
    }
    Ok(ExitCode::SUCCESS)
}

async fn activate_denoiser(addr: &str, timeout: Duration, id: String) -> Result<ExitCode, Failure> {
    let mut catalog = catalog_client(addr, Some(timeout)).await?;
    let d = catalog
        .activate_denoiser(pb::ActivateDenoiserRequest { id })
        .await?
        .into_inner();
    out!("activated {} (v{}) for {}", d.id, d.version, d.architecture);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_names_read_well() {
        assert_eq!(number_text(0.93), "0.93");
        assert_eq!(number_text(2.0), "2");
        assert_eq!(number_text(1e-5), "1e-5");
        assert_eq!(number_text(1.25e-4), "1.25e-4");
        assert_eq!(short_name("JOB_STATE_QUEUED", "JOB_STATE_"), "queued");
        assert_eq!(
            partial_path(Path::new("out/a.safetensors")),
            PathBuf::from("out/a.safetensors.part")
        );
        assert_eq!(
            download_path(None, "../../etc/x.safetensors", "m"),
            PathBuf::from("x.safetensors")
        );
    }

    #[test]
    fn named_values_refuse_malformed_flags() {
        assert!(matches!(
            named_values("metric", &["acc".into()]),
            Err(Failure::Usage(_))
        ));
        assert!(matches!(
            named_values("metric", &["acc=x".into()]),
            Err(Failure::Usage(_))
        ));
        assert_eq!(
            named_values("feature", &["m=1,2".into()]).ok(),
            Some(vec![("m".to_owned(), vec![1.0, 2.0])])
        );
    }
}
