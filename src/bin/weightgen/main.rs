//! `weightgen`: the command-line client.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use weightgen::client;

mod architectures;
mod compare;
mod denoisers;
mod doctor;
mod generate;
mod jobs;
mod models;
mod output;
mod task;
mod zoo;

use compare::{CompareArgs, compare};
use generate::{GenerateArgs, generate};
use task::{TaskArgs, task};
use zoo::{ZooCommand, zoo};

/// Talks to a weightgen server.
#[derive(Parser)]
#[command(name = "weightgen", version)]
struct Cli {
    /// Server address, "host:port", "http://host:port" or "https://host:port".
    #[arg(
        long,
        env = "WEIGHTGEN_ADDR",
        default_value = "127.0.0.1:50051",
        global = true
    )]
    addr: String,
    /// Time limit for each call, e.g. "30s".
    #[arg(long, env = "WEIGHTGEN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration, global = true)]
    timeout: Duration,
    /// Bearer token sent with every call (servers started with
    /// --auth-tokens); prefer the environment variable to keep it out of
    /// the process list.
    #[arg(long, env = "WEIGHTGEN_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// W3C trace context (00-TRACE_ID-PARENT_ID-FLAGS) sent with every
    /// call, so the server's spans join the caller's trace; TRACEPARENT is
    /// the variable OpenTelemetry uses to hand a trace to a child process.
    #[arg(long, env = "TRACEPARENT", global = true)]
    traceparent: Option<String>,
    #[command(flatten)]
    tls: TlsFlags,
    #[command(subcommand)]
    command: Command,
}

/// TLS towards the server (an "https://" address alone uses the system's roots).
#[derive(clap::Args, Default)]
struct TlsFlags {
    /// PEM CA bundle the server's certificate must chain to; turns TLS on.
    #[arg(long, env = "WEIGHTGEN_TLS_CA", global = true)]
    tls_ca: Option<std::path::PathBuf>,
    /// PEM client certificate for servers that require one (mutual TLS);
    /// turns TLS on.
    #[arg(
        long,
        env = "WEIGHTGEN_TLS_CLIENT_CERT",
        requires = "tls_client_key",
        global = true
    )]
    tls_client_cert: Option<std::path::PathBuf>,
    /// PEM private key of --tls-client-cert.
    #[arg(
        long,
        env = "WEIGHTGEN_TLS_CLIENT_KEY",
        requires = "tls_client_cert",
        global = true
    )]
    tls_client_key: Option<std::path::PathBuf>,
    /// Name the server's certificate must carry, when it is not the
    /// address's host (e.g. connecting by IP); turns TLS on.
    #[arg(long, env = "WEIGHTGEN_TLS_DOMAIN", global = true)]
    tls_domain: Option<String>,
}

impl TlsFlags {
    fn settings(self) -> Option<client::ClientTls> {
        let identity = self.tls_client_cert.zip(self.tls_client_key);
        (self.tls_ca.is_some() || identity.is_some() || self.tls_domain.is_some()).then_some(
            client::ClientTls {
                ca: self.tls_ca,
                identity,
                domain: self.tls_domain,
            },
        )
    }
}

/// How this invocation reaches servers, set once at start: the address
/// is per call.
static TARGET: std::sync::OnceLock<client::Target> = std::sync::OnceLock::new();

/// The server at `addr` with this invocation's TLS settings, token and
/// trace context.
fn target(addr: &str) -> client::Target {
    client::Target {
        addr: addr.to_owned(),
        ..TARGET.get().cloned().unwrap_or_default()
    }
}

/// Connects to `addr` with this invocation's TLS settings, sending its
/// token with every call.
pub async fn connect(
    addr: &str,
    timeout: Option<Duration>,
) -> Result<client::Connection, client::ClientError> {
    target(addr).connect(timeout).await
}

