//! Helpers the catalog (`architectures`, `models`, `denoisers`) and `jobs`
//! commands share: failures and their exit status, paging, aligned tables,
//! progress bars, JSON output.

use std::future::Future;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use weightgen::client::{self, ClientError};
use weightgen::proto::v1 as pb;

use pb::catalog_service_client::CatalogServiceClient;

/// `println!` that ignores a closed stdout (output piped into `head`, say)
/// instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}
pub(crate) use out;

/// The flags every `list` command shares.
#[derive(clap::Args)]
pub struct ListOptions {
    /// Most items to list; 0 lists them all.
    #[arg(long, default_value_t = 100)]
    pub limit: u64,
    /// Print JSON objects, one per line (proto field names).
    #[arg(long)]
    pub json: bool,
}

/// The arguments every `get` command shares.
#[derive(clap::Args)]
pub struct GetArgs {
    /// Id of the model, denoiser or job.
    pub id: String,
    /// Print it as one JSON object (proto field names).
    #[arg(long)]
    pub json: bool,
}

/// Largest page asked of the server (its maximum).
const MAX_PAGE: u32 = 1000;

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

pub fn metrics_json(metrics: &std::collections::HashMap<String, f64>) -> Value {
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
pub fn bytes_bar(total: u64, message: &str) -> ProgressBar {
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
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// NAME=V1,V2,… flags as a map (errors name the flag).
pub fn named_values(flag: &str, args: &[String]) -> Result<Vec<(String, Vec<f64>)>, Failure> {
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

/// A `--FLAG JSON` value that must be a JSON object, compacted; empty when
/// the flag is absent.
pub fn json_object_flag(flag: &str, text: Option<&str>) -> Result<String, Failure> {
    let Some(text) = text else {
        return Ok(String::new());
    };
    let value: Value =
        serde_json::from_str(text).map_err(|e| Failure::Usage(format!("--{flag}: {e}")))?;
    if !value.is_object() {
        return Err(Failure::Usage(format!("--{flag}: must be a JSON object")));
    }
    Ok(value.to_string())
}

pub async fn catalog_client(
    addr: &str,
    timeout: Option<Duration>,
) -> Result<CatalogServiceClient<client::Connection>, Failure> {
    Ok(CatalogServiceClient::new(
        crate::connect(addr, timeout).await?,
    ))
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
