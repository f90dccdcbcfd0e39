//! A frozen linear's product kept from the forward, standing in for its recompute in the
//! backward: an MLX custom function whose value is the kept `x Wᵀ` and whose vector-Jacobian
//! product is the linear's `dY W`. A block differentiated by MLX's autograd on kept products
//! multiplies by each frozen weight once (for its input's gradient), not twice: the big
//! matmuls of the recompute are gone, and what is recomputed (norms, RoPE, attention, SwiGLU,
//! the LoRA's thin products) is the cheap part.
//!
//! mlx-rs wraps MLX's closures only inside the crate, so this module builds them on mlx-c
//! (`mlx_custom_vjp`) itself. Each closure owns what it captures (arrays are reference
//! counted), because MLX keeps the functions alive in the graph for as long as it lives.

use super::weights::Linear;
use mlx_rs::error::Exception;
use mlx_rs::Array;
use mlx_sys::{mlx_closure, mlx_vector_array};
use std::cell::RefCell;
use std::ffi::c_void;
use std::os::raw::c_int;
use std::panic::{catch_unwind, AssertUnwindSafe};

type R<T> = Result<T, Exception>;

thread_local! {
    /// Why a closure below failed, for the error MLX's failure becomes (MLX itself only
    /// learns that it returned non-zero).
    static FAILURE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// `kept`, where `input` is the input whose product with `lin` it is: the same value, and
/// under autograd the gradient `dY W` for `input`.
pub fn product(kept: &Array, input: &Array, lin: &Linear) -> R<Array> {
    let value = kept.clone();
    let lin = lin.clone();
    custom_vjp(
        input,
        move |_: &[Array]| Ok(vec![value.clone()]),
        move |_: &[Array], cotangents: &[Array], _: &[Array]| {
            let dy = cotangents
                .first()
                .ok_or_else(|| Exception::custom("a kept product got no cotangent"))?;
            Ok(vec![lin.input_gradient(dy)?])
        },
    )
}

/// `fun(input)` with MLX's vector-Jacobian product replaced by `vjp(primals, cotangents,
/// outputs)`, applied to `input`: one output.
fn custom_vjp<F, V>(input: &Array, fun: F, vjp: V) -> R<Array>
where
    F: Fn(&[Array]) -> R<Vec<Array>> + Send + 'static,
    V: Fn(&[Array], &[Array], &[Array]) -> R<Vec<Array>> + Send + 'static,
{
    // A reason left by an earlier failure belongs to no error of this call.
    take_failure();
    // SAFETY: each payload is a leaked box that mlx-c owns from here (it frees it with
    // `drop_box` once the last copy of the function is gone); every vector and closure made
    // here is freed on every path, and arrays taken out of vectors are owned (+1) handles.
    unsafe {
        let fun = mlx_sys::mlx_closure_new_func_payload(
            Some(call_fun::<F>),
            Box::into_raw(Box::new(fun)).cast(),
            Some(drop_box::<F>),
        );
        let vjp = mlx_sys::mlx_closure_custom_new_func_payload(
            Some(call_vjp::<V>),
            Box::into_raw(Box::new(vjp)).cast(),
            Some(drop_box::<V>),
        );
        let mut custom = mlx_sys::mlx_closure_new();
        let made = mlx_sys::mlx_custom_vjp(&mut custom, fun, vjp);
        mlx_sys::mlx_closure_free(fun);
        mlx_sys::mlx_closure_custom_free(vjp);
        if made != 0 {
            mlx_sys::mlx_closure_free(custom);
            return Err(failure("making a custom vector-Jacobian product"));
        }
        let out = apply(custom, input);
        mlx_sys::mlx_closure_free(custom);
        out?.into_iter()
            .next()
            .ok_or_else(|| Exception::custom("a custom function returned nothing"))
    }
}

/// `closure(input)`.
unsafe fn apply(closure: mlx_closure, input: &Array) -> R<Vec<Array>> {
    let args = mlx_sys::mlx_vector_array_new();
    let mut res = mlx_sys::mlx_vector_array_new();
    let status = if mlx_sys::mlx_vector_array_append_value(args, input.as_ptr()) == 0 {
        mlx_sys::mlx_closure_apply(&mut res, closure, args)
    } else {
        1
    };
    mlx_sys::mlx_vector_array_free(args);
    let out = if status == 0 {
        read(res)
    } else {
        Err(failure("applying a custom function"))
    };
    mlx_sys::mlx_vector_array_free(res);
    out
}

/// The arrays of `v` (owned handles).
unsafe fn read(v: mlx_vector_array) -> R<Vec<Array>> {
    (0..mlx_sys::mlx_vector_array_size(v))
        .map(|i| {
            let mut a = mlx_sys::mlx_array_new();
            if mlx_sys::mlx_vector_array_get(&mut a, v, i) == 0 {
                Ok(Array::from_ptr(a))
            } else {
                mlx_sys::mlx_array_free(a);
                Err(Exception::custom("reading an array from MLX's vector"))
            }
        })
        .collect()
}

/// Sets `*v` (which may be an empty handle, as mlx-c passes a closure's result) to `arrays`:
/// 0, or non-zero on failure.
unsafe fn write(v: *mut mlx_vector_array, arrays: &[Array]) -> c_int {
    let handles: Vec<_> = arrays.iter().map(Array::as_ptr).collect();
    mlx_sys::mlx_vector_array_set_data(v, handles.as_ptr(), handles.len())
}

/// Why a kept product's vector-Jacobian product failed during a differentiation, if it did:
/// MLX's own error only says that a closure returned non-zero.
pub fn take_failure() -> Option<String> {
    FAILURE.with(|f| f.borrow_mut().take())
}

/// The error for a failed mlx-c call: the closure's own reason when one of ours failed.
fn failure(doing: &str) -> Exception {
    match take_failure() {
        Some(why) => Exception::custom(format!("{doing}: {why}")),
        None => Exception::custom(format!("{doing} failed in MLX")),
    }
}

/// Runs `f`, turning its error or panic into a non-zero status (with the reason kept).
fn guarded(f: impl FnOnce() -> R<c_int>) -> c_int {
    let why = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(status)) => return status,
        Ok(Err(e)) => e.what().to_string(),
        Err(_) => "a closure panicked".to_string(),
    };
    FAILURE.with(|f| *f.borrow_mut() = Some(why));
    1
}

unsafe extern "C" fn call_fun<F: Fn(&[Array]) -> R<Vec<Array>>>(
    res: *mut mlx_vector_array,
    input: mlx_vector_array,
    payload: *mut c_void,
) -> c_int {
    guarded(|| {
        let f = &*(payload as *const F);
        let out = f(&read(input)?)?;
        Ok(write(res, &out))
    })
}

unsafe extern "C" fn call_vjp<V: Fn(&[Array], &[Array], &[Array]) -> R<Vec<Array>>>(
    res: *mut mlx_vector_array,
    primals: mlx_vector_array,
    cotangents: mlx_vector_array,
    outputs: mlx_vector_array,
    payload: *mut c_void,
) -> c_int {
    guarded(|| {
        let f = &*(payload as *const V);
        let out = f(&read(primals)?, &read(cotangents)?, &read(outputs)?)?;
        Ok(write(res, &out))
    })
}

unsafe extern "C" fn drop_box<T>(payload: *mut c_void) {
    drop(Box::from_raw(payload as *mut T));
}
