//! `weightgen-server`: the gRPC service. All flags are also `WEIGHTGEN_*`
//! environment variables; `--help` lists them.

use std::process::ExitCode;

use clap::Parser;
use weightgen::serve::{self, ServerConfig};
use weightgen::telemetry::{self, LogArgs};
use weightgen::torch_info::TorchInfo;

/// Serves task-conditioned weight initializations over gRPC.
#[derive(Parser)]
#[command(name = "weightgen-server", disable_version_flag = true)]
struct Cli {
    /// Print the versions of weightgen and libtorch and whether CUDA is
    /// available, then exit.
    #[arg(short = 'V', long)]
    version: bool,
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    server: ServerConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.version {
        print!("{}", TorchInfo::detect().report("weightgen-server"));
        return ExitCode::SUCCESS;
    }
    // Held to the end of main: dropping it exports the last spans.
    let _telemetry = match telemetry::init(&cli.log, "weightgen-server") {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("weightgen-server: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("weightgen-io")
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("weightgen-server: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve::run_until_signal(cli.server)) {
        Ok(report) if report.drained => ExitCode::SUCCESS,
        Ok(report) => {
            tracing::warn!(
                cut_off = report.cut_off,
                "stopped before every call finished"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "weightgen-server failed");
            eprintln!("weightgen-server: {e}");
            ExitCode::FAILURE
        }
    }
}
