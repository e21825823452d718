//! The error type of byte-tier.

use std::io;
use std::path::PathBuf;

use crate::types::GgmlType;

/// Everything that can go wrong while reading, checking or writing a GGUF file.
///
/// Variants about a file's content carry the absolute byte offset where the problem was
/// found, so that a user can look at it with a hex dump.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system call on a file failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done ("open", "map", "write", ...).
        action: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A write met a limit on space: the device or a quota is full, or the file reached
    /// the process's file-size limit (`RLIMIT_FSIZE`, `ulimit -f`) or the largest file its
    /// file system holds. A journal cuts the partial record back before this is returned;
    /// a rewrite leaves its temporary file behind for no one (it is removed).
    #[error("{action} {path}: {limit}")]
    SpaceLimit {
        /// What was being done ("append to journal", "write", ...).
        action: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// Which limit was met.
        limit: SpaceLimit,
        /// The underlying error (ENOSPC, EDQUOT or EFBIG).
        source: io::Error,
    },
    /// A journal write failed and the partial record it left could not be cut back. The
    /// record is incomplete or uncommitted: the next writer cuts it as a torn tail or
    /// rolls its transaction back (`hotpatch recover`); the target file was not written.
    #[error("{cause}; cutting the partial record back from the journal {path} failed too")]
    JournalNotCut {
        /// The journal.
        path: PathBuf,
        /// The write's error.
        cause: Box<Error>,
        /// Why the cut failed.
        source: io::Error,
    },
    /// The file does not start with the four bytes `GGUF`.
    #[error("not a GGUF file: magic is {found:02x?}, expected \"GGUF\"")]
    BadMagic {
        /// The first four bytes found.
        found: [u8; 4],
    },
    /// The version field names a version this reader does not handle.
    #[error("unsupported GGUF version {version} at offset {offset}")]
    UnsupportedVersion {
        /// The version read.
        version: u32,
        /// Offset of the version field.
        offset: u64,
    },
    /// The version field reads as a byte-swapped small number: a big-endian GGUF.
    #[error("big-endian GGUF (version {version}) is not supported")]
    BigEndian {
        /// The version, once byte-swapped.
        version: u32,
    },
    /// The file ends before a field that must be there.
    #[error("file truncated: {what} at offset {offset} needs {needed} bytes, {available} left")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Where the field starts.
        offset: u64,
        /// Bytes the field needs.
        needed: u64,
        /// Bytes left in the file from `offset`.
        available: u64,
    },
    /// A count or length read from the file cannot fit in what is left of the file.
    #[error("{what} of {count} at offset {offset} cannot fit in the {available} bytes left")]
    CountTooLarge {
        /// What the count counts.
        what: &'static str,
        /// The count read.
        count: u64,
        /// Offset of the count field.
        offset: u64,
        /// Bytes left in the file after the count field.
        available: u64,
    },
    /// A string is not valid UTF-8.
    #[error("string at offset {offset} is not valid UTF-8")]
    InvalidUtf8 {
        /// Offset of the string's bytes.
        offset: u64,
    },
    /// A metadata value type id is not one of the thirteen GGUF value types.
    #[error("unknown metadata value type {type_id} at offset {offset}")]
    UnknownValueType {
        /// The id read.
        type_id: u32,
        /// Offset of the type field.
        offset: u64,
    },
    /// A key or tensor name of the source file is not valid UTF-8, and a rewrite, which
    /// writes keys and names as text, cannot keep it unchanged.
    #[error(
        "{what} is not valid UTF-8: a rewrite cannot keep it unchanged (edit the file in place instead)"
    )]
    NameNotUtf8 {
        /// The key or tensor, with U+FFFD for the bad bytes, and its offset.
        what: String,
    },
    /// A boolean byte is neither 0 nor 1.
    #[error("boolean at offset {offset} holds {byte}, expected 0 or 1")]
    InvalidBool {
        /// The byte read.
        byte: u8,
        /// Its offset.
        offset: u64,
    },
    /// Arrays are nested deeper than the reader allows.
    #[error("arrays nested deeper than {limit} levels at offset {offset}")]
    NestingTooDeep {
        /// The nesting limit.
        limit: usize,
        /// Offset of the array that crossed it.
        offset: u64,
    },
    /// A metadata key appears twice.
    #[error("duplicate metadata key {key:?} at offset {offset}")]
    DuplicateKey {
        /// The key.
        key: String,
        /// Offset of the second occurrence.
        offset: u64,
    },
    /// `general.alignment` is zero, not a power of two, or not a UINT32.
    #[error("invalid general.alignment at offset {offset}: {reason}")]
    InvalidAlignment {
        /// Why it was refused.
        reason: String,
        /// Offset of the value.
        offset: u64,
    },
    /// Two tensor infos share a name.
    #[error("duplicate tensor name {name:?} at offset {offset}")]
    DuplicateTensor {
        /// The name.
        name: String,
        /// Offset of the second tensor info.
        offset: u64,
    },
    /// A tensor has more dimensions than ggml supports.
    #[error("tensor {tensor:?} at offset {offset} has {n_dims} dimensions, at most 4 are allowed")]
    TooManyDims {
        /// The tensor.
        tensor: String,
        /// The dimension count read.
        n_dims: u32,
        /// Offset of the n_dims field.
        offset: u64,
    },
    /// A tensor names a ggml type id that does not exist.
    #[error("tensor {tensor:?} has unknown ggml type id {type_id} at offset {offset}")]
    UnknownTensorType {
        /// The tensor.
        tensor: String,
        /// The id read.
        type_id: u32,
        /// Offset of the type field.
        offset: u64,
    },
    /// A tensor's shape is invalid: its element or byte count overflows, or its first
    /// dimension is not a whole number of blocks of its type.
    #[error("tensor {tensor:?} at offset {offset} has an invalid shape {dims:?}: {reason}")]
    InvalidShape {
        /// The tensor.
        tensor: String,
        /// Its dimensions, fastest first.
        dims: Vec<u64>,
        /// Why it was refused.
        reason: &'static str,
        /// Offset of the tensor info.
        offset: u64,
    },
    /// A tensor's data offset is not a multiple of the alignment.
    #[error("tensor {tensor:?} data at offset {offset} is not aligned to {alignment} bytes")]
    MisalignedTensor {
        /// The tensor.
        tensor: String,
        /// Its absolute data offset.
        offset: u64,
        /// The file's alignment.
        alignment: u64,
    },
    /// A tensor's data extends past the end of the file.
    #[error(
        "tensor {tensor:?} data [{start}, {end}) runs past the end of the file ({file_len} bytes)"
    )]
    TensorOutOfBounds {
        /// The tensor.
        tensor: String,
        /// Absolute start of its data.
        start: u64,
        /// Absolute end of its data.
        end: u64,
        /// The file's length.
        file_len: u64,
    },
    /// Two tensors' data ranges overlap.
    #[error("tensor {second:?} data at offset {offset} overlaps tensor {first:?}")]
    OverlappingTensors {
        /// The tensor that starts first.
        first: String,
        /// The tensor that starts inside it.
        second: String,
        /// Absolute start of the second tensor's data.
        offset: u64,
    },
    /// A value given to the writer cannot be encoded.
    #[error("cannot write: {0}")]
    InvalidWrite(String),
    /// No tensor has this name.
    #[error("no tensor named {0:?}")]
    NoSuchTensor(String),
    /// No metadata key has this name.
    #[error("no metadata key {0:?}")]
    NoSuchKey(String),
    /// A metadata value has another type than the one asked for.
    #[error("metadata key {key:?} is {found}, not {expected}")]
    WrongValueType {
        /// The key.
        key: String,
        /// The type asked for.
        expected: &'static str,
        /// The type found.
        found: &'static str,
    },
    /// A byte range is not inside the bytes it addresses.
    #[error("range {start}..{end} is outside 0..{limit}")]
    OutOfRange {
        /// Start of the range.
        start: u64,
        /// End of the range.
        end: u64,
        /// Length of what it addresses.
        limit: u64,
    },
    /// A range relative to a tensor's data crosses its end.
    #[error("range {start}..{end} crosses the end of tensor {tensor:?} ({n_bytes} bytes)")]
    OutsideTensor {
        /// The tensor.
        tensor: String,
        /// Start of the range, relative to the tensor's data.
        start: u64,
        /// End of the range, relative to the tensor's data.
        end: u64,
        /// The tensor's byte count.
        n_bytes: u64,
    },
    /// Two writes of one transaction overlap.
    #[error("writes {first:?} and {second:?} overlap")]
    OverlappingWrites {
        /// The first write's range.
        first: std::ops::Range<u64>,
        /// The second write's range.
        second: std::ops::Range<u64>,
    },
    /// An operand of a byte operation is invalid.
    #[error("invalid operand: {0}")]
    InvalidOperand(String),
    /// A search pattern is empty or longer than the bytes searched.
    #[error("a pattern of {pattern_len} bytes cannot be searched for in {searched_len} bytes")]
    BadPattern {
        /// The pattern's length.
        pattern_len: u64,
        /// The length searched.
        searched_len: u64,
    },
    /// The kernel refused to lock pages in memory: the mapping is larger than the
    /// process may lock (`RLIMIT_MEMLOCK`, `ulimit -l`) and it lacks `CAP_IPC_LOCK`.
    #[error(
        "mlock of {bytes} bytes refused (RLIMIT_MEMLOCK is {}); raise `ulimit -l` or grant CAP_IPC_LOCK",
        limit.map_or_else(|| "unknown".to_owned(), |l| format!("{l} bytes"))
    )]
    MemoryLockRefused {
        /// Bytes asked for.
        bytes: u64,
        /// The soft limit, when known.
        limit: Option<u64>,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// The file cannot be opened for writing.
    #[error("{path} is read-only")]
    ReadOnly {
        /// The file.
        path: PathBuf,
    },
    /// The journal cannot be read.
    #[error("journal {path} is corrupt at offset {offset}: {reason}")]
    CorruptJournal {
        /// The journal.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A transaction is still unfinished (recover the file first).
    #[error("journal {path} has unfinished transaction {id}: run recovery first")]
    UnfinishedTransaction {
        /// The journal.
        path: PathBuf,
        /// The transaction.
        id: u64,
    },
    /// Another writer holds the journal (another hotpatch process editing the same file),
    /// or it was opened read-only.
    #[error("journal {path} is in use by another writer{}", holder.as_ref().map(|h| format!(": {h}")).unwrap_or_default())]
    JournalBusy {
        /// The journal.
        path: PathBuf,
        /// Who holds it, when that can be found out: the process id and what the process
        /// said about itself (a `hotpatch serve` names its admin API).
        holder: Option<String>,
    },
    /// No transaction has this id.
    #[error("no transaction {0}")]
    NoSuchTransaction(u64),
    /// The transaction did not commit, so there is nothing to revert.
    #[error("transaction {0} did not commit")]
    NotCommitted(u64),
    /// The transaction was already reverted.
    #[error("transaction {0} was already reverted")]
    AlreadyReverted(u64),
    /// The transaction carries a note of the program that made it (a live model's
    /// patches, which later patches may lie over): only that program can revert it
    /// correctly.
    #[error(
        "transaction {0} was made by a live model (its patches may lie under later ones): revert it through the live model, as `hotpatch revert` does"
    )]
    NotedTransaction(u64),
    /// The bytes a transaction wrote have changed since: reverting would destroy
    /// someone else's change.
    #[error(
        "cannot revert transaction {transaction}: the bytes at offset {offset} changed since it wrote them"
    )]
    RevertMismatch {
        /// The transaction.
        transaction: u64,
        /// The first write whose bytes changed.
        offset: u64,
    },
    /// A named patch overlaps an applied one of equal or higher priority.
    #[error("patch {patch:?} conflicts with applied patch {applied:?} on bytes {start}..{end}")]
    PatchConflict {
        /// The patch refused.
        patch: String,
        /// The applied patch in the way.
        applied: String,
        /// Start of the overlap.
        start: u64,
        /// End of the overlap.
        end: u64,
    },
    /// The bytes a named patch expects are not there.
    #[error("patch {patch:?}: the target bytes are not the expected ones")]
    UnexpectedBytes {
        /// The patch.
        patch: String,
    },
    /// A manifest line cannot be read.
    #[error("manifest line {line}: {reason}")]
    InvalidManifest {
        /// The line number, from 1.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A structural edit cannot be made.
    #[error("invalid edit: {0}")]
    InvalidEdit(String),
    /// `HOTPATCH_SIMD` names no SIMD level of the codecs.
    #[error("{SIMD_ENV}={value:?} is not a SIMD level: expected scalar, neon, avx2 or avx512", SIMD_ENV = crate::codec::SIMD_ENV)]
    UnknownSimdLevel {
        /// The variable's value.
        value: String,
    },
    /// A codec operation is not available for this ggml type.
    #[error("{operation} is not supported for ggml type {ggml_type}")]
    UnsupportedType {
        /// The tensor's type.
        ggml_type: GgmlType,
        /// What was asked ("dequantize", "quantize", ...).
        operation: &'static str,
    },
    /// ggml quantizes this type only with importance weights (its quantizer asserts
    /// them, and llama-quantize refuses the type without an importance matrix).
    #[error(
        "ggml quantizes {ggml_type} only with importance weights: give an importance matrix \
         from llama-imatrix (--imatrix FILE) that covers this tensor"
    )]
    ImportanceRequired {
        /// The type to quantize to.
        ggml_type: GgmlType,
    },
    /// Tensor data is not a whole number of blocks of its type.
    #[error("{len} bytes of {ggml_type} data are not a whole number of {block_bytes}-byte blocks")]
    PartialBlock {
        /// The tensor's type.
        ggml_type: GgmlType,
        /// Length of the data given.
        len: u64,
        /// Bytes per block of the type.
        block_bytes: u64,
    },
    /// An element range does not start and end on block boundaries.
    #[error(
        "element range {start}..{end} of a {ggml_type} tensor is not aligned to its {block_len}-element blocks"
    )]
    UnalignedRange {
        /// The tensor's type.
        ggml_type: GgmlType,
        /// First element of the range.
        start: u64,
        /// One past the last element of the range.
        end: u64,
        /// Elements per block of the type.
        block_len: u64,
    },
    /// An element range is reversed or runs past the end of the tensor.
    #[error(
        "element range {start}..{end} is outside the {n_elements} elements of a {ggml_type} tensor"
    )]
    RangeOutOfBounds {
        /// The tensor's type.
        ggml_type: GgmlType,
        /// First element of the range.
        start: u64,
        /// One past the last element of the range.
        end: u64,
        /// Elements in the tensor.
        n_elements: u64,
    },
    /// A buffer of values does not hold as many elements as the range it goes with.
    #[error("{what} holds {found} elements, the range {start}..{end} needs {expected}")]
    LengthMismatch {
        /// Which buffer.
        what: &'static str,
        /// Elements the range needs.
        expected: u64,
        /// Elements the buffer holds.
        found: u64,
        /// First element of the range.
        start: u64,
        /// One past the last element of the range.
        end: u64,
    },
    /// A value to be quantized (or written) is NaN or infinite; nothing was written.
    #[error("value at element {index} is not finite ({value}); nothing was written")]
    NonFiniteInput {
        /// Element offset of the value in the tensor.
        index: u64,
        /// The value.
        value: f32,
    },
    /// An importance weight is negative, NaN or infinite; nothing was written.
    #[error(
        "importance weight of column {column} is {value}: weights must be finite and not negative"
    )]
    BadImportance {
        /// The column (index within one row).
        column: u64,
        /// The weight.
        value: f32,
    },
    /// An importance matrix file (llama-imatrix's GGUF or legacy `.dat` output) is
    /// truncated or malformed.
    #[error("importance matrix at offset {offset}: {reason}")]
    BadImatrix {
        /// Byte offset in the file where the problem was found.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// An importance matrix does not fit the model: an entry names a tensor the model
    /// lacks, or its size is not the tensor's row length (times its experts).
    #[error("importance matrix entry {tensor:?} does not fit the model: {reason}")]
    ImatrixMismatch {
        /// The entry's tensor name.
        tensor: String,
        /// What does not match.
        reason: String,
    },
    /// A scale field would not fit in its storage format (f16 overflows to infinity, or
    /// an 8-bit exponent leaves its range); nothing was written.
    #[error(
        "{ggml_type} block {block} scale {value} does not fit in its field; nothing was written"
    )]
    ScaleOverflow {
        /// The tensor's type.
        ggml_type: GgmlType,
        /// Index of the block in the tensor.
        block: u64,
        /// The scale that did not fit.
        value: f32,
    },
    /// A `.npy` file cannot be read or written by this codec.
    #[error("npy {}: {reason}", path.display())]
    Npy {
        /// The file concerned (empty for an in-memory buffer).
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A transform's parameters are invalid (a non-finite factor, a reversed clamp).
    #[error("invalid {ggml_type} transform: {reason}")]
    InvalidTransform {
        /// The tensor's type.
        ggml_type: GgmlType,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A block range names blocks the model does not have.
    #[error("layers {start}..{end} are out of range: the model has {blocks} blocks")]
    LayersOutOfRange {
        /// First block of the range.
        start: u64,
        /// One past the last block of the range.
        end: u64,
        /// Blocks in the model.
        blocks: u64,
    },
    /// Copies of blocks would be inserted past the end of the model.
    #[error("cannot insert blocks at {at}: the model has {blocks} blocks (at most {blocks})")]
    DuplicationPastEnd {
        /// The insertion point asked for.
        at: u64,
        /// Blocks in the model.
        blocks: u64,
    },
    /// A tensor added to a file has the name of one already there.
    #[error("the destination already has a tensor named {0:?}")]
    TensorExists(String),
    /// A grafted tensor does not fit the destination model.
    #[error("tensor {tensor:?} does not fit the destination: {reason}")]
    GraftMismatch {
        /// The tensor, under its name in the destination.
        tensor: String,
        /// Why.
        reason: String,
    },
    /// A LoRA adapter file is not a LoRA adapter in llama.cpp's format.
    #[error("not a LoRA adapter: {0}")]
    NotAnAdapter(String),
    /// A LoRA adapter was made for another model (architecture or tensor shapes).
    #[error("the adapter does not fit the model: {0}")]
    AdapterMismatch(String),
    /// A LoRA adapter has an `A` matrix without its `B` (or the other way round).
    #[error("adapter tensor {present:?} has no {missing:?}")]
    MissingLoraPair {
        /// The tensor found.
        present: String,
        /// The tensor missing.
        missing: String,
    },
    /// A direction vector does not have the model's embedding length.
    #[error("direction {which} has {found} values, the model's n_embd is {expected}")]
    DirectionLength {
        /// Which direction (a layer, or the file).
        which: String,
        /// Values found.
        found: u64,
        /// The embedding length.
        expected: u64,
    },
    /// A direction vector has zero norm (or is not finite), so it names no direction.
    #[error("direction {0} has zero norm or non-finite values")]
    ZeroDirection(String),
    /// A direction file cannot be used.
    #[error("direction file: {0}")]
    InvalidDirection(String),
    /// A file name that should name a shard does not end in `-NNNNN-of-NNNNN.gguf`.
    #[error("{} is not named as a shard (NAME-00001-of-00003.gguf)", path.display())]
    NotAShardName {
        /// The file.
        path: PathBuf,
    },
    /// A rewrite of this shard set was interrupted after its new shards were complete:
    /// `hotpatch recover` finishes it.
    #[error(
        "a rewrite of this shard set was interrupted ({} is there): run `hotpatch recover` on any shard to finish it",
        marker.display()
    )]
    InterruptedSetRewrite {
        /// The marker the interrupted rewrite left.
        marker: PathBuf,
    },
    /// A set rewrite's marker cannot be read.
    #[error("{}: not a valid set rewrite marker: {reason}", path.display())]
    CorruptSetRewriteMarker {
        /// The marker.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A shard of a set is missing: a gap in the set.
    #[error("shard {} of {count} is missing: {}", index + 1, path.display())]
    ShardMissing {
        /// The file the set needs.
        path: PathBuf,
        /// Its 0-based number.
        index: u32,
        /// Shards in the set.
        count: u32,
    },
    /// A shard lacks a split key, or holds it with the wrong type.
    #[error("{}: no valid {key} key, so it is not a shard of a set", path.display())]
    NotAShard {
        /// The file.
        path: PathBuf,
        /// The missing key.
        key: &'static str,
    },
    /// A shard's `split.no` is not its place in the set: a duplicate or misplaced shard.
    #[error("{}: split.no is {found}, but the file is shard {expected} (0-based) of its set", path.display())]
    ShardNumberMismatch {
        /// The file.
        path: PathBuf,
        /// Its place in the set, from its name.
        expected: u32,
        /// The `split.no` it holds.
        found: u64,
    },
    /// A shard's `split.count` disagrees with the set's.
    #[error("{}: split.count is {found}, but the set has {expected} shards", path.display())]
    ShardCountMismatch {
        /// The file.
        path: PathBuf,
        /// Shards in the set.
        expected: u32,
        /// The `split.count` it holds.
        found: u64,
    },
    /// A shard's `split.tensors.count` disagrees with the set's, or the set's shards do
    /// not hold that many tensors: a shard from another set.
    #[error("{}: split.tensors.count is {found}, but the set has {expected} tensors", path.display())]
    ShardTensorCountMismatch {
        /// The file.
        path: PathBuf,
        /// The set's tensor count (the first shard's key, or the sum over the shards).
        expected: u64,
        /// What this file says or holds.
        found: u64,
    },
    /// Two shards of a set hold a tensor of the same name.
    #[error("tensor {name:?} is in both {} and {}", first.display(), second.display())]
    DuplicateShardTensor {
        /// The tensor.
        name: String,
        /// The shard that holds it first.
        first: PathBuf,
        /// The shard that holds it again.
        second: PathBuf,
    },
    /// A shard of a set is not a valid GGUF file.
    #[error("shard {}", path.display())]
    InShard {
        /// The shard.
        path: PathBuf,
        /// What is wrong with it.
        source: Box<Error>,
    },
    /// A split request cannot be carried out as asked.
    #[error("cannot split: {reason}")]
    InvalidSplit {
        /// Why.
        reason: String,
    },
    /// The output of a merge already exists (llama-gguf-split refuses it too).
    #[error("{} already exists", path.display())]
    OutputExists {
        /// The file.
        path: PathBuf,
    },
    /// A split or merge input is GGUF v1, whose length fields ggml's reader no longer
    /// accepts.
    #[error("{}: GGUF v{version} cannot be split or merged; v2 and v3 can", path.display())]
    SplitVersion {
        /// The file.
        path: PathBuf,
        /// Its version.
        version: u32,
    },
    /// The file changed between the plan and its apply: the plan no longer says what
    /// applying it would do, so it is refused (plan again).
    #[error("{}: the file changed since the plan was made ({what}); plan again", path.display())]
    StalePlan {
        /// The file.
        path: PathBuf,
        /// What changed: its length, its modification time or the bytes the plan read.
        what: String,
    },
    /// A codec error, with the name of the tensor it happened in.
    #[error("tensor {tensor:?}")]
    InTensor {
        /// The tensor.
        tensor: String,
        /// What went wrong.
        source: Box<Error>,
    },
}