#[derive(Subcommand)]
enum Command {
    /// Print the health status of the server or one of its services; exit 0
    /// only when it is SERVING.
    Health {
        /// Health service name; empty for the whole server, e.g.
        /// "weightgen.v1.GenerationService".
        #[arg(long, default_value = "")]
        service: String,
        /// Keep polling until SERVING, for at most this long (e.g. "30s").
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<Duration>,
    },
    /// Print the server's version, libtorch version and device.
    ServerInfo,
    /// Generate initializations for a task and write them as safetensors.
    Generate(Box<GenerateArgs>),
    /// Write a built-in family's task (descriptor and data) as a task file
    /// for `generate --task`, `compare --task` and the Python client.
    Task(Box<TaskArgs>),
    /// Request inits for tasks over gRPC, fine-tune them next to random
    /// inits, and print zero-shot scores and steps to 90% of the fully
    /// trained result.
    Compare(Box<CompareArgs>),
    /// Model zoo operations on the catalog and blob store directly.
    #[command(subcommand)]
    Zoo(ZooCommand),
    /// List the architectures registered in the server's catalog.
    Architectures(architectures::ArchitecturesArgs),
    /// Zoo models in the server's catalog: list, get, download, upload.
    #[command(subcommand)]
    Models(models::ModelsCommand),
    /// Denoiser versions in the server's catalog: list, get, download,
    /// activate.
    #[command(subcommand)]
    Denoisers(denoisers::DenoisersCommand),
    /// Background jobs (zoo building, denoiser training): submit, list, get,
    /// cancel, wait.
    #[command(subcommand)]
    Jobs(jobs::JobsCommand),
    /// Check a deployment end to end: connection, health, the server's build
    /// and device, the catalog, a loaded denoiser, and one real one-step
    /// sample per active denoiser; exit 0 only when no check failed.
    Doctor,
}

async fn run(cli: Cli) -> Result<ExitCode, client::ClientError> {
    match cli.command {
        Command::Generate(args) => generate(&cli.addr, cli.timeout, *args).await,
        Command::Task(args) => Ok(match task(&args) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("weightgen: task: {e}");
                ExitCode::from(2)
            }
        }),
        Command::Compare(args) => compare(&cli.addr, cli.timeout, *args).await,
        Command::Zoo(command) => Ok(zoo(command).await.unwrap_or_else(|e| {
            eprintln!("weightgen: zoo: {e}");
            ExitCode::FAILURE
        })),
        Command::Architectures(args) => {
            Ok(architectures::architectures(&cli.addr, cli.timeout, args).await)
        }
        Command::Models(command) => Ok(models::models(&cli.addr, cli.timeout, command).await),
        Command::Denoisers(command) => {
            Ok(denoisers::denoisers(&cli.addr, cli.timeout, command).await)
        }
        Command::Jobs(command) => Ok(jobs::jobs(&cli.addr, cli.timeout, command).await),
        Command::Doctor => Ok(doctor::doctor(&cli.addr, cli.timeout).await),
        Command::Health { service, wait } => {
            if let Some(wait) = wait {
                client::wait_until_serving(&target(&cli.addr), &service, wait).await?;
            }
            let channel = connect(&cli.addr, Some(cli.timeout)).await?;
            let status = client::health_status(channel, &service).await?;
            let name = if service.is_empty() {
                "server"
            } else {
                &service
            };
            println!("{name}: {}", status.as_str_name());
            Ok(
                if status == tonic_health::pb::health_check_response::ServingStatus::Serving {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                },
            )
        }
        Command::ServerInfo => {
            let channel = connect(&cli.addr, Some(cli.timeout)).await?;
            let info = client::server_metadata(channel).await?;
            println!(
                "{} {} (torch {}, device {}, cuda {})",
                info.name,
                info.version,
                info.torch_version,
                info.device,
                if info.cuda_available {
                    "available"
                } else {
                    "not available"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    let tls = std::mem::take(&mut cli.tls).settings();
    let _ = TARGET.set(client::Target {
        addr: String::new(),
        tls,
        token: cli.token.clone(),
        traceparent: cli.traceparent.clone(),
    });
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("weightgen: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weightgen: {e}");
            ExitCode::FAILURE
        }
    }
}
