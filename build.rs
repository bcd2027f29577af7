//! Link-time fixes for libtorch taken from the PyPI `torch` wheel.
//!
//! torch-sys links its own C++ wrapper against libtorch but leaves two gaps that
//! every binary of this crate (server, tests, benches) would otherwise fall into:
//!
//! 1. **Run-time search path.** The wheel's `lib/` is not on the loader path, so
//!    `cargo run`/`cargo test` would die with `libtorch_cpu.so: cannot open shared
//!    object file`. We bake an rpath to that directory into every artefact.
//! 2. **CUDA silently missing.** Nothing in our code references a symbol of
//!    `libtorch_cuda.so`, so the linker (with `--as-needed`) drops it and CUDA ops
//!    fail at run time with "Could not run ... 'CUDA' backend". We force it in with
//!    `--no-as-needed` when the wheel ships it.
//!
//! We also check the torch version ourselves: pointing `LIBTORCH` at the wheel
//! skips torch-sys's own check, and tch 0.24 is only ABI-compatible with 2.11.

use std::path::{Path, PathBuf};

const REQUIRED_TORCH: &str = "2.11.";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let lib_dir = match std::env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(dir) => PathBuf::from(dir),
        Err(_) => panic!("torch-sys did not report its libtorch directory; is LIBTORCH set (see .cargo/config.toml)?"),
    };
    check_version(&lib_dir);

    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    let mut forced = vec!["-ltorch"];
    if lib_dir.join("libtorch_cuda.so").exists() {
        forced.push("-ltorch_cuda");
    }
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    for lib in forced {
        println!("cargo:rustc-link-arg={lib}");
    }
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}

/// Reads `torch/version.py` next to `lib/` and refuses any torch but 2.11.x.
fn check_version(lib_dir: &Path) {
    let Some(torch_dir) = lib_dir.parent() else { return };
    let version_file = torch_dir.join("version.py");
    println!("cargo:rerun-if-changed={}", version_file.display());
    let Ok(text) = std::fs::read_to_string(&version_file) else {
        // A plain libtorch zip has no version.py; torch-sys checked build-version already.
        return;
    };
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("__version__ = "))
        .map(|v| v.trim().trim_matches('\'').trim_matches('"').to_owned())
        .unwrap_or_default();
    if !version.starts_with(REQUIRED_TORCH) {
        panic!("tch 0.24 needs torch {REQUIRED_TORCH}x but {} holds torch {version:?}; run `make venv`", torch_dir.display());
    }
}
