//! Logging set-up shared by the binaries: tracing with text or JSON output.

use std::io::IsTerminal;

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Logging flags shared by every binary.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log format: "text" for people, "json" for log collectors.
    #[arg(long, env = "WEIGHTGEN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter in tracing's EnvFilter syntax, e.g. "info" or
    /// "weightgen=debug,tower=warn".
    #[arg(long, env = "WEIGHTGEN_LOG", default_value = "info")]
    pub log_filter: String,
}

/// Installs the global tracing subscriber (to stderr). Fails when the filter
/// does not parse or a subscriber is already installed.
pub fn init(args: &LogArgs) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&args.log_filter)
        .map_err(|e| anyhow::anyhow!("invalid --log-filter {:?}: {e}", args.log_filter))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))
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
