//! `hotpatch bytes FILE <operation>`: byte-level operations, in place through the journal.

use std::path::PathBuf;

use anyhow::Context;
use byte_tier::ops::{self, BitOp, WordWidth};
use byte_tier::plan::{NoDetails, WritePlan};
use byte_tier::{BytePatcher, ByteWrite, DryRun, EditReceipt};
use serde_json::json;

use super::args::{HexBytes, RangeArgs, parse_hex, parse_number};

/// Arguments of `hotpatch bytes`.
#[derive(Debug, clap::Args)]
pub struct BytesArgs {
    /// The file to edit in place.
    pub file: PathBuf,
    /// Say what would change and write nothing.
    #[arg(long, global = true)]
    pub dry_run: bool,
    /// Print JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub operation: Operation,
}

/// A byte operation.
#[derive(Debug, clap::Subcommand)]
pub enum Operation {
    /// Print the bytes of a range as hexadecimal.
    Read(RangeArgs),
    /// Write hexadecimal bytes at an offset.
    Write {
        #[command(flatten)]
        at: RangeArgs,
        /// The bytes, in hexadecimal; several arguments are written one after another.
        #[arg(value_parser = HexBytes::parse, required = true, num_args = 1..)]
        bytes: Vec<HexBytes>,
    },
    /// Set every byte of a range to one value.
    Fill {
        #[command(flatten)]
        range: RangeArgs,
        /// The byte value.
        #[arg(long, value_parser = parse_number)]
        byte: u64,
    },
    /// Copy bytes from one offset to another (the ranges may overlap).
    Copy {
        /// Source offset.
        #[arg(long, value_parser = parse_number)]
        from: u64,
        /// Destination offset.
        #[arg(long, value_parser = parse_number)]
        to: u64,
        /// Bytes to copy.
        #[arg(long, value_parser = parse_number)]
        len: u64,
    },
    /// Swap two disjoint ranges of the same length.
    Swap {
        /// First offset.
        #[arg(long, value_parser = parse_number)]
        first: u64,
        /// Second offset.
        #[arg(long, value_parser = parse_number)]
        second: u64,
        /// Bytes in each range.
        #[arg(long, value_parser = parse_number)]
        len: u64,
    },
    /// XOR a range with a repeating key, in place (or print the result with --copy).
    Xor {
        #[command(flatten)]
        range: RangeArgs,
        /// The key, in hexadecimal.
        #[arg(long, value_parser = HexBytes::parse)]
        key: HexBytes,
        /// Print the XORed bytes instead of writing them.
        #[arg(long)]
        copy: bool,
    },
    /// A bit operation on every byte of a range.
    Bits {
        #[command(flatten)]
        range: RangeArgs,
        /// The operation: set:B, clear:B, flip:B (bit 0-7), and:HEX, or:HEX, xor:HEX, add:N.
        #[arg(long, value_parser = parse_bit_op)]
        op: BitOp,
    },
    /// Rotate the bits of every little-endian word of a range.
    Rotate {
        #[command(flatten)]
        range: RangeArgs,
        /// Word width in bits: 8, 16, 32 or 64.
        #[arg(long, default_value = "8")]
        width: u32,
        /// Bits to rotate left (negative: right).
        #[arg(long, allow_hyphen_values = true)]
        bits: i32,
    },
    /// Reverse the order of the bytes of a range.
    Reverse(RangeArgs),
    /// CRC-32, FNV-1a-64 and SHA-256 of a range.
    Hash(RangeArgs),
    /// Compare a range with expected hexadecimal bytes; print the differing ranges.
    Compare {
        #[command(flatten)]
        at: RangeArgs,
        /// The expected bytes, in hexadecimal; several arguments are compared one after
        /// another.
        #[arg(value_parser = HexBytes::parse, required = true, num_args = 1..)]
        expected: Vec<HexBytes>,
    },
}

fn parse_bit_op(text: &str) -> Result<BitOp, String> {
    let (name, operand) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?}: expected OP:OPERAND, e.g. flip:3 or xor:ff00"))?;
    let bit = || -> Result<u8, String> {
        operand
            .parse::<u8>()
            .map_err(|e| format!("bit index {operand:?}: {e}"))
    };
    let op = match name {
        "set" => BitOp::Set(bit()?),
        "clear" => BitOp::Clear(bit()?),
        "flip" => BitOp::Flip(bit()?),
        "and" => BitOp::And(parse_hex(operand)?),
        "or" => BitOp::Or(parse_hex(operand)?),
        "xor" => BitOp::Xor(parse_hex(operand)?),
        "add" => BitOp::WrappingAdd(
            u8::try_from(parse_number(operand)?)
                .map_err(|_| format!("{operand} does not fit in a byte"))?,
        ),
        other => return Err(format!("unknown bit operation {other:?}")),
    };
    op.validate()?;
    Ok(op)
}

pub fn run(args: &BytesArgs) -> anyhow::Result<()> {
    // Read-only operations never need the journal or write access.
    if let Some(text) = read_only(args)? {
        println!("{text}");
        return Ok(());
    }
    // One plan, reported by --dry-run and applied otherwise: the operation runs on a
    // view that records its writes.
    let recovered = super::plan::prepare(&args.file, args.dry_run)?;
    if let Some(report) = recovered {
        eprintln!(
            "recovered: rolled back unfinished transaction {} ({}, {} bytes)",
            report.transaction, report.name, report.bytes
        );
    }
    let map = byte_tier::MappedFile::open(&args.file)?;
    let mut view = DryRun::new(map.bytes());
    edit(&mut view, &args.operation)?;
    let name = view.names.join("; ");
    let plan = WritePlan::new(&args.file, map.bytes(), name, view.planned, NoDetails {})?;
    if let Some(receipt) = super::plan::run(plan, args.dry_run, args.json)
        .map_err(|e| super::patch::with_server_hint(e, &args.file))?
    {
        print_receipt(&receipt, args.json);
    }
    Ok(())
}

