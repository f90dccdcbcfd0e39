//! Ordering work in MLX's lazy graph. MLX evaluates independent branches of a graph side by
//! side (breadth first, up to `MLX_BFS_MAX_WIDTH`, 20 by default), so branches the step means
//! to run one after another would all be alive at once: every LM-head chunk's `[rows, vocab]`
//! logits, for example, which is the whole `[B·T, vocab]` the chunking exists to avoid (measured
//! on SmolLM2: the step's working set grew with every chunk). [`after`] adds the edge that
//! makes a branch wait for another, without a host sync.

use mlx_rs::error::Exception;
use mlx_rs::Array;

/// `a` as an array that MLX computes only once every one of `deps` is computed (MLX's
/// `depends`: the values are `a`'s; the gradient flows to `a` alone).
pub fn after(a: &Array, deps: &[&Array]) -> Result<Array, Exception> {
    if deps.is_empty() {
        return Ok(a.clone());
    }
    let dep_ptrs: Vec<mlx_sys::mlx_array> = deps.iter().map(|d| d.as_ptr()).collect();
    // SAFETY: the vectors copy the handles they are given (each holds its own reference) and
    // are freed here; `out` is a fresh handle that `mlx_vector_array_get` fills and the
    // returned `Array` owns.
    unsafe {
        let inputs = mlx_sys::mlx_vector_array_new_data(&a.as_ptr(), 1);
        let deps = mlx_sys::mlx_vector_array_new_data(dep_ptrs.as_ptr(), dep_ptrs.len());
        let mut res = mlx_sys::mlx_vector_array_new();
        let status = mlx_sys::mlx_depends(&mut res, inputs, deps);
        let mut out = mlx_sys::mlx_array_new();
        let got = if status == 0 && mlx_sys::mlx_vector_array_size(res) == 1 {
            mlx_sys::mlx_vector_array_get(&mut out, res, 0)
        } else {
            1
        };
        mlx_sys::mlx_vector_array_free(res);
        mlx_sys::mlx_vector_array_free(deps);
        mlx_sys::mlx_vector_array_free(inputs);
        if status != 0 || got != 0 {
            mlx_sys::mlx_array_free(out);
            return Err(Exception::custom(
                "MLX could not order two parts of the step's graph",
            ));
        }
        Ok(Array::from_ptr(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_value_is_unchanged_and_the_gradient_flows_to_it() {
        let a = Array::from_slice(&[1.0f32, -2.0, 3.0], &[3]);
        let d = Array::from_slice(&[7.0f32], &[1]).exp().unwrap();
        let b = after(&a, &[&d]).unwrap();
        assert_eq!(b.as_slice::<f32>(), &[1.0, -2.0, 3.0]);
        let f = |x: &[Array]| -> Result<Vec<Array>, Exception> {
            let y = after(&x[0], &[&d])?;
            Ok(vec![y.multiply(&y)?.sum(None)?])
        };
        let (_, g) = mlx_rs::transforms::fallible_vjp(f, &[a], &[Array::from_f32(1.0)]).unwrap();
        assert_eq!(g[0].as_slice::<f32>(), &[2.0, -4.0, 6.0]);
    }
}
