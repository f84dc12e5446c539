//! Logging and tracing set-up shared by the binaries: tracing with text or
//! JSON output, and, when an OTLP endpoint is configured, every span
//! exported to it as OpenTelemetry traces (W3C trace context in, OTLP/gRPC
//! out).

use std::io::IsTerminal;
use std::time::Duration;

use clap::ValueEnum;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// How long exporting one batch of spans may take, and at most how long the
/// spans still buffered at exit may hold the process.
pub const OTLP_EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Logging and trace-export flags shared by the server and the worker.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log format: "text" for people, "json" for log collectors.
    #[arg(long, env = "WEIGHTGEN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter in tracing's EnvFilter syntax, e.g. "info" or
    /// "weightgen=debug,tower=warn".
    #[arg(long, env = "WEIGHTGEN_LOG", default_value = "info")]
    pub log_filter: String,
    /// OpenTelemetry collector to export traces to over OTLP/gRPC, e.g.
    /// "http://otel-collector:4317". Unset: no traces leave the process.
    /// A call's W3C `traceparent` metadata is continued either way.
    #[arg(long, env = "WEIGHTGEN_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// What [`init`] installed that must outlive the work: the trace exporter.
/// Dropping it exports the spans still buffered (within
/// [`OTLP_EXPORT_TIMEOUT`]); keep it in `main` until the end.
#[must_use = "dropping it stops the trace export"]
pub struct Telemetry {
    export: Option<TraceExport>,
}

/// The OTLP pipeline: the tracer provider and the runtime its gRPC client
/// runs on (its own, so that export works from synchronous commands and
/// outlives the service's runtime until the last batch is sent).
struct TraceExport {
    provider: SdkTracerProvider,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(mut export) = self.export.take() {
            if let Err(e) = export.provider.shutdown_with_timeout(OTLP_EXPORT_TIMEOUT) {
                eprintln!("exporting the last traces: {e}");
            }
            if let Some(runtime) = export.runtime.take() {
                runtime.shutdown_timeout(Duration::from_secs(1));
            }
        }
    }
}

/// Installs the global tracing subscriber (to stderr) and, with
/// `--otlp-endpoint`, the OTLP exporter naming this process `service_name`.
/// Also installs the W3C trace-context propagator. Fails when the filter or
/// the endpoint does not parse or a subscriber is already installed.
pub fn init(args: &LogArgs, service_name: &'static str) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_new(&args.log_filter)
        .map_err(|e| anyhow::anyhow!("invalid --log-filter {:?}: {e}", args.log_filter))?;
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let export = args
        .otlp_endpoint
        .as_deref()
        .map(|endpoint| trace_export(endpoint, service_name))
        .transpose()?;
    let otel = export.as_ref().map(|e| {
        tracing_opentelemetry::layer().with_tracer(e.provider.tracer(env!("CARGO_PKG_NAME")))
    });
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let fmt = match args.log_format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))?;
    Ok(Telemetry { export })
}

/// The OTLP/gRPC span exporter for `endpoint`, batching on its own thread.
fn trace_export(endpoint: &str, service_name: &'static str) -> anyhow::Result<TraceExport> {
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e| anyhow::anyhow!("invalid --otlp-endpoint {endpoint:?}: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        anyhow::bail!(
            "invalid --otlp-endpoint {endpoint:?}: expected http://HOST:PORT or https://HOST:PORT"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("weightgen-otlp")
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the trace exporter's runtime: {e}"))?;
    let exporter = {
        let _entered = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(OTLP_EXPORT_TIMEOUT)
            .build()
            .map_err(|e| anyhow::anyhow!("--otlp-endpoint {endpoint:?}: {e}"))?
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name)
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    Ok(TraceExport {
        provider,
        runtime: Some(runtime),
    })
}

/// An error and its causes, "a: b: c", each cause once: tonic's transport
/// errors say only "transport error" at the top, while the crate's own
/// errors already end with their source's text ("catalog database: …").
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}
