//! The training step's compute: forward and backward of each micro-batch into accumulated f32
//! gradients, without reading anything back from the device.
//!
//! Two ways to get the gradients of one micro-batch, with the same result:
//! - monolithic: one autograd graph over the whole model (every activation alive until
//!   backward; fastest for small models);
//! - recomputed ([`segments`]): the forward keeps only each segment's input, the backward
//!   recomputes one segment at a time (`gradient_checkpointing`, the default for real models).

pub mod segments;
pub mod spans;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::parallel::Collective;
use crate::{Batch, Error, LlavaNext, Result};

/// How a micro-batch's gradients are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepOptions {
    /// Recompute each segment in the backward instead of keeping every activation.
    pub recompute: bool,
}

impl Default for StepOptions {
    fn default() -> Self {
        Self { recompute: true }
    }
}

/// Sums of gradients over the micro-batches of one optimizer step, in f32, per trainable
/// parameter.
///
/// With [`GradAccumulator::reduce_to_owners`] (ZeRO-2 over several ranks) it keeps sums only
/// for the parameters this rank owns: the parameters are grouped into buckets by the segment
/// whose backward completes their gradient ([`segments::param_segment`]); when the backward
/// finishes a segment, every bucket up to it is reduced to its owners (a per-tensor reduce to
/// each owner: the reduce-scatter of whole-tensor shards), so a rank holds f32 gradients for
/// its own partition plus the bucket in flight. Every rank reduces the same buckets in the same
/// order whatever its data (buckets a micro-batch's backward did not reach go out as zeros at
/// [`GradAccumulator::end_micro_batch`]).
pub struct GradAccumulator {
    params: Vec<(String, Var)>,
    grads: Vec<Option<Tensor>>,
    reduce: Option<Reduce>,
}

/// ZeRO-2's per-micro-batch state.
struct Reduce {
    comm: Arc<dyn Collective>,
    /// Per parameter: owner rank, bucket position.
    owner: Vec<usize>,
    bucket: Vec<usize>,
    /// Per bucket, in backward order: its backward-order key and its parameters.
    buckets: Vec<((u8, usize), Vec<usize>)>,
    /// Buckets already reduced in this micro-batch.
    flushed: usize,
    /// This micro-batch's gradients not yet reduced.
    local: Vec<Option<Tensor>>,
}

fn add_into(acc: &mut Option<Tensor>, g: Tensor) -> Result<()> {
    *acc = Some(match acc.take() {
        Some(a) => (a + g)?,
        None => g,
    });
    Ok(())
}

impl GradAccumulator {
    pub fn new(params: Vec<(String, Var)>) -> Self {
        let grads = vec![None; params.len()];
        Self {
            params,
            grads,
            reduce: None,
        }
    }

    /// ZeRO-2: reduce each micro-batch's gradients to `owner(name)` as the backward completes
    /// them (see the type's doc). A world of one keeps everything.
    pub fn reduce_to_owners(
        mut self,
        comm: Arc<dyn Collective>,
        owner: &dyn Fn(&str) -> usize,
    ) -> Self {
        if comm.world_size() <= 1 {
            return self;
        }
        let keys: Vec<(u8, usize)> = self
            .params
            .iter()
            .map(|(n, _)| segments::backward_order(segments::param_segment(n)))
            .collect();
        let mut order: Vec<usize> = (0..self.params.len()).collect();
        order.sort_by(|&a, &b| (keys[a], &self.params[a].0).cmp(&(keys[b], &self.params[b].0)));
        let mut buckets: Vec<((u8, usize), Vec<usize>)> = Vec::new();
        let mut bucket = vec![0; self.params.len()];
        for i in order {
            match buckets.last_mut() {
                Some((k, v)) if *k == keys[i] => v.push(i),
                _ => buckets.push((keys[i], vec![i])),
            }
            bucket[i] = buckets.len() - 1;
        }
        self.reduce = Some(Reduce {
            owner: self.params.iter().map(|(n, _)| owner(n)).collect(),
            comm,
            bucket,
            buckets,
            flushed: 0,
            local: vec![None; self.params.len()],
        });
        self
    }