/// The result type of byte-tier.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Names the tensor this error happened in, for errors from functions that see only
    /// a tensor's bytes (the codecs). An error that already names a tensor is kept.
    pub fn in_tensor(self, tensor: impl Into<String>) -> Error {
        match self {
            Error::InTensor { .. } => self,
            other => Error::InTensor {
                tensor: tensor.into(),
                source: Box::new(other),
            },
        }
    }

    /// An operating-system error on a file; one that says a space limit was met becomes
    /// [`Error::SpaceLimit`], naming the limit.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Error {
        match SpaceLimit::of(&source) {
            Some(limit) => Error::SpaceLimit {
                action,
                path: path.into(),
                limit,
                source,
            },
            None => Error::Io {
                action,
                path: path.into(),
                source,
            },
        }
    }

    /// The same error about another path (a writer's `<output>` stand-in replaced by
    /// the file it wrote).
    pub(crate) fn with_path(self, path: &std::path::Path) -> Error {
        match self {
            Error::Io { action, source, .. } | Error::SpaceLimit { action, source, .. } => {
                Error::io(action, path, source)
            }
            other => other,
        }
    }
}

/// A limit on space that a write met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SpaceLimit {
    /// No space left on the device (ENOSPC).
    DeviceFull,
    /// The user's disk quota is used up (EDQUOT).
    QuotaExceeded,
    /// The process's file-size limit (`RLIMIT_FSIZE`, set by `ulimit -f`), in bytes
    /// (EFBIG).
    FileSizeLimit(u64),
    /// The largest file the file system holds (EFBIG with no process limit set).
    FileSystemMaximum,
}

