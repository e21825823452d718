//! Which running processes a change of a model file reaches.
//!
//! A process that maps the file sees a change of the bytes it reads straight from the
//! mapping. llama-server copies many weights out of it, though: into `CPU_REPACK`
//! buffers on x86 with AVX2 (Q4_0, Q4_K, IQ4_NL and MXFP4 matrix weights whose
//! `ne[1] % 8 == 0`), into a GPU's memory with `-ngl`, or everything with `--no-mmap`.
//! This module finds the processes that map a file (from `/proc/*/maps`) and says, by
//! llama.cpp's rules and the process's command line, whether a tensor is a copy there,
//! so that a file patch that cannot reach a server says so.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use byte_tier::TensorInfo;

/// A process that maps a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapper {
    /// Its process id.
    pub pid: u32,
    /// Its command name.
    pub comm: String,
    /// Its command line.
    pub cmdline: Vec<String>,
    /// The agent's socket, when it runs under `hotpatch launch`.
    pub agent_socket: Option<PathBuf>,
}

/// How a process holds a tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holding {
    /// It reads the tensor straight from the file mapping: a file patch reaches it.
    Mapping,
    /// It holds a copy, so a file patch does not reach it; why.
    Copy(String),
}

/// The processes that map `file` (by device and inode, so a path given another way
/// still matches). Processes whose maps cannot be read (another user's) are skipped.
pub fn mappers(file: &Path) -> std::io::Result<Vec<Mapper>> {
    let meta = std::fs::metadata(file)?;
    let (dev, ino) = (meta.dev(), meta.ino());
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(maps) = std::fs::read_to_string(entry.path().join("maps")) else {
            continue;
        };
        if !maps.lines().any(|line| maps_line_is(line, dev, ino)) {
            continue;
        }
        let comm = std::fs::read_to_string(entry.path().join("comm"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let cmdline = std::fs::read(entry.path().join("cmdline"))
            .map(|b| {
                b.split(|&c| c == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let agent_socket = std::fs::read(entry.path().join("environ"))
            .ok()
            .and_then(|env| {
                env.split(|&c| c == 0).find_map(|kv| {
                    let kv = String::from_utf8_lossy(kv);
                    kv.strip_prefix(&format!("{}=", memory_tier::agent::proto::SOCKET_ENV))
                        .map(PathBuf::from)
                })
            });
        found.push(Mapper {
            pid,
            comm,
            cmdline,
            agent_socket,
        });
    }
    found.sort_by_key(|m| m.pid);
    Ok(found)
}

/// Whether a `/proc/PID/maps` line maps the file with this device and inode.
fn maps_line_is(line: &str, dev: u64, ino: u64) -> bool {
    let mut fields = line.split_ascii_whitespace();
    let (Some(_), Some(_), Some(_), Some(device), Some(inode)) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return false;
    };
    let Some((major, minor)) = device.split_once(':') else {
        return false;
    };
    let (Ok(major), Ok(minor), Ok(inode)) = (
        u64::from_str_radix(major, 16),
        u64::from_str_radix(minor, 16),
        inode.parse::<u64>(),
    ) else {
        return false;
    };
    inode == ino && major == libc_major(dev) && minor == libc_minor(dev)
}

// Linux's encoding of a dev_t (glibc's gnu_dev_major / gnu_dev_minor).
fn libc_major(dev: u64) -> u64 {
    ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff)
}

fn libc_minor(dev: u64) -> u64 {
    (dev & 0xff) | ((dev >> 12) & !0xff)
}

/// The value of a flag in a command line (`--flag V` or `--flag=V`).
fn flag<'a>(cmdline: &'a [String], names: &[&str]) -> Option<&'a str> {
    cmdline.iter().enumerate().find_map(|(i, arg)| {
        names.iter().find_map(|name| {
            if arg == name {
                cmdline.get(i + 1).map(String::as_str)
            } else {
                arg.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix('='))
            }
        })
    })
}

fn has(cmdline: &[String], names: &[&str]) -> bool {
    cmdline.iter().any(|a| names.contains(&a.as_str()))
}

