//! The check that ggml's `struct ggml_tensor` in this process is the one the agent was
//! built for. The agent makes a tensor of a known shape through ggml's own functions and
//! compares what ggml's accessors answer with what its fields hold. If any differs, the
//! agent stays inert: it forwards every call and writes nothing.

use std::ffi::{CStr, c_char};

use crate::ffi::{InitParams, Real, Tensor};

/// Checks the layout; `Err` says what differs.
pub fn check(real: &Real) -> Result<(), String> {
    let (Some(init), Some(free), Some(new_2d), Some(set_name), Some(get_name)) = (
        real.init,
        real.ctx_free,
        real.new_2d,
        real.set_name,
        real.get_name,
    ) else {
        return Err("ggml's functions (ggml_init, ggml_new_tensor_2d, ggml_set_name, ggml_get_name) are not in this process".into());
    };
    let (Some(nbytes), Some(nelements), Some(get_data)) =
        (real.nbytes, real.nelements, real.get_data)
    else {
        return Err("ggml_nbytes, ggml_nelements or ggml_get_data is missing".into());
    };
    // SAFETY: ggml_init with a size and no buffer allocates its own pool; no_alloc keeps
    // tensor data unallocated. The context is freed below on every path.
    let ctx = unsafe {
        init(InitParams {
            mem_size: 64 * 1024,
            mem_buffer: std::ptr::null_mut(),
            no_alloc: true,
        })
    };
    if ctx.is_null() {
        return Err("ggml_init failed".into());
    }
    let probe = c"hotpatch-layout-probe";
    // SAFETY: ctx is a live context with room for one tensor; type 0 is GGML_TYPE_F32.
    let t = unsafe { new_2d(ctx, 0, 7, 3) };
    let result = if t.is_null() {
        Err("ggml_new_tensor_2d failed".into())
    } else {
        // SAFETY: t is a live tensor of ctx; the name is NUL-terminated and short.
        unsafe { set_name(t, probe.as_ptr()) };
        // SAFETY: t is live until ggml_free below; reading it as `Tensor` is what is being
        // checked, and every value read is plain data (no pointer is followed).
        let fields = unsafe { &*t };
        compare(
            fields,
            // SAFETY: t is live.
            unsafe { get_name(t) },
            // SAFETY: t is live.
            unsafe { nbytes(t) },
            // SAFETY: t is live.
            unsafe { nelements(t) },
            // SAFETY: t is live.
            unsafe { get_data(t) } as usize,
            probe,
        )
    };
    // SAFETY: ctx came from ggml_init and is freed once.
    unsafe { free(ctx) };
    result
}

fn compare(
    t: &Tensor,
    name_ptr: *const c_char,
    nbytes: usize,
    nelements: i64,
    data: usize,
    probe: &CStr,
) -> Result<(), String> {
    if t.type_ != 0 {
        return Err(format!("type field reads {} for an F32 tensor", t.type_));
    }
    if t.ne != [7, 3, 1, 1] {
        return Err(format!("ne reads {:?} for a 7x3 tensor", t.ne));
    }
    if t.nb != [4, 28, 84, 84] {
        return Err(format!("nb reads {:?} for a 7x3 F32 tensor", t.nb));
    }
    if nbytes != 84 || nelements != 21 {
        return Err(format!(
            "ggml_nbytes {nbytes} / ggml_nelements {nelements} for a 7x3 F32 tensor"
        ));
    }
    if !std::ptr::eq(name_ptr, t.name.as_ptr()) {
        return Err("ggml_get_name does not point at the name field".into());
    }
    // SAFETY: name is a NUL-terminated array inside the tensor (ggml_set_name writes at
    // most GGML_MAX_NAME - 1 bytes and a NUL).
    let name = unsafe { CStr::from_ptr(t.name.as_ptr()) };
    if name != probe {
        return Err(format!("the name field reads {name:?}"));
    }
    if data != t.data as usize || !t.buffer.is_null() || !t.view_src.is_null() {
        return Err("the data, buffer or view fields do not read as ggml sets them".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe_tensor() -> Tensor {
        let mut name = [0 as c_char; crate::ffi::MAX_NAME];
        for (dst, src) in name.iter_mut().zip(b"probe") {
            *dst = *src as c_char;
        }
        Tensor {
            type_: 0,
            buffer: std::ptr::null_mut(),
            ne: [7, 3, 1, 1],
            nb: [4, 28, 84, 84],
            op: 0,
            op_params: [0; 16],
            flags: 0,
            src: [std::ptr::null_mut(); 10],
            view_src: std::ptr::null_mut(),
            view_offs: 0,
            data: std::ptr::null_mut(),
            name,
            extra: std::ptr::null_mut(),
            padding: [0; 8],
        }
    }

    #[test]
    fn the_layout_it_was_built_for_passes() {
        let t = probe_tensor();
        assert_eq!(compare(&t, t.name.as_ptr(), 84, 21, 0, c"probe"), Ok(()));
    }

    #[test]
    fn any_field_read_wrong_makes_the_agent_inert() {
        let t = probe_tensor();
        let name = t.name.as_ptr();
        // Another ggml's struct reads as a shifted shape, a name elsewhere, or other sizes.
        let mut shifted = probe_tensor();
        shifted.ne = [3, 1, 1, 4];
        assert!(compare(&shifted, shifted.name.as_ptr(), 84, 21, 0, c"probe").is_err());
        assert!(compare(&t, name.wrapping_add(8), 84, 21, 0, c"probe").is_err());
        assert!(compare(&t, name, 96, 21, 0, c"probe").is_err());
        assert!(compare(&t, name, 84, 21, 0x1000, c"probe").is_err());
        assert!(compare(&t, name, 84, 21, 0, c"other").is_err());
        let mut typed = probe_tensor();
        typed.type_ = 1;
        assert!(compare(&typed, typed.name.as_ptr(), 84, 21, 0, c"probe").is_err());
    }
}
