//! Filling a `VarStore`'s variables from named tensors: a checkpoint's, or
//! a snapshot taken during training.

use tch::{Tensor, nn};

/// Copies into each variable of `vs` the tensor `get` returns for its name
/// and returns what did not fit: variables with no tensor ("missing
/// {prefix}{name}") or a tensor of another shape. Empty when all fit.
pub fn fill_variables(
    vs: &nn::VarStore,
    prefix: &str,
    mut get: impl FnMut(&str) -> Option<Tensor>,
) -> Vec<String> {
    let mut problems = Vec::new();
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            match get(&name) {
                Some(value) if value.size() == var.size() => {
                    var.copy_(&value);
                }
                Some(value) => problems.push(format!(
                    "{name}: shape {:?}, expected {:?}",
                    value.size(),
                    var.size()
                )),
                None => problems.push(format!("missing {prefix}{name}")),
            }
        }
    });
    problems
}