/// Whether llama.cpp's CPU backend repacks this tensor on an x86-64 CPU with AVX2:
/// a matrix weight (2-D, used by a matrix multiplication: the token embeddings are read
/// row by row) of type Q4_0, Q4_K, IQ4_NL or MXFP4 whose `ne[1]` is a multiple of 8.
pub fn repacked_on_avx2(tensor: &TensorInfo) -> bool {
    use byte_tier::GgmlType;
    let repackable = matches!(
        tensor.ggml_type,
        GgmlType::Q4_0 | GgmlType::Q4_K | GgmlType::IQ4_NL | GgmlType::MXFP4
    );
    repackable
        && tensor.dims.len() == 2
        && tensor.dims[1].is_multiple_of(8)
        && tensor.name != "token_embd.weight"
        && tensor.name.ends_with(".weight")
}

/// Whether this machine's CPU has AVX2 (llama.cpp repacks only then).
pub fn cpu_has_avx2() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_ascii_whitespace().any(|f| f == "avx2"))
        })
        .unwrap_or(false)
}

/// How a llama-server with this command line holds `tensor`, by llama.cpp's rules.
pub fn holding(cmdline: &[String], tensor: &TensorInfo, avx2: bool) -> Holding {
    if has(cmdline, &["--no-mmap"]) {
        return Holding::Copy(
            "it loaded the model with --no-mmap, so every weight is a copy".into(),
        );
    }
    let layers = flag(cmdline, &["-ngl", "--n-gpu-layers", "--gpu-layers"]);
    let cpu_only = matches!(layers, Some("0")) || has(cmdline, &["--cpu-only"]);
    if !cpu_only {
        return Holding::Copy(format!(
            "it runs with -ngl {} (the default is auto), so weights that fit on a GPU are copies in its memory",
            layers.unwrap_or("auto")
        ));
    }
    let no_repack = has(cmdline, &["--no-repack", "-nr"]);
    if !no_repack && avx2 && repacked_on_avx2(tensor) {
        return Holding::Copy(format!(
            "it repacks {} tensors like this one into a CPU_REPACK buffer (start it with --no-repack to read it from the mapping)",
            tensor.ggml_type
        ));
    }
    Holding::Mapping
}

#[cfg(test)]
mod tests {
    use super::*;
    use byte_tier::GgmlType;

    fn tensor(name: &str, ty: GgmlType, dims: Vec<u64>) -> TensorInfo {
        TensorInfo {
            name: name.into(),
            dims,
            ggml_type: ty,
            relative_offset: 0,
            data_offset: 0,
            n_elements: 0,
            n_bytes: 0,
            info_offset: 0,
        }
    }

    fn cmd(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_owned).collect()
    }

    #[test]
    fn llama_cpp_repack_rules_decide_a_cpu_servers_copies() {
        let q4k = tensor("blk.0.ffn_up.weight", GgmlType::Q4_K, vec![640, 2048]);
        let q6k = tensor("blk.0.ffn_down.weight", GgmlType::Q6_K, vec![2048, 640]);
        let odd = tensor("blk.0.attn_q.weight", GgmlType::Q4_K, vec![640, 1028]);
        let embd = tensor("token_embd.weight", GgmlType::Q4_0, vec![640, 262144]);
        let server = cmd("llama-server -m m.gguf -ngl 0");
        assert!(matches!(holding(&server, &q4k, true), Holding::Copy(_)));
        assert_eq!(holding(&server, &q4k, false), Holding::Mapping);
        assert_eq!(holding(&server, &q6k, true), Holding::Mapping);
        assert_eq!(holding(&server, &odd, true), Holding::Mapping);
        assert_eq!(holding(&server, &embd, true), Holding::Mapping);
        let no_repack = cmd("llama-server -m m.gguf --no-repack --n-gpu-layers=0");
        assert_eq!(holding(&no_repack, &q4k, true), Holding::Mapping);
        assert!(matches!(
            holding(&cmd("llama-server -m m.gguf"), &q6k, true),
            Holding::Copy(why) if why.contains("auto")
        ));
        assert!(matches!(
            holding(&cmd("llama-server -m m.gguf -ngl 0 --no-mmap"), &q6k, true),
            Holding::Copy(_)
        ));
    }
}
