//! Argument types shared by subcommands.

use std::ops::Range;

use anyhow::{Context, bail};
use byte_tier::{BytePatcher, Gguf, tensor_range};

/// Parses a byte count or offset: decimal, or hexadecimal with `0x`.
pub fn parse_number(text: &str) -> Result<u64, String> {
    let text = text.trim().replace('_', "");
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|e| format!("{text:?} is not a number: {e}"))
}

/// Parses hexadecimal bytes (`"47 47 55 46"`, `"0x47475546"`).
pub fn parse_hex(text: &str) -> Result<Vec<u8>, String> {
    byte_tier::ops::from_hex(text).ok_or_else(|| format!("{text:?} is not hexadecimal bytes"))
}

/// Bytes given in hexadecimal on the command line, one argument's worth.
///
/// A newtype rather than `Vec<u8>`: clap reads a `Vec<T>` field as "many values of
/// `T`", so a parser that returns `Vec<u8>` for one argument does not fit such a field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HexBytes(pub Vec<u8>);

impl HexBytes {
    /// Parses one argument (`"47 47 55 46"`, `"0x47475546"`).
    pub fn parse(text: &str) -> Result<HexBytes, String> {
        parse_hex(text).map(HexBytes)
    }

    /// The bytes of several arguments, in order.
    pub fn concat(parts: &[HexBytes]) -> Vec<u8> {
        parts.iter().flat_map(|p| p.0.iter().copied()).collect()
    }
}

/// A byte range: `--offset` and `--len`, absolute or relative to `--tensor`'s data.
#[derive(Debug, Clone, clap::Args)]
pub struct RangeArgs {
    /// Start of the range (absolute, or relative to the tensor's data with --tensor).
    #[arg(long, value_parser = parse_number, default_value = "0")]
    pub offset: u64,
    /// Length of the range (default: to the end of the tensor, or 256 bytes).
    #[arg(long, value_parser = parse_number)]
    pub len: Option<u64>,
    /// Address the range inside this tensor's data; it may not cross the tensor's end.
    #[arg(long, value_name = "NAME")]
    pub tensor: Option<String>,
}

impl RangeArgs {
    /// The absolute range, checked against the tensor (when given) and the file.
    pub fn resolve(
        &self,
        patcher: &dyn BytePatcher,
        default_len: u64,
    ) -> anyhow::Result<Range<u64>> {
        match &self.tensor {
            Some(name) => {
                let gguf =
                    Gguf::parse(patcher.bytes()).context("parse the file to find the tensor")?;
                let tensor = gguf.require_tensor(name)?;
                let len = self
                    .len
                    .unwrap_or_else(|| tensor.n_bytes.saturating_sub(self.offset));
                let end = self
                    .offset
                    .checked_add(len)
                    .context("the range overflows")?;
                Ok(tensor_range(tensor, Some(self.offset..end))?)
            }
            None => {
                let len = self.len.unwrap_or(default_len);
                let end = self
                    .offset
                    .checked_add(len)
                    .context("the range overflows")?;
                if end > patcher.len() && self.len.is_none() {
                    return Ok(self.offset..patcher.len().max(self.offset));
                }
                byte_tier::check_range(&(self.offset..end), patcher.len())?;
                Ok(self.offset..end)
            }
        }
    }
}

/// A search pattern: hexadecimal with `--hex` or a `0x` prefix, text otherwise.
pub fn pattern_bytes(pattern: &str, hex: bool) -> anyhow::Result<Vec<u8>> {
    if hex || pattern.starts_with("0x") {
        return parse_hex(pattern).map_err(anyhow::Error::msg);
    }
    if pattern.is_empty() {
        bail!("the pattern is empty");
    }
    Ok(pattern.as_bytes().to_vec())
}
