//! `libhotpatch_agent.so`: loaded into an unmodified, dynamically linked llama-server
//! with `LD_PRELOAD`, it lets hotpatch write the weights the server holds in any buffer.
//!
//! It interposes the calls through which llama.cpp places every weight
//! (`ggml_backend_tensor_alloc` for views of the file mapping, `ggml_backend_tensor_set`
//! and `ggml_backend_tensor_set_async` for copies into host, repacked, GPU and remote
//! buffers) and forwards each to the real function unchanged, learning every weight
//! tensor's name, type, shape, size and buffer. It also interposes the forward-pass
//! entry points (`llama_process`, `llama_decode`, `llama_encode`), so that a write lands
//! between passes and never during one. A control thread serves hotpatch on the Unix
//! socket named by `HOTPATCH_AGENT_SOCKET` (see `server`).
//!
//! Before it trusts a field of `struct ggml_tensor`, it checks that ggml's layout is the
//! one it was built for (`layout`); if not, it stays inert and says why on stderr.

mod ffi;
mod layout;
mod maps;
mod server;
mod state;

use std::ffi::{c_int, c_void};
use std::sync::OnceLock;

use ffi::{Batch, Tensor, real};
use state::{Agent, Seen, classify};

/// The agent's state, made on first use.
fn agent() -> &'static Agent {
    static AGENT: OnceLock<Agent> = OnceLock::new();
    AGENT.get_or_init(Agent::default)
}

/// `None` when the agent works, or why it is inert. Checked once, at the first call the
/// agent sees (by then ggml's libraries are loaded and initialized).
fn inert() -> Option<&'static str> {
    agent()
        .inert
        .get_or_init(|| match layout::check(real()) {
            Ok(()) => None,
            Err(why) => {
                eprintln!(
                    "hotpatch agent: ggml's tensor layout is not the one this agent was built for ({why}); staying inert, every call is forwarded unchanged"
                );
                Some(why)
            }
        })
        .as_deref()
}

/// Starts the control thread when the library is loaded.
extern "C" fn on_load() {
    server::start(agent());
}

#[used]
#[unsafe(link_section = ".init_array")]
static ON_LOAD: extern "C" fn() = on_load;

/// Learns a weight tensor from a placement call on `buffer`.
///
/// # Safety
/// `tensor` is a live `struct ggml_tensor *` and `buffer` a live buffer or null.
unsafe fn observe(tensor: *mut Tensor, buffer: *mut c_void) {
    if tensor.is_null() || buffer.is_null() || inert().is_some() {
        return;
    }
    let r = real();
    let (Some(usage), Some(is_host), Some(buffer_name), Some(nbytes), Some(get_name)) = (
        r.buffer_usage,
        r.buffer_is_host,
        r.buffer_name,
        r.nbytes,
        r.get_name,
    ) else {
        return;
    };
    // SAFETY: buffer is live (the caller's contract).
    if unsafe { usage(buffer) } != ffi::USAGE_WEIGHTS {
        return;
    }
    let a = agent();
    if a.registry().knows(tensor as usize) {
        // A later chunk of a chunked upload: the tensor is known.
        return;
    }
    // SAFETY: tensor is live and its layout was checked (`inert` is None).
    let t = unsafe { &*tensor };
    // SAFETY: as above; these accessors read the tensor.
    let (name, size) = unsafe { (ffi::string(get_name(tensor)), nbytes(tensor)) };
    let Some(name) = name else { return };
    // SAFETY: buffer is live.
    let host = unsafe { is_host(buffer) };
    // SAFETY: buffer is live; the name is a static string of its type.
    let bname = unsafe { ffi::string(buffer_name(buffer)) }.unwrap_or_default();
    let device_type = match (r.buffer_type, r.buft_device, r.dev_type) {
        (Some(buft), Some(dev_of), Some(dev_type)) => {
            // SAFETY: buffer is live; its type and device live as long as the backend.
            let dev = unsafe { dev_of(buft(buffer)) };
            // SAFETY: dev is a registered device when not null.
            (!dev.is_null()).then(|| unsafe { dev_type(dev) })
        }
        _ => None,
    };
    let file = if host && !t.data.is_null() {
        std::fs::read_to_string("/proc/self/maps")
            .ok()
            .and_then(|m| maps::find(&m, t.data as usize))
    } else {
        None
    };
    let (access, file) = classify(host, device_type, &bname, file.as_ref());
    let type_name = r
        .type_name
        // SAFETY: ggml_type_name returns a static string for any type id.
        .and_then(|f| unsafe { ffi::string(f(t.type_)) })
        .unwrap_or_default();
    let entry = memory_tier::agent::proto::TensorEntry {
        name,
        ggml_type: t.type_ as u32,
        type_name,
        ne: t.ne,
        nbytes: size as u64,
        buffer: bname,
        access,
        file,
    };
    a.registry().record(Seen {
        tensor: tensor as usize,
        entry,
    });
}

/// The buffer a tensor's data lives in (a view's source's).
///
/// # Safety
/// `tensor` is a live tensor whose layout was checked.
unsafe fn buffer_of(tensor: *mut Tensor) -> *mut c_void {
    if tensor.is_null() || inert().is_some() {
        return std::ptr::null_mut();
    }
    // SAFETY: the caller's contract.
    let t = unsafe { &*tensor };
    if t.view_src.is_null() {
        t.buffer
    } else {
        // SAFETY: a view's source outlives the view.
        unsafe { (*t.view_src).buffer }
    }
}

