//! The built binaries as an operator meets them: linked to libtorch
//! (libtorch_cuda kept), runnable without LD_LIBRARY_PATH, and the server's
//! whole life as a process: start, answer health to the CLI, stop on SIGTERM.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::ServerProcess;

const BINARIES: [&str; 3] = [
    env!("CARGO_BIN_EXE_weightgen-server"),
    env!("CARGO_BIN_EXE_weightgen-worker"),
    env!("CARGO_BIN_EXE_weightgen"),
];

/// `readelf -d` of a binary: (NEEDED libraries, RUNPATH/RPATH directories).
fn dynamic_section(binary: &str) -> (Vec<String>, Vec<PathBuf>) {
    let output = Command::new("readelf")
        .args(["-d", binary])
        .output()
        .expect("readelf (binutils) is installed");
    assert!(output.status.success(), "readelf failed on {binary}");
    let text = String::from_utf8_lossy(&output.stdout);
    let bracketed = |line: &str| {
        line.split_once('[')
            .and_then(|(_, rest)| rest.split_once(']'))
            .map(|(inside, _)| inside.to_owned())
    };
    let needed = text
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(bracketed)
        .collect();
    let paths = text
        .lines()
        .filter(|l| l.contains("(RUNPATH)") || l.contains("(RPATH)"))
        .filter_map(bracketed)
        .flat_map(|p| p.split(':').map(PathBuf::from).collect::<Vec<_>>())
        .collect();
    (needed, paths)
}

fn torch_lib_dir(paths: &[PathBuf]) -> Option<&Path> {
    paths
        .iter()
        .map(PathBuf::as_path)
        .find(|p| p.join("libtorch_cpu.so").exists())
}

#[test]
fn every_binary_needs_libtorch_cuda_and_has_an_rpath_to_libtorch() {
    for binary in BINARIES {
        let (needed, paths) = dynamic_section(binary);
        let lib_dir = torch_lib_dir(&paths)
            .unwrap_or_else(|| panic!("{binary}: no rpath to a libtorch directory in {paths:?}"));
        assert!(
            needed.iter().any(|n| n == "libtorch_cpu.so"),
            "{binary}: {needed:?}"
        );
        let cuda_build = lib_dir.join("libtorch_cuda.so").exists();
        if std::env::var_os("WEIGHTGEN_TORCH_VENV").is_some() {
            // The bootstrap's pinned wheel is the CUDA build.
            assert!(cuda_build, "{} lacks libtorch_cuda.so", lib_dir.display());
        }
        if cuda_build {
            assert!(
                needed.iter().any(|n| n == "libtorch_cuda.so"),
                "{binary}: libtorch_cuda.so was dropped by --as-needed: {needed:?}"
            );
        }
    }
}

#[test]
fn binaries_run_without_ld_library_path() {
    for binary in [BINARIES[0], BINARIES[1]] {
        let output = Command::new(binary)
            .arg("--version")
            .env_remove("LD_LIBRARY_PATH")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{binary}: {output:?}");
        assert!(stdout.contains("torch 2.11.0"), "{stdout}");
        assert!(stdout.contains("cuda: "), "{stdout}");
    }
    let output = Command::new(BINARIES[1])
        .args(["check-device", "--device", "cpu"])
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("device cpu ok (matmul check = 2016)")
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn client(addr: &str, args: &[&str]) -> (bool, String) {
    let output = Command::new(BINARIES[2])
        .arg("--addr")
        .arg(addr)
        .args(args)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    (
        output.status.success(),
        crate::common::combined_output(&output),
    )
}

#[test]
fn server_process_serves_the_cli_and_stops_on_sigterm_with_json_logs() {
    let data_dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new(BINARIES[0])
        .args([
            "--listen",
            &addr,
            "--metrics-listen",
            "off",
            "--device",
            "cpu",
        ])
        .arg("--data-dir")
        .arg(data_dir.path().join("data"))
        .env("WEIGHTGEN_LOG_FORMAT", "json")
        .env_remove("LD_LIBRARY_PATH")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut server = ServerProcess(child);

    let (ok, text) = client(&addr, &["health", "--wait", "30s"]);
    assert!(ok && text.contains("server: SERVING"), "{text}");
    let (ok, text) = client(
        &addr,
        &["health", "--service", "weightgen.v1.GenerationService"],
    );
    assert!(!ok && text.contains("NOT_SERVING"), "{text}");
    let (ok, text) = client(&addr, &["server-info"]);
    assert!(
        ok && text.contains("torch 2.11.0") && text.contains("device cpu"),
        "{text}"
    );
    assert!(data_dir.path().join("data").is_dir(), "data dir created");
    assert!(
        data_dir.path().join("data/catalog.db").is_file(),
        "embedded catalog created"
    );

    server.stop_with_sigterm(Duration::from_secs(15));

    let stderr = BufReader::new(server.0.stderr.take().unwrap());
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| {
            let l = l.unwrap();
            serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))
        })
        .collect();
    let messages: Vec<&str> = lines.iter().filter_map(|v| v["message"].as_str()).collect();
    assert!(
        messages.contains(&"weightgen-server listening"),
        "{messages:?}"
    );
    assert!(
        messages.contains(&"shutdown signal received"),
        "{messages:?}"
    );
    assert!(
        messages.contains(&"weightgen-server stopped"),
        "{messages:?}"
    );
}

#[test]
fn cli_reports_an_unreachable_server_clearly() {
    let addr = format!("127.0.0.1:{}", free_port());
    let (ok, text) = client(&addr, &["--timeout", "2s", "health"]);
    assert!(!ok);
    assert!(
        text.contains("cannot connect to") && text.contains(&addr),
        "{text}"
    );
}
