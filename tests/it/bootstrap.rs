//! scripts/bootstrap.sh: clear failures without python or with a bad
//! LIBTORCH, and a second run that only checks.

use std::process::Command;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bootstrap.sh");

fn run(envs: &[(&str, &str)], remove: &[&str]) -> (bool, String) {
    let mut command = Command::new("/bin/bash");
    command.arg(SCRIPT);
    for name in remove {
        command.env_remove(name);
    }
    let output = command.envs(envs.iter().copied()).output().unwrap();
    (
        output.status.success(),
        crate::common::combined_output(&output),
    )
}

#[test]
fn fails_clearly_without_python() {
    let empty = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let (ok, text) = run(
        &[
            ("PATH", empty.path().to_str().unwrap()),
            ("WEIGHTGEN_CACHE", cache.path().to_str().unwrap()),
        ],
        &["LIBTORCH"],
    );
    assert!(!ok, "{text}");
    assert!(text.contains("python3 not found"), "{text}");
    assert!(
        std::fs::read_dir(cache.path()).unwrap().next().is_none(),
        "nothing created"
    );
}

#[test]
fn rejects_a_libtorch_without_lib_dir() {
    let fake = tempfile::tempdir().unwrap();
    let (ok, text) = run(&[("LIBTORCH", fake.path().to_str().unwrap())], &[]);
    assert!(!ok, "{text}");
    assert!(text.contains("has no lib/ directory"), "{text}");
}

#[test]
fn a_second_run_only_checks_and_prints_the_environment() {
    // The test command bootstraps before cargo runs, so the venv exists.
    let (ok, text) = run(&[], &["LIBTORCH"]);
    assert!(ok, "{text}");
    assert!(text.contains("torch==2.11.0 already installed"), "{text}");
    assert!(!text.contains("installing"), "{text}");
    assert!(text.contains("export LIBTORCH_USE_PYTORCH=1"), "{text}");
    let lib_line = text
        .lines()
        .find(|l| l.starts_with("export WEIGHTGEN_TORCH_LIB="))
        .expect("exports the torch lib dir");
    let lib_dir = lib_line.trim_start_matches("export WEIGHTGEN_TORCH_LIB=");
    assert!(
        std::path::Path::new(lib_dir)
            .join("libtorch_cpu.so")
            .exists(),
        "{lib_dir}"
    );
}