/// Interposes `ggml_backend_tensor_alloc`: a tensor placed as a view of memory the buffer
/// wraps (the file mapping, for weights).
///
/// # Safety
/// The contract of `ggml_backend_tensor_alloc`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ggml_backend_tensor_alloc(
    buffer: *mut c_void,
    tensor: *mut Tensor,
    addr: *mut c_void,
) -> c_int {
    let Some(f) = real().tensor_alloc else {
        eprintln!("hotpatch agent: ggml_backend_tensor_alloc is not in this process");
        std::process::abort();
    };
    // SAFETY: forwarded unchanged.
    let status = unsafe { f(buffer, tensor, addr) };
    // SAFETY: after a successful alloc the tensor lives in buffer.
    unsafe { observe(tensor, buffer) };
    status
}

/// Interposes `ggml_backend_tensor_set`: bytes copied into a tensor.
///
/// # Safety
/// The contract of `ggml_backend_tensor_set`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ggml_backend_tensor_set(
    tensor: *mut Tensor,
    data: *const c_void,
    offset: usize,
    size: usize,
) {
    let Some(f) = real().tensor_set else {
        eprintln!("hotpatch agent: ggml_backend_tensor_set is not in this process");
        std::process::abort();
    };
    // SAFETY: forwarded unchanged.
    unsafe { f(tensor, data, offset, size) };
    // SAFETY: the tensor is live and allocated (ggml asserted it).
    unsafe { observe(tensor, buffer_of(tensor)) };
}

/// Interposes `ggml_backend_tensor_set_async`: bytes uploaded to a backend's tensor.
///
/// # Safety
/// The contract of `ggml_backend_tensor_set_async`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ggml_backend_tensor_set_async(
    backend: *mut c_void,
    tensor: *mut Tensor,
    data: *const c_void,
    offset: usize,
    size: usize,
) {
    let Some(f) = real().tensor_set_async else {
        eprintln!("hotpatch agent: ggml_backend_tensor_set_async is not in this process");
        std::process::abort();
    };
    // SAFETY: forwarded unchanged.
    unsafe { f(backend, tensor, data, offset, size) };
    // SAFETY: the tensor is live and allocated.
    unsafe { observe(tensor, buffer_of(tensor)) };
}

/// Runs `pass` as a forward pass on `ctx` through `entry`.
fn pass<T>(entry: &'static str, ctx: *mut c_void, pass: impl FnOnce() -> T) -> T {
    let a = agent();
    a.gate.enter();
    a.saw_pass(entry, ctx as usize);
    let out = pass();
    a.gate.exit();
    out
}

/// Interposes `llama_process`, the pass entry point llama-server drives.
///
/// # Safety
/// The contract of `llama_process`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llama_process(ctx: *mut c_void, kind: c_int, batch: *mut c_void) -> i32 {
    let Some(f) = real().process else {
        eprintln!("hotpatch agent: llama_process is not in this process");
        std::process::abort();
    };
    // SAFETY: forwarded unchanged.
    pass("llama_process", ctx, || unsafe { f(ctx, kind, batch) })
}

/// Interposes `llama_decode`.
///
/// # Safety
/// The contract of `llama_decode`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llama_decode(ctx: *mut c_void, batch: Batch) -> i32 {
    let Some(f) = real().decode else {
        eprintln!("hotpatch agent: llama_decode is not in this process");
        std::process::abort();
    };
    // SAFETY: forwarded unchanged.
    pass("llama_decode", ctx, || unsafe { f(ctx, batch) })
}

/// Interposes `llama_encode`.
///
/// # Safety
/// The contract of `llama_encode`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llama_encode(ctx: *mut c_void, batch: Batch) -> i32 {
    let Some(f) = real().encode else {
        eprintln!("hotpatch agent: llama_encode is not in this process");
        std::process::abort();
    };
    // SAFETY: forwarded unchanged.
    pass("llama_encode", ctx, || unsafe { f(ctx, batch) })
}

/// Interposes `llama_free`: the context is no longer synchronized before writes.
///
/// # Safety
/// The contract of `llama_free`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llama_free(ctx: *mut c_void) {
    let Some(f) = real().free else {
        eprintln!("hotpatch agent: llama_free is not in this process");
        std::process::abort();
    };
    // No write may be synchronizing this context while it is freed.
    let hold = agent().gate.hold();
    agent().forget_context(ctx as usize);
    drop(hold);
    // SAFETY: forwarded unchanged.
    unsafe { f(ctx) }
}

/// Interposes `llama_model_free`: its tensors are forgotten before they are freed.
///
/// # Safety
/// The contract of `llama_model_free`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llama_model_free(model: *mut c_void) {
    let Some(f) = real().model_free else {
        eprintln!("hotpatch agent: llama_model_free is not in this process");
        std::process::abort();
    };
    let hold = agent().gate.hold();
    agent().registry().clear();
    drop(hold);
    // SAFETY: forwarded unchanged.
    unsafe { f(model) }
}
