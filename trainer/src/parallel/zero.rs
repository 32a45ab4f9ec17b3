//! ZeRO data parallelism with whole-tensor shards: which rank owns each trainable parameter's
//! optimizer state (stage 1) and gradient (stage 2), and the collectives around the optimizer
//! step that keep every rank's weights identical.
//!
//! - Stage 0: gradients are all-reduced; every rank steps every parameter.
//! - Stage 1: gradients are all-reduced; each rank keeps f32 master weights and AdamW moments
//!   only for the parameters it owns, steps them, and broadcasts their new values.
//! - Stage 2: as stage 1, but each gradient is reduced to its owner only, bucket by bucket
//!   during the backward of every micro-batch ([`GradAccumulator::reduce_to_owners`]): a rank
//!   keeps f32 gradients only for the parameters it owns.
//!
//! The global gradient norm is assembled from per-tensor norms in name order whatever the
//! stage, so that stages 0, 1 and 2 clip by bit-identical coefficients.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};

use std::sync::Arc;

use super::Collective;
use crate::train::step::GradAccumulator;
use crate::{Error, Result};

/// Owner rank of every trainable parameter.
#[derive(Debug, Clone)]
pub struct Sharding {
    pub stage: u8,
    pub world: usize,
    /// Trainable parameters in name order: (name, shape).
    pub params: Vec<(String, Vec<usize>)>,
    owners: HashMap<String, usize>,
}

impl Sharding {
    /// Greedy balance by element count, in name order (the same on every rank).
    pub fn new(params: &[(String, Vec<usize>)], world: usize, stage: u8) -> Result<Self> {
        if stage > 2 {
            return Err(Error::Config(format!(
                "zero_stage {stage}: expected 0, 1 or 2"
            )));
        }
        let mut sorted = params.to_vec();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let world = world.max(1);
        let mut load = vec![0usize; world];
        let mut owners = HashMap::new();
        for (name, shape) in &sorted {
            let r = (0..world).min_by_key(|&r| (load[r], r)).unwrap_or(0);
            load[r] += shape.iter().product::<usize>();
            owners.insert(name.clone(), r);
        }
        Ok(Self {
            stage,
            world,
            params: sorted,
            owners,
        })
    }

    pub fn owner(&self, name: &str) -> usize {
        self.owners.get(name).copied().unwrap_or(0)
    }

    /// Whether `rank` keeps optimizer state for `name` (everyone at stage 0).
    pub fn steps(&self, rank: usize, name: &str) -> bool {
        self.stage == 0 || self.world == 1 || self.owner(name) == rank
    }
}

/// The step's accumulator: at stage 2 over several ranks, one that reduces each micro-batch's
/// gradients to their owners during the backward.
pub fn accumulator(
    vars: Vec<(String, candle_core::Var)>,
    sharding: &Sharding,
    comm: Arc<dyn Collective>,
) -> GradAccumulator {
    let acc = GradAccumulator::new(vars);
    if sharding.stage >= 2 && comm.world_size() > 1 {
        acc.reduce_to_owners(comm, &|n| sharding.owner(n))
    } else {
        acc
    }
}

/// The gradients this rank steps with and the global norm (see [`reduce_gradients`]), from the
/// step's accumulator, which may have reduced them already (ZeRO-2).
pub fn step_gradients(
    acc: &mut GradAccumulator,
    sharding: &Sharding,
    comm: &dyn Collective,
    dev: &Device,
) -> Result<(HashMap<String, Tensor>, Option<Tensor>)> {
    if !acc.reduces() {
        return reduce_gradients(acc.take(), sharding, comm, dev);
    }
    let (rank, world) = (comm.rank(), comm.world_size());
    let mut out = HashMap::new();
    let mut mine = Vec::with_capacity(sharding.params.len());
    for (name, _) in &sharding.params {
        let n = match acc.take_one(name) {
            Some(g) if sharding.owner(name) == rank => {
                let g = (g / world as f64)?;
                let n = tensor_norm(&g)?;
                out.insert(name.clone(), g);
                n
            }
            _ => Tensor::new(0f32, dev)?,
        };
        mine.push(n);
    }
    let all = comm.all_reduce_sum(&Tensor::stack(&mine, 0)?)?;
    Ok((out, Some(all.sqr()?.sum_all()?.sqrt()?)))
}

