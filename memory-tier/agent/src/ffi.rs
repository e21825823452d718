//! ggml's and llama.cpp's C interface as the agent uses it: the tensor struct it reads,
//! and the real functions behind the ones it interposes, found with `dlsym`.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::OnceLock;

/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: usize = 4;
const MAX_OP_PARAMS: usize = 64;
const MAX_SRC: usize = 10;
/// ggml's `GGML_MAX_NAME`.
pub const MAX_NAME: usize = 64;

/// `struct ggml_tensor` of the ggml this agent was built for (checked at load by
/// [`crate::layout::check`] before any field is trusted).
#[repr(C)]
#[derive(Debug)]
pub struct Tensor {
    pub type_: c_int,
    pub buffer: *mut c_void,
    pub ne: [i64; MAX_DIMS],
    pub nb: [usize; MAX_DIMS],
    pub op: c_int,
    pub op_params: [i32; MAX_OP_PARAMS / 4],
    pub flags: i32,
    pub src: [*mut Tensor; MAX_SRC],
    pub view_src: *mut Tensor,
    pub view_offs: usize,
    pub data: *mut c_void,
    pub name: [c_char; MAX_NAME],
    pub extra: *mut c_void,
    pub padding: [c_char; 8],
}

/// `struct ggml_init_params`.
#[repr(C)]
#[derive(Debug)]
pub struct InitParams {
    pub mem_size: usize,
    pub mem_buffer: *mut c_void,
    pub no_alloc: bool,
}

/// `struct llama_batch`, passed by value to `llama_decode` and `llama_encode`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Batch {
    pub n_tokens: i32,
    pub token: *mut i32,
    pub embd: *mut f32,
    pub pos: *mut i32,
    pub n_seq_id: *mut i32,
    pub seq_id: *mut *mut i32,
    pub logits: *mut i8,
}

/// `GGML_BACKEND_BUFFER_USAGE_WEIGHTS`.
pub const USAGE_WEIGHTS: c_int = 1;
/// `GGML_BACKEND_DEVICE_TYPE_CPU`.
pub const DEVICE_CPU: c_int = 0;
/// `GGML_BACKEND_DEVICE_TYPE_ACCEL`.
pub const DEVICE_ACCEL: c_int = 3;

pub type TensorAllocFn = unsafe extern "C" fn(*mut c_void, *mut Tensor, *mut c_void) -> c_int;
pub type TensorSetFn = unsafe extern "C" fn(*mut Tensor, *const c_void, usize, usize);
pub type TensorSetAsyncFn =
    unsafe extern "C" fn(*mut c_void, *mut Tensor, *const c_void, usize, usize);
pub type TensorGetFn = unsafe extern "C" fn(*const Tensor, *mut c_void, usize, usize);
pub type DecodeFn = unsafe extern "C" fn(*mut c_void, Batch) -> i32;
pub type ProcessFn = unsafe extern "C" fn(*mut c_void, c_int, *mut c_void) -> i32;
pub type CtxFn = unsafe extern "C" fn(*mut c_void);
type BufferNameFn = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type BufferBoolFn = unsafe extern "C" fn(*mut c_void) -> bool;
type BufferIntFn = unsafe extern "C" fn(*mut c_void) -> c_int;
type BufferPtrFn = unsafe extern "C" fn(*mut c_void) -> *mut c_void;
type NameFn = unsafe extern "C" fn(*const Tensor) -> *const c_char;
type SizeFn = unsafe extern "C" fn(*const Tensor) -> usize;
type I64Fn = unsafe extern "C" fn(*const Tensor) -> i64;
type DataFn = unsafe extern "C" fn(*const Tensor) -> *mut c_void;
type TypeNameFn = unsafe extern "C" fn(c_int) -> *const c_char;
type InitFn = unsafe extern "C" fn(InitParams) -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*mut c_void);
type New2dFn = unsafe extern "C" fn(*mut c_void, c_int, i64, i64) -> *mut Tensor;
type SetNameFn = unsafe extern "C" fn(*mut Tensor, *const c_char) -> *mut Tensor;
type StrFn = unsafe extern "C" fn() -> *const c_char;

/// Looks `name` up after this library (`RTLD_NEXT`): the function this library hides.
fn next(name: &CStr) -> *mut c_void {
    // SAFETY: dlsym with a NUL-terminated name is always safe to call; the result is
    // checked for null by every user.
    unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) }
}

/// Looks `name` up in the whole process.
fn global(name: &CStr) -> *mut c_void {
    // SAFETY: as in `next`.
    unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) }
}

macro_rules! lookup {
    ($how:ident, $name:literal, $ty:ty) => {{
        let p = $how($name);
        if p.is_null() {
            None
        } else {
            // SAFETY: the symbol is the C function of that name, whose signature is the
            // one `$ty` spells (ggml.h, ggml-backend.h and llama.h of the pinned version).
            Some(unsafe { std::mem::transmute::<*mut c_void, $ty>(p) })
        }
    }};
}

