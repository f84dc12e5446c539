//! `weightgen-worker`: background work (zoo building, denoiser training).
//! This version checks that libtorch computes on the chosen device.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use weightgen::device::{DeviceChoice, device_name};
use weightgen::telemetry::{self, LogArgs};
use weightgen::torch_info::{TorchInfo, smoke_test};

/// Builds model zoos and trains denoisers.
#[derive(Parser)]
#[command(name = "weightgen-worker", disable_version_flag = true)]
struct Cli {
    /// Print the versions of weightgen and libtorch and whether CUDA is
    /// available, then exit.
    #[arg(short = 'V', long)]
    version: bool,
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a small matrix product on the device and check the result.
    CheckDevice {
        /// Device to check: auto, cpu or cuda:N.
        #[arg(long, env = "WEIGHTGEN_DEVICE", default_value = "auto")]
        device: DeviceChoice,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.version {
        print!("{}", TorchInfo::detect().report("weightgen-worker"));
        return ExitCode::SUCCESS;
    }
    if let Err(e) = telemetry::init(&cli.log) {
        eprintln!("weightgen-worker: {e:#}");
        return ExitCode::FAILURE;
    }
    match cli.command {
        None => {
            eprintln!("weightgen-worker: no command given; see --help");
            ExitCode::from(2)
        }
        Some(Command::CheckDevice { device }) => {
            let result = device
                .resolve()
                .map_err(|e| e.to_string())
                .and_then(|d| smoke_test(d).map(|value| (d, value)));
            match result {
                Ok((d, value)) => {
                    println!("device {} ok (matmul check = {value})", device_name(d));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("weightgen-worker: device check failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