    /// Whether the sums are already reduced over the ranks (ZeRO-2, owners only).
    pub fn reduces(&self) -> bool {
        self.reduce.is_some()
    }

    /// Adds every gradient `store` holds for a trainable parameter.
    pub fn absorb(&mut self, store: &GradStore) -> Result<()> {
        for (i, (name, var)) in self.params.iter().enumerate() {
            let Some(g) = store.get(var.as_tensor()) else {
                continue;
            };
            let g = g.to_dtype(DType::F32)?;
            match &mut self.reduce {
                None => add_into(&mut self.grads[i], g)?,
                Some(r) => {
                    if r.bucket[i] < r.flushed {
                        return Err(Error::Batch(format!(
                            "gradient of {name} arrived after its ZeRO-2 bucket was reduced \
                             (step::segments::param_segment maps it to the wrong segment)"
                        )));
                    }
                    add_into(&mut r.local[i], g)?;
                }
            }
        }
        Ok(())
    }

    /// The backward has finished `seg`: reduces every bucket it completed (ZeRO-2).
    pub fn segment_done(&mut self, seg: segments::Segment) -> Result<()> {
        self.flush_through(segments::backward_order(Some(seg)))
    }

    /// The micro-batch's backward is over: reduces the buckets left (zeros where the backward
    /// did not reach). An empty micro-batch calls it too, so every rank reduces the same.
    pub fn end_micro_batch(&mut self) -> Result<()> {
        self.flush_through((u8::MAX, usize::MAX))?;
        if let Some(r) = &mut self.reduce {
            r.flushed = 0;
        }
        Ok(())
    }

    fn flush_through(&mut self, limit: (u8, usize)) -> Result<()> {
        let Some(r) = &mut self.reduce else {
            return Ok(());
        };
        while r.flushed < r.buckets.len() && r.buckets[r.flushed].0 <= limit {
            for &i in &r.buckets[r.flushed].1 {
                let g = match r.local[i].take() {
                    Some(g) => g,
                    None => {
                        let v = self.params[i].1.as_tensor();
                        Tensor::zeros(v.dims(), DType::F32, v.device())?
                    }
                };
                if let Some(s) = r.comm.reduce_sum(&g, r.owner[i])? {
                    drop(g);
                    add_into(&mut self.grads[i], s)?;
                }
            }
            r.flushed += 1;
        }
        Ok(())
    }

    /// One parameter's gradient sum, taken out (see [`Self::take`]).
    pub fn take_one(&mut self, name: &str) -> Option<Tensor> {
        let i = self.params.iter().position(|(n, _)| n == name)?;
        self.grads[i].take()
    }

    /// The gradients by parameter name (parameters that got none are absent) and a fresh start.
    /// ZeRO-2: this rank's parameters only, summed over the ranks.
    pub fn take(&mut self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for ((name, _), g) in self.params.iter().zip(self.grads.iter_mut()) {
            if let Some(g) = g.take() {
                out.insert(name.clone(), g);
            }
        }
        out
    }
}

/// What one micro-batch contributed, all on the device or known on the host.
#[derive(Debug, Clone)]
pub struct MicroBatchLoss {
    /// Scalar f32, detached: mean cross entropy over the micro-batch's supervised targets.
    pub loss: Tensor,
    /// Supervised targets (host-side count).
    pub targets: usize,
}