/// Averages the step's summed gradients over the ranks. Returns the gradients this rank steps
/// with (absent ones count as zero, as in the optimizer) and the global L2 norm (f32 scalar,
/// torch's `clip_grad_norm_` arithmetic: the norm of per-tensor norms in name order).
pub fn reduce_gradients(
    mut grads: HashMap<String, Tensor>,
    sharding: &Sharding,
    comm: &dyn Collective,
    dev: &Device,
) -> Result<(HashMap<String, Tensor>, Option<Tensor>)> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let mut out = HashMap::new();
    let mut norms: BTreeMap<String, Tensor> = BTreeMap::new();
    for (name, shape) in &sharding.params {
        let local = grads.remove(name);
        if world == 1 {
            if let Some(g) = local {
                norms.insert(name.clone(), tensor_norm(&g)?);
                out.insert(name.clone(), g);
            }
            continue;
        }
        let g = match local {
            Some(g) => g,
            None => Tensor::zeros(shape.as_slice(), DType::F32, dev)?,
        };
        // Dividing by the world size is exact for powers of two (as summing scaled parts is).
        let reduced = if sharding.stage >= 2 {
            comm.reduce_sum(&g, sharding.owner(name))?
                .map(|s| s / world as f64)
                .transpose()?
        } else {
            Some((comm.all_reduce_sum(&g)? / world as f64)?)
        };
        if let Some(g) = reduced {
            norms.insert(name.clone(), tensor_norm(&g)?);
            if sharding.steps(rank, name) {
                out.insert(name.clone(), g);
            }
        }
    }
    let norm = if world == 1 {
        stack_norm(norms.into_values().collect())?
    } else {
        // Every rank contributes the norms of the tensors it owns (zeros elsewhere): the sum is
        // exact (x + 0), so every rank assembles the same vector in name order.
        let mut mine = Vec::with_capacity(sharding.params.len());
        for (name, _) in &sharding.params {
            let n = match norms.get(name) {
                Some(n) if sharding.owner(name) == rank => n.clone(),
                _ => Tensor::new(0f32, dev)?,
            };
            mine.push(n);
        }
        let all = comm.all_reduce_sum(&Tensor::stack(&mine, 0)?)?;
        Some(all.sqr()?.sum_all()?.sqrt()?)
    };
    Ok((out, norm))
}

fn tensor_norm(g: &Tensor) -> Result<Tensor> {
    Ok(g.to_dtype(DType::F32)?.sqr()?.sum_all()?.sqrt()?)
}

fn stack_norm(norms: Vec<Tensor>) -> Result<Option<Tensor>> {
    if norms.is_empty() {
        return Ok(None);
    }
    Ok(Some(Tensor::stack(&norms, 0)?.sqr()?.sum_all()?.sqrt()?))
}

/// Stages 1 and 2: each owner broadcasts its parameters' new values; the others set them.
pub fn share_parameters(
    vars: &[(String, candle_core::Var)],
    sharding: &Sharding,
    comm: &dyn Collective,
) -> Result<()> {
    if sharding.stage == 0 || comm.world_size() == 1 {
        return Ok(());
    }
    for (name, var) in vars {
        let owner = sharding.owner(name);
        let t = comm.broadcast(var.as_tensor(), owner)?;
        if comm.rank() != owner {
            var.set(&t)?;
        }
    }
    Ok(())
}

/// Where each optimizer tensor of a ZeRO-1/2 checkpoint lives: its owner's shard file.
pub fn optimizer_index(
    sharding: &Sharding,
    with_master: bool,
) -> crate::io::checkpoint::OptimizerIndex {
    let kinds: &[&str] = if with_master {
        &["m", "v", "master"]
    } else {
        &["m", "v"]
    };
    let mut weight_map = std::collections::BTreeMap::new();
    for (name, _) in &sharding.params {
        let file =
            crate::io::checkpoint::optimizer_shard_name(sharding.owner(name), sharding.world);
        for kind in kinds {
            weight_map.insert(format!("{kind}.{name}"), file.clone());
        }
    }
    crate::io::checkpoint::OptimizerIndex {
        world_size: sharding.world,
        zero_stage: sharding.stage,
        weight_map,
    }
}
