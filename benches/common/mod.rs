//! What every benchmark needs: its settings from the environment, and the
//! diffusers half of a comparison run as a script that prints one JSON line.

use std::path::Path;
use std::process::Command;

/// The environment variable `name`, or `default` when it is unset.
pub fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// Runs `py script args…` and parses the last line it prints as JSON; `None`
/// (with the script's stderr printed) when it fails, so a benchmark still
/// prints its own figures without the reference environment.
#[allow(dead_code)] // not every benchmark compares against diffusers
pub fn python_json(py: &Path, script: &Path, args: &[&std::ffi::OsStr]) -> Option<serde_json::Value> {
    let out = Command::new(py).arg(script).args(args).output().ok()?;
    if !out.status.success() {
        eprintln!("diffusers failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last()?).ok()
}
