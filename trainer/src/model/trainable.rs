//! The model over a `VarMap`'s variables for training: frozen parameters detached, so that
//! backward neither computes their gradients nor walks graph parts that only feed them.

use std::collections::HashMap;

use candle_core::{DType, Device, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::model::config::LlavaNextConfig;
use crate::model::llava_next::LlavaNext;
use crate::{Error, Result};

/// The model over `varmap`'s variables; parameters for which `trainable` is false are detached,
/// so backward neither computes their gradients nor walks graph parts that only feed them.
pub fn build_model(
    cfg: &LlavaNextConfig,
    varmap: &VarMap,
    trainable: &dyn Fn(&str) -> bool,
) -> Result<(LlavaNext, Vec<(String, Var)>)> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::Poisoned("VarMap"))?;
    let mut tensors = HashMap::new();
    let mut vars = Vec::new();
    let (mut dtype, mut dev) = (DType::F32, Device::Cpu);
    for (name, var) in data.iter() {
        dtype = var.dtype();
        dev = var.device().clone();
        if trainable(name) {
            tensors.insert(name.clone(), var.as_tensor().clone());
            vars.push((name.clone(), var.clone()));
        } else {
            tensors.insert(name.clone(), var.as_tensor().detach());
        }
    }
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let vb = VarBuilder::from_tensors(tensors, dtype, &dev);
    Ok((LlavaNext::new(cfg, vb)?, vars))
}
