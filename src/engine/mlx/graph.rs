//! A lazy MLX graph read back: MLX's own printout of every array that computes some outputs
//! (its primitive, shape and dtype), and a count of its nodes by primitive. On a GPU each node
//! is at least one kernel the host builds and launches, and on an 8B step on an H200 the host's
//! work per kernel set the pace (docs/gpu.md), so the count is what speed work on the step
//! measures here, where there is no GPU. It is also how the strict bf16 test finds f64 arrays and
//! primitives a GPU backend lacks.

use mlx_rs::error::Exception;
use mlx_rs::Array;
use std::collections::BTreeMap;

type R<T> = Result<T, Exception>;

/// MLX's printout (`print_graph`) of the graph that computes `outputs`, not yet evaluated: a
/// line per node, its primitive first, then its output arrays with shape and dtype.
pub fn print(outputs: &[&Array]) -> R<String> {
    let handles: Vec<mlx_sys::mlx_array> = outputs.iter().map(|a| a.as_ptr()).collect();
    let mut buf: *mut libc::c_char = std::ptr::null_mut();
    let mut len: libc::size_t = 0;
    // SAFETY: the arrays outlive the call; the vector and namer are freed here, and the memory
    // stream's buffer is read once the stream is closed, then freed.
    unsafe {
        let file = libc::open_memstream(&mut buf, &mut len);
        if file.is_null() {
            return Err(Exception::custom(
                "could not open a memory stream for MLX's printout",
            ));
        }
        let vec = mlx_sys::mlx_vector_array_new_data(handles.as_ptr(), handles.len());
        let namer = mlx_sys::mlx_node_namer_new();
        let rc = mlx_sys::mlx_print_graph(file.cast(), namer, vec);
        libc::fclose(file);
        mlx_sys::mlx_node_namer_free(namer);
        mlx_sys::mlx_vector_array_free(vec);
        let text = if buf.is_null() {
            String::new()
        } else {
            let bytes = std::slice::from_raw_parts(buf.cast::<u8>(), len);
            String::from_utf8_lossy(bytes).into_owned()
        };
        libc::free(buf.cast());
        if rc != 0 {
            return Err(Exception::custom("MLX could not print the graph"));
        }
        Ok(text)
    }
}

/// The nodes of a [`print`]out by primitive: each node's line starts with its name (the
/// `Inputs:` and `Outputs:` lines list arrays, not nodes).
pub fn census(printout: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for line in printout.lines() {
        if line.starts_with("Inputs:") || line.starts_with("Outputs:") {
            continue;
        }
        if let Some(name) = line.split_whitespace().next() {
            *out.entry(name.to_string()).or_insert(0) += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printout_names_each_node_once() -> R<()> {
        let _serial = super::super::checks::serial();
        let x = Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2]);
        let y = x.matmul(&x)?.add(&x)?.exp()?;
        let z = y.sum(None)?;
        let counts = census(&print(&[&z])?);
        let get = |k: &str| counts.get(k).copied().unwrap_or(0);
        assert_eq!(
            (get("Matmul"), get("Add"), get("Exp")),
            (1, 1, 1),
            "{counts:?}"
        );
        assert!(counts.keys().any(|k| k.starts_with("Reduce") || k == "Sum"));
        Ok(())
    }
}
