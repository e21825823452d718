//! etcd for the fleet tests: Debian's `etcd-server` and `etcd-client` packages (etcd
//! 3.4), installed with apt only when the binaries are missing. The tests start and stop
//! their own clusters on loopback ports; nothing here starts a service.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Result, bail};

/// Where a binary is on `PATH`, if it is.
pub(crate) fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The `etcd` binary, after installing it with apt if it is missing.
pub fn etcd() -> Result<PathBuf> {
    if let Some(etcd) = on_path("etcd").filter(|_| on_path("etcdctl").is_some()) {
        return Ok(etcd);
    }
    apt_install(&["etcd-server", "etcd-client"]).map_err(|e| {
        e.context("etcd is not installed: install etcd 3.4 or later (etcd and etcdctl on PATH)")
    })?;
    match on_path("etcd") {
        Some(etcd) => Ok(etcd),
        None => bail!("apt-get installed etcd-server, but no etcd is on PATH"),
    }
}

/// Installs Debian packages with apt-get (after `apt-get update`), as root directly or
/// through sudo.
pub(crate) fn apt_install(packages: &[&str]) -> Result<()> {
    if on_path("apt-get").is_none() {
        bail!(
            "this machine has no apt-get to install {}",
            packages.join(", ")
        );
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    let apt = |args: &[&str]| {
        let mut command = if root {
            Command::new("apt-get")
        } else {
            let mut sudo = Command::new("sudo");
            sudo.arg("apt-get");
            sudo
        };
        command.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        command
    };
    crate::run(&mut apt(&["update", "-qq"]))?;
    crate::run(apt(&["install", "-y", "-qq"]).args(packages))
}