fn read_only(args: &BytesArgs) -> anyhow::Result<Option<String>> {
    let needs_map = matches!(
        args.operation,
        Operation::Read(_)
            | Operation::Hash(_)
            | Operation::Compare { .. }
            | Operation::Xor { copy: true, .. }
    );
    if !needs_map {
        return Ok(None);
    }
    let map = byte_tier::MappedFile::open(&args.file)?;
    let view = DryRun::new(map.bytes());
    let text = match &args.operation {
        Operation::Read(range) => {
            let r = range.resolve(&view, 256)?;
            let bytes = view.read(r.clone())?;
            if args.json {
                json!({"offset": r.start, "len": r.end - r.start, "hex": ops::to_hex(bytes)})
                    .to_string()
            } else {
                ops::to_hex(bytes)
            }
        }
        Operation::Hash(range) => {
            let r = range.resolve(&view, u64::MAX)?;
            let (crc, fnv, sha) = (
                view.crc32(r.clone())?,
                view.fnv1a64(r.clone())?,
                view.sha256(r.clone())?,
            );
            if args.json {
                json!({"offset": r.start, "len": r.end - r.start, "crc32": format!("{crc:08x}"),
                       "fnv1a64": format!("{fnv:016x}"), "sha256": ops::to_hex(&sha)})
                .to_string()
            } else {
                format!(
                    "range    {}..{}\ncrc32    {crc:08x}\nfnv1a64  {fnv:016x}\nsha256   {}",
                    r.start,
                    r.end,
                    ops::to_hex(&sha)
                )
            }
        }
        Operation::Compare { at, expected } => {
            let expected = &HexBytes::concat(expected);
            let start = RangeArgs {
                len: Some(expected.len() as u64),
                ..at.clone()
            }
            .resolve(&view, 0)?
            .start;
            let differences = view.compare(start, expected)?;
            if args.json {
                let ranges: Vec<_> = differences
                    .iter()
                    .map(|r| json!([r.start, r.end]))
                    .collect();
                json!({"equal": differences.is_empty(), "differences": ranges}).to_string()
            } else if differences.is_empty() {
                "equal".to_owned()
            } else {
                let ranges: Vec<String> = differences
                    .iter()
                    .map(|r| format!("{}..{}", r.start, r.end))
                    .collect();
                format!("differ at {}", ranges.join(", "))
            }
        }
        Operation::Xor { range, key, .. } => {
            let r = range.resolve(&view, 256)?;
            ops::to_hex(&view.xor_copy(r, &key.0)?)
        }
        _ => return Ok(None),
    };
    Ok(Some(text))
}

fn edit(patcher: &mut dyn BytePatcher, operation: &Operation) -> anyhow::Result<EditReceipt> {
    let receipt = match operation {
        Operation::Write { at, bytes } => {
            let bytes = HexBytes::concat(bytes);
            let r = RangeArgs {
                len: Some(bytes.len() as u64),
                ..at.clone()
            }
            .resolve(patcher, 0)?;
            patcher.commit(
                &format!("write {} bytes at {}", bytes.len(), r.start),
                vec![ByteWrite {
                    offset: r.start,
                    bytes,
                }],
            )?
        }
        Operation::Fill { range, byte } => {
            let byte = u8::try_from(*byte).context("--byte must be 0-255")?;
            let r = range.resolve(patcher, 256)?;
            patcher.fill(r, byte)?
        }
        Operation::Copy { from, to, len } => patcher.copy(*from, *to, *len)?,
        Operation::Swap { first, second, len } => {
            if first.max(second) - first.min(second) < *len {
                anyhow::bail!("the ranges overlap: swap needs two disjoint ranges");
            }
            patcher.swap(*first, *second, *len)?
        }
        Operation::Xor { range, key, .. } => {
            let r = range.resolve(patcher, 256)?;
            patcher.xor(r, &key.0)?
        }
        Operation::Bits { range, op } => {
            let r = range.resolve(patcher, 256)?;
            patcher.bit_op(r, op.clone())?
        }
        Operation::Rotate { range, width, bits } => {
            let width = WordWidth::from_bits(*width).context("--width must be 8, 16, 32 or 64")?;
            let r = range.resolve(patcher, 256)?;
            patcher.rotate(r, width, *bits)?
        }
        Operation::Reverse(range) => {
            let r = range.resolve(patcher, 256)?;
            patcher.reverse(r)?
        }
        Operation::Read(_) | Operation::Hash(_) | Operation::Compare { .. } => {
            unreachable!("read-only operations are handled before opening for writing")
        }
    };
    Ok(receipt)
}

fn print_receipt(receipt: &EditReceipt, json: bool) {
    if json {
        let ranges: Vec<_> = receipt
            .ranges
            .iter()
            .map(|r| json!([r.start, r.end]))
            .collect();
        println!(
            "{}",
            json!({"dry_run": false, "transaction": receipt.transaction, "bytes": receipt.bytes, "ranges": ranges})
        );
        return;
    }
    let ranges: Vec<String> = receipt
        .ranges
        .iter()
        .map(|r| format!("{}..{}", r.start, r.end))
        .collect();
    match receipt.transaction {
        None => println!("nothing changed"),
        Some(id) => println!(
            "transaction {id}: wrote {} bytes at {}",
            receipt.bytes,
            ranges.join(", ")
        ),
    }
}