/// Forward and backward of one micro-batch; its gradients, scaled by `1 / grad_accum` (the
/// mean of per-micro-batch means, spec §5.4), go into `acc`.
pub fn micro_batch(
    model: &LlavaNext,
    batch: &Batch,
    acc: &mut GradAccumulator,
    grad_accum: usize,
    opts: StepOptions,
) -> Result<MicroBatchLoss> {
    if grad_accum == 0 {
        return Err(Error::Config("grad_accum must be at least 1".into()));
    }
    if opts.recompute {
        return segments::micro_batch(model, batch, acc, grad_accum);
    }
    let out = {
        let _t = spans::span(spans::Phase::Forward);
        model.forward_loss(batch)?
    };
    // The same two scalings as the recomputed path, in the same order.
    let scaled = if grad_accum > 1 {
        (&out.loss / grad_accum as f64)?
    } else {
        out.loss.clone()
    };
    {
        let _t = spans::span(spans::Phase::Backward);
        acc.absorb(&scaled.backward()?)?;
    }
    acc.end_micro_batch()?;
    Ok(MicroBatchLoss {
        loss: out.loss.detach(),
        targets: out.targets,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use candle_core::Device;

    use super::segments::Segment;
    use super::*;
    use crate::parallel::threads::ThreadGroup;

    /// Two ranks, three parameters in three buckets (head, decoder layer 0, merge): each rank
    /// ends the micro-batch holding only the sums of the parameters it owns, equal to the sum
    /// of both ranks' gradients; a bucket the backward did not reach goes out as zeros.
    #[test]
    fn zero2_keeps_only_the_owned_sums_and_reduces_bucket_by_bucket() {
        let names = [
            "language_model.lm_head.weight",
            "language_model.model.layers.0.mlp.up_proj.weight",
            "language_model.model.embed_tokens.weight",
        ];
        let owner = |n: &str| usize::from(n.contains("layers"));
        let handles: Vec<_> = ThreadGroup::new(2, Duration::from_secs(10))
            .into_iter()
            .map(|g| {
                std::thread::spawn(move || -> Result<Vec<(String, Vec<f32>)>> {
                    let rank = g.rank();
                    let dev = Device::Cpu;
                    let vars: Vec<(String, Var)> = names
                        .iter()
                        .map(|n| Ok((n.to_string(), Var::zeros(2, DType::F32, &dev)?)))
                        .collect::<Result<_>>()?;
                    let comm: Arc<dyn Collective> = Arc::new(g);
                    let mut acc = GradAccumulator::new(vars.clone()).reduce_to_owners(comm, &owner);
                    assert!(acc.reduces());
                    let x = Tensor::new(&[1f32 + rank as f32, 2.0], &dev)?;
                    for micro in 0..2 {
                        // Head: d/dw sum(w * x) = x.
                        let store = (vars[0].1.as_tensor() * &x)?.sum_all()?.backward()?;
                        acc.absorb(&store)?;
                        acc.segment_done(Segment::Head)?;
                        // A head gradient after its bucket left is a mapping bug.
                        assert!(acc.absorb(&store).is_err());
                        // Layer 0: 3x; rank 1's second micro-batch stops before it (zeros).
                        if !(rank == 1 && micro == 1) {
                            let y = (&x * 3.0)?;
                            let store = (vars[1].1.as_tensor() * &y)?.sum_all()?.backward()?;
                            acc.absorb(&store)?;
                            acc.segment_done(Segment::TextLayer(0))?;
                        }
                        acc.end_micro_batch()?;
                    }
                    let mut got: Vec<(String, Vec<f32>)> = acc
                        .take()
                        .into_iter()
                        .map(|(n, t)| Ok((n, t.to_vec1::<f32>()?)))
                        .collect::<Result<_>>()?;
                    got.sort_by(|a, b| a.0.cmp(&b.0));
                    Ok(got)
                })
            })
            .collect();
        let r: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().expect("thread").expect("rank"))
            .collect();
        // Rank 0 owns the head and the (never reached) embedding: 2 micro-batches x (x0 + x1).
        assert_eq!(
            r[0],
            vec![
                ("language_model.lm_head.weight".to_string(), vec![6.0, 8.0]),
                (
                    "language_model.model.embed_tokens.weight".to_string(),
                    vec![0.0, 0.0]
                ),
            ]
        );
        // Rank 1 owns layer 0: 3 x (x0 + x1) + 3 x x0 (its own second micro-batch sent zeros).
        assert_eq!(
            r[1],
            vec![(
                "language_model.model.layers.0.mlp.up_proj.weight".to_string(),
                vec![12.0, 18.0]
            )]
        );
    }
}
