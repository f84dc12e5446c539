//! Files written here load in Python's `safetensors` + `torch` into a plain
//! `nn.Module` with `strict=True`, and files PyTorch writes decode and
//! flatten here. Uses the bootstrap venv (scripts/test.sh sets it up).

use crate::common::torch_python;
use std::collections::HashMap;
use std::process::Command;

use tch::{Device, Kind, Tensor};
use weightgen::weights::{
    ArchSpec, DType, decode_safetensors, encode_safetensors, flatten, unflatten,
};

fn run_python(script: &str, args: &[&str]) -> String {
    let output = Command::new(torch_python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    let text = crate::common::combined_output(&output);
    assert!(output.status.success(), "python failed:\n{text}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

const LOAD: &str = r#"
import sys, torch
from safetensors import safe_open
from safetensors.torch import load_file
path, dtype = sys.argv[1], getattr(torch, sys.argv[2])
model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).to(dtype)
model.load_state_dict(load_file(path), strict=True)
with safe_open(path, framework="pt") as f:
    print("arch", f.metadata()["arch"])
x = torch.linspace(-1, 1, 8).reshape(2, 4).to(dtype)
print("out", " ".join(repr(v) for v in model(x).float().flatten().tolist()))
"#;

#[test]
fn rust_files_load_into_a_pytorch_module_strictly() {
    let spec = ArchSpec::sequential_mlp("mlp-4-3-2", "test", &[4, 3, 2]).unwrap();
    let flat = Tensor::linspace(
        -0.9,
        0.8,
        spec.num_parameters() as i64,
        (Kind::Float, Device::Cpu),
    );
    let tensors = unflatten(&spec, &flat).unwrap();
    let x = Tensor::linspace(-1.0, 1.0, 8, (Kind::Float, Device::Cpu)).reshape([2, 4]);
    let get = |n: &str| {
        tensors
            .iter()
            .find(|(name, _)| name == n)
            .unwrap()
            .1
            .shallow_clone()
    };
    let expected = x
        .linear(&get("0.weight"), Some(&get("0.bias")))
        .relu()
        .linear(&get("2.weight"), Some(&get("2.bias")));
    let dir = tempfile::tempdir().unwrap();
    for (dtype, torch_name, tolerance) in [
        (DType::F32, "float32", 1e-6),
        (DType::F16, "float16", 2e-2),
        (DType::BF16, "bfloat16", 6e-2),
    ] {
        let metadata = HashMap::from([("arch".to_owned(), spec.name.clone())]);
        let bytes = encode_safetensors(&tensors, dtype, &metadata).unwrap();
        let path = dir.path().join(format!("{torch_name}.safetensors"));
        std::fs::write(&path, bytes).unwrap();
        let out = run_python(LOAD, &[path.to_str().unwrap(), torch_name]);
        assert!(out.contains("arch mlp-4-3-2"), "{out}");
        let values: Vec<f64> = out
            .lines()
            .find_map(|l| l.strip_prefix("out "))
            .unwrap()
            .split(' ')
            .map(|v| v.parse().unwrap())
            .collect();
        let expected: Vec<f64> =
            Vec::<f64>::try_from(expected.to_kind(Kind::Double).flatten(0, -1)).unwrap();
        for (got, want) in values.iter().zip(&expected) {
            assert!(
                (got - want).abs() <= tolerance * want.abs().max(1.0),
                "{torch_name}: {got} vs {want}"
            );
        }
    }
}

const SAVE: &str = r#"
import sys, torch
from safetensors.torch import save_file
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
save_file(model.state_dict(), sys.argv[1], metadata={"source": "pytorch"})
print("sum", repr(sum(p.double().sum().item() for p in model.state_dict().values())))
"#;

#[test]
fn pytorch_files_decode_and_flatten_here() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("torch.safetensors");
    let out = run_python(SAVE, &[path.to_str().unwrap()]);
    let sum: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("sum "))
        .unwrap()
        .parse()
        .unwrap();
    let decoded = decode_safetensors(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(decoded.metadata["source"], "pytorch");
    let spec = ArchSpec::sequential_mlp("mlp-4-3-2", "test", &[4, 3, 2]).unwrap();
    let flat = flatten(&spec, &decoded.tensors).unwrap();
    assert!(
        (flat
            .to_kind(Kind::Double)
            .sum(Kind::Double)
            .double_value(&[])
            - sum)
            .abs()
            < 1e-9
    );
    // Inferring the spec from the header gives the same layout.
    let inferred = ArchSpec::infer("mlp-4-3-2", "test", decoded.specs.clone()).unwrap();
    assert_eq!(inferred.num_parameters(), spec.num_parameters());
    assert_eq!(inferred.layers.len(), 2);
}
