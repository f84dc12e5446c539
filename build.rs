//! Build script: compiles the v1 protos with protox (no `protoc` needed),
//! links the binaries to libtorch so that they run without LD_LIBRARY_PATH and
//! keep libtorch_cuda.so as a dependency, and compiles the two C++ shims
//! against libtorch's headers (the fused CPU FiLM block; CUDA graphs where
//! the libtorch has CUDA).

use std::env;
use std::path::{Path, PathBuf};

use prost::Message;

const PROTO_ROOT: &str = "proto";
const PROTO_FILES: &[&str] = &[
    "weightgen/v1/common.proto",
    "weightgen/v1/generation.proto",
    "weightgen/v1/catalog.proto",
    "weightgen/v1/jobs.proto",
];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(weightgen_cuda_graphs)");
    println!("cargo::rustc-check-cfg=cfg(weightgen_fused_cpu)");
    compile_protos();
    link_libtorch();
}

fn compile_protos() {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    // sqlx::migrate! embeds these.
    println!("cargo:rerun-if-changed=migrations");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let fds = protox::compile(PROTO_FILES, [PROTO_ROOT]).unwrap_or_else(|e| panic!("{e:?}"));
    std::fs::write(
        out_dir.join("weightgen_descriptor.bin"),
        fds.encode_to_vec(),
    )
    .expect("write descriptor set");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // prost's codec, but an undecodable body is INVALID_ARGUMENT, not INTERNAL.
        .codec_path("crate::serve::codec::StrictCodec")
        .compile_fds(fds)
        .expect("generate gRPC code");
}

/// Reads the libtorch directory from torch-sys (`links = "tch"`), then:
/// - adds an rpath to it, so the binaries find libtorch without LD_LIBRARY_PATH;
/// - links libtorch_cuda.so with `--no-as-needed`: no symbol of it is referenced,
///   so `--as-needed` would drop it and the binary would never see a GPU;
/// - records the torch version for `--version`.
fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib_dir) = env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:rustc-env=WEIGHTGEN_TORCH_VERSION=unknown");
        return;
    };
    let lib_dir = PathBuf::from(lib_dir);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    compile_fused_film_block(&lib_dir);
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        compile_cuda_graph_shim(&lib_dir);
    }
    println!(
        "cargo:rustc-env=WEIGHTGEN_TORCH_VERSION={}",
        torch_version(&lib_dir).unwrap_or_else(|| "unknown".to_owned())
    );
}

/// Compiles `src/backend/cuda_graph.cpp` (libtorch's CUDA graphs behind a C
/// ABI) and sets `cfg(weightgen_cuda_graphs)`, when the libtorch has CUDA
/// and the CUDA runtime headers are found: in the pip wheel's
/// `nvidia/cu13/include` (bootstrap adds `nvidia-cuda-crt` for the
/// `crt/` headers the runtime's include), `$CUDA_HOME/include` or
/// `/usr/local/cuda/include`. Without them serving runs every pass eagerly.
fn compile_cuda_graph_shim(lib_dir: &Path) {
    const SHIM: &str = "src/backend/cuda_graph.cpp";
    println!("cargo:rerun-if-changed={SHIM}");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let torch_include = lib_dir.join("../include");
    let mut candidates = Vec::new();
    if let Some(site) = lib_dir.parent().and_then(Path::parent) {
        candidates.push(site.join("nvidia/cu13/include"));
        candidates.push(site.join("nvidia/cuda_runtime/include"));
    }
    if let Ok(home) = env::var("CUDA_HOME") {
        candidates.push(PathBuf::from(home).join("include"));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    let cuda_include = candidates.into_iter().find(|dir| {
        dir.join("cuda_runtime_api.h").exists() && dir.join("crt/host_config.h").exists()
    });
    let Some(cuda_include) = cuda_include else {
        println!(
            "cargo:warning=CUDA runtime headers not found (pip install nvidia-cuda-crt, or set CUDA_HOME): \
             the server will not record CUDA graphs"
        );
        return;
    };
    if !torch_include.join("ATen/cuda/CUDAGraph.h").exists() {
        return;
    }
    let abi = cxx11_abi();
    cc::Build::new()
        .cpp(true)
        .file(SHIM)
        .include(&torch_include)
        .include(&cuda_include)
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .warnings(false)
        .compile("weightgen_cuda_graph");
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-lib=dylib=torch_cuda");
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-cfg=weightgen_cuda_graphs");
}

/// Compiles `src/model/film_block.cpp` (a FiLM block's CPU sampling pass in
/// one call) and sets `cfg(weightgen_fused_cpu)`, when libtorch's headers
/// are there; without them the blocks run their plain ATen ops. Optimized
/// in every profile: the loop is the point.
fn compile_fused_film_block(lib_dir: &Path) {
    const SHIM: &str = "src/model/film_block.cpp";
    println!("cargo:rerun-if-changed={SHIM}");
    let torch_include = lib_dir.join("../include");
    if !torch_include.join("ATen/ATen.h").exists() {
        println!(
            "cargo:warning=libtorch headers not found under {}: FiLM blocks run unfused",
            torch_include.display()
        );
        return;
    }
    cc::Build::new()
        .cpp(true)
        .file(SHIM)
        .include(&torch_include)
        .flag("-std=c++17")
        .flag("-fopenmp-simd")
        // Lets GCC turn the shim's branches (the exponential's clamp, the
        // sign select) into vector selects; it changes no result, only the
        // assumption that floating-point traps are off, as they are.
        .flag("-fno-trapping-math")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={}", cxx11_abi()))
        .opt_level(3)
        .debug(false)
        .warnings(false)
        .compile("weightgen_film_block");
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-cfg=weightgen_fused_cpu");
}

/// The C++ ABI libtorch was built with (`LIBTORCH_CXX11_ABI`, as torch-sys
/// reads it; the pip wheels use the new one).
fn cxx11_abi() -> String {
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned())
}

/// The version string of the libtorch in `lib_dir`: `torch/version.py` for a
/// pip wheel, `build-version` for a libtorch archive.
fn torch_version(lib_dir: &Path) -> Option<String> {
    let root = lib_dir.parent()?;
    if let Ok(text) = std::fs::read_to_string(root.join("version.py")) {
        println!(
            "cargo:rerun-if-changed={}",
            root.join("version.py").display()
        );
        return text.lines().find_map(|line| {
            let rest = line.strip_prefix("__version__")?;
            let value = rest.split('=').nth(1)?.trim();
            Some(value.trim_matches(|c| c == '\'' || c == '"').to_owned())
        });
    }
    std::fs::read_to_string(root.join("build-version"))
        .ok()
        .map(|s| s.trim().to_owned())
}
