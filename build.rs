//! With the `cuda` feature, compiles the CUDA kernels (src/backend/cuda/kernels.cu) with nvcc into
//! one fatbin in OUT_DIR, which the binary embeds and loads at run time. Without it, nothing.
//!
//! nvcc is found through `NVCC`, then `CUDA_HOME` / `CUDA_PATH` / `CUDA_ROOT` (`bin/nvcc`), then the
//! toolchain `scripts/build_cuda.sh` installs in `.cuda/`, then `PATH`. `INFERD_CUDA_ARCHS` lists the
//! GPU architectures to build machine code for (default `80,86,89,90`: A100, A10/A40/RTX 30xx,
//! L4/L40/RTX 40xx, H100/H200), and PTX of the newest of them is added so that later GPUs can
//! compile it at load. Pin nvcc 13.0.x for a CUDA 13.0 driver: newer PTX does not load on it.
use std::path::{Path, PathBuf};
use std::process::Command;

fn nvcc() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(root) = std::env::var_os(var) {
            let p = Path::new(&root).join("bin/nvcc");
            if p.exists() {
                return p;
            }
        }
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cuda/nvidia/cu13/bin/nvcc");
    if local.exists() {
        return local;
    }
    PathBuf::from("nvcc")
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let src = "src/backend/cuda/kernels.cu";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-changed=src/backend/cuda/gemv_row.cuh");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "CUDA_ROOT", "INFERD_CUDA_ARCHS"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let archs = std::env::var("INFERD_CUDA_ARCHS").unwrap_or_else(|_| "80,86,89,90".into());
    let archs: Vec<&str> = archs.split(',').map(str::trim).filter(|a| !a.is_empty()).collect();
    let newest = archs.iter().max_by_key(|a| a.parse::<u32>().unwrap_or(0)).expect("INFERD_CUDA_ARCHS names at least one architecture");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("kernels.fatbin");
    let nvcc = nvcc();
    let mut cmd = Command::new(&nvcc);
    cmd.args(["-fatbin", "-O3", "-std=c++17", "-Xptxas", "-warn-spills"]);
    for a in &archs {
        cmd.arg(format!("-gencode=arch=compute_{a},code=sm_{a}"));
    }
    cmd.arg(format!("-gencode=arch=compute_{newest},code=compute_{newest}"));
    cmd.arg("-o").arg(&out).arg(src);
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run nvcc ({}): {e}. Install the CUDA toolchain with scripts/build_cuda.sh, or set NVCC / CUDA_HOME", nvcc.display())
    });
    assert!(status.success(), "nvcc failed to compile {src} ({status})");
}
