//! Helpers shared by the unit tests.

use candle_core::{Tensor, Var};

/// The largest absolute element-wise difference of two f64 tensors of one shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Gradients of `sum(f(x) * probe)` through the op against the same through composed
/// candle ops, in f64.
pub fn check_against_composed(
    inputs: &[Tensor],
    op: impl Fn(&[Tensor]) -> Tensor,
    composed: impl Fn(&[Tensor]) -> Tensor,
    tol: f64,
) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y1 = op(&ts);
    let y2 = composed(&ts);
    assert!(
        max_abs_diff(&y1, &y2) < tol,
        "forward differs: {}",
        max_abs_diff(&y1, &y2)
    );
    let probe = crate::fused_lora::uniform(y1.dims(), 99).unwrap();
    let g1 = (&y1 * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g2 = (&y2 * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (i, v) in vars.iter().enumerate() {
        let a = g1
            .get(v)
            .unwrap_or_else(|| panic!("op gave no gradient for input {i}"));
        let b = g2.get(v).unwrap();
        let d = max_abs_diff(a, b);
        assert!(d < tol, "gradient of input {i} differs by {d}");
    }
}