impl SpaceLimit {
    /// The limit an operating-system error says was met, if any.
    pub fn of(error: &io::Error) -> Option<SpaceLimit> {
        match error.raw_os_error()? {
            libc::ENOSPC => Some(SpaceLimit::DeviceFull),
            libc::EDQUOT => Some(SpaceLimit::QuotaExceeded),
            libc::EFBIG => match rlimit::getrlimit(rlimit::Resource::FSIZE) {
                Ok((soft, _)) if soft != rlimit::INFINITY => Some(SpaceLimit::FileSizeLimit(soft)),
                _ => Some(SpaceLimit::FileSystemMaximum),
            },
            _ => None,
        }
    }
}

impl std::fmt::Display for SpaceLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpaceLimit::DeviceFull => write!(f, "no space left on the device (ENOSPC)"),
            SpaceLimit::QuotaExceeded => write!(f, "the disk quota is used up (EDQUOT)"),
            SpaceLimit::FileSizeLimit(bytes) => write!(
                f,
                "the file reached this process's file-size limit of {bytes} bytes \
                 (RLIMIT_FSIZE, `ulimit -f`)"
            ),
            SpaceLimit::FileSystemMaximum => {
                write!(
                    f,
                    "the file reached the largest size its file system holds (EFBIG)"
                )
            }
        }
    }
}
