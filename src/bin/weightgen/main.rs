//! `weightgen`: the command-line client.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use weightgen::client;

mod generate;
mod zoo;

use generate::{GenerateArgs, generate};
use zoo::{ZooCommand, zoo};

/// Talks to a weightgen server.
#[derive(Parser)]
#[command(name = "weightgen", version)]
struct Cli {
    /// Server address, "host:port" or "http://host:port".
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
    #[command(subcommand)]
    command: Command,
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
    /// Model zoo operations on the catalog and blob store directly.
    #[command(subcommand)]
    Zoo(ZooCommand),
}

async fn run(cli: Cli) -> Result<ExitCode, client::ClientError> {
    match cli.command {
        Command::Generate(args) => generate(&cli.addr, cli.timeout, *args).await,
        Command::Zoo(command) => Ok(zoo(command).await.unwrap_or_else(|e| {
            eprintln!("weightgen: zoo: {e}");
            ExitCode::FAILURE
        })),
        Command::Health { service, wait } => {
            if let Some(wait) = wait {
                client::wait_until_serving(&cli.addr, &service, wait).await?;
            }
            let channel = client::connect(&cli.addr, Some(cli.timeout)).await?;
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
            let channel = client::connect(&cli.addr, Some(cli.timeout)).await?;
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
    let cli = Cli::parse();
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