/// The real functions, resolved once.
#[derive(Debug)]
pub struct Real {
    pub tensor_alloc: Option<TensorAllocFn>,
    pub tensor_set: Option<TensorSetFn>,
    pub tensor_set_async: Option<TensorSetAsyncFn>,
    pub tensor_get: Option<TensorGetFn>,
    pub decode: Option<DecodeFn>,
    pub encode: Option<DecodeFn>,
    pub process: Option<ProcessFn>,
    pub synchronize: Option<CtxFn>,
    pub free: Option<CtxFn>,
    pub model_free: Option<CtxFn>,
    pub buffer_name: Option<BufferNameFn>,
    pub buffer_is_host: Option<BufferBoolFn>,
    pub buffer_usage: Option<BufferIntFn>,
    pub buffer_type: Option<BufferPtrFn>,
    pub buft_device: Option<BufferPtrFn>,
    pub dev_type: Option<BufferIntFn>,
    pub get_name: Option<NameFn>,
    pub nbytes: Option<SizeFn>,
    pub nelements: Option<I64Fn>,
    pub get_data: Option<DataFn>,
    pub type_name: Option<TypeNameFn>,
    pub init: Option<InitFn>,
    pub ctx_free: Option<FreeFn>,
    pub new_2d: Option<New2dFn>,
    pub set_name: Option<SetNameFn>,
    pub ggml_version: Option<StrFn>,
    pub ggml_commit: Option<StrFn>,
}

/// The real functions.
pub fn real() -> &'static Real {
    static REAL: OnceLock<Real> = OnceLock::new();
    REAL.get_or_init(|| Real {
        tensor_alloc: lookup!(next, c"ggml_backend_tensor_alloc", TensorAllocFn),
        tensor_set: lookup!(next, c"ggml_backend_tensor_set", TensorSetFn),
        tensor_set_async: lookup!(next, c"ggml_backend_tensor_set_async", TensorSetAsyncFn),
        tensor_get: lookup!(global, c"ggml_backend_tensor_get", TensorGetFn),
        decode: lookup!(next, c"llama_decode", DecodeFn),
        encode: lookup!(next, c"llama_encode", DecodeFn),
        process: lookup!(next, c"llama_process", ProcessFn),
        synchronize: lookup!(global, c"llama_synchronize", CtxFn),
        free: lookup!(next, c"llama_free", CtxFn),
        model_free: lookup!(next, c"llama_model_free", CtxFn),
        buffer_name: lookup!(global, c"ggml_backend_buffer_name", BufferNameFn),
        buffer_is_host: lookup!(global, c"ggml_backend_buffer_is_host", BufferBoolFn),
        buffer_usage: lookup!(global, c"ggml_backend_buffer_get_usage", BufferIntFn),
        buffer_type: lookup!(global, c"ggml_backend_buffer_get_type", BufferPtrFn),
        buft_device: lookup!(global, c"ggml_backend_buft_get_device", BufferPtrFn),
        dev_type: lookup!(global, c"ggml_backend_dev_type", BufferIntFn),
        get_name: lookup!(global, c"ggml_get_name", NameFn),
        nbytes: lookup!(global, c"ggml_nbytes", SizeFn),
        nelements: lookup!(global, c"ggml_nelements", I64Fn),
        get_data: lookup!(global, c"ggml_get_data", DataFn),
        type_name: lookup!(global, c"ggml_type_name", TypeNameFn),
        init: lookup!(global, c"ggml_init", InitFn),
        ctx_free: lookup!(global, c"ggml_free", FreeFn),
        new_2d: lookup!(global, c"ggml_new_tensor_2d", New2dFn),
        set_name: lookup!(global, c"ggml_set_name", SetNameFn),
        ggml_version: lookup!(global, c"ggml_version", StrFn),
        ggml_commit: lookup!(global, c"ggml_commit", StrFn),
    })
}

/// A C string as an owned string (`None` for null).
///
/// # Safety
/// `p` is null or points to a NUL-terminated string that lives through the call.
pub unsafe fn string(p: *const c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: the caller's contract.
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// A `const char *(void)` function's answer.
pub fn call_str(f: Option<StrFn>) -> Option<String> {
    // SAFETY: the function returns a static string (ggml_version, ggml_commit).
    f.and_then(|f| unsafe { string(f()) })
}

/// llama.cpp's build number and commit, which its common library exports as data.
pub fn llama_build() -> (Option<i64>, Option<String>) {
    let number = global(c"LLAMA_BUILD_NUMBER") as *const c_int;
    let commit = global(c"LLAMA_COMMIT") as *const *const c_char;
    // SAFETY: the symbols are `int LLAMA_BUILD_NUMBER` and `const char * LLAMA_COMMIT`
    // (common/build-info.cpp), initialized before main.
    let number = (!number.is_null()).then(|| i64::from(unsafe { *number }));
    // SAFETY: as above; the pointer it holds is a static string or null.
    let commit = (!commit.is_null())
        .then(|| unsafe { string(*commit) })
        .flatten();
    (number, commit)
}
