//! Layer-segmented backward with recomputation (gradient checkpointing).
//!
//! The model is a chain of segments: the vision embeddings, each vision encoder layer that is
//! used, the merge (projector + anyres merge + embedding and placement), each decoder layer, and
//! the head (final norm + `lm_head` + loss). The forward runs them in order on detached inputs,
//! keeping only each segment's input. The backward walks them from the last: it makes the stored
//! input a variable, recomputes the segment under autograd, back-propagates
//! `sum(output · output_grad)` (whose gradient with respect to the output is exactly
//! `output_grad`), adds the parameters' gradients to the accumulator, takes the input's
//! gradient for the previous segment and drops the segment's graph.
//!
//! Live memory: the stored inputs (`2·s·h` bytes per decoder layer in bf16) plus one segment's
//! graph. The head is itself recomputed chunk by chunk, so at most one chunk of logits exists.
//! Each segment boundary is where ZeRO-2 sends the gradients the backward has just completed
//! (see [`GradAccumulator`]'s buckets and [`param_segment`]).

use candle_core::{Tensor, Var};

use super::spans::{span, Phase};
use super::{GradAccumulator, MicroBatchLoss};
use crate::model::llama::LayerContext;
use crate::model::prepare::Prepared;
use crate::{Batch, Error, LlavaNext, Result};

/// One link of the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    VisionEmbed,
    VisionLayer(usize),
    Merge,
    TextLayer(usize),
    Head,
}

/// The segments of a batch, in forward order.
pub fn chain(model: &LlavaNext, has_images: bool) -> Vec<Segment> {
    let mut out = Vec::new();
    if has_images {
        out.push(Segment::VisionEmbed);
        out.extend((0..model.vision_layers()).map(Segment::VisionLayer));
    }
    out.push(Segment::Merge);
    out.extend((0..model.config().text_config.num_hidden_layers).map(Segment::TextLayer));
    out.push(Segment::Head);
    out
}

/// The segment whose backward completes `name`'s gradient: the earliest one (in forward order)
/// that uses it, since the backward walks the chain from the last. `None`: no segment uses it
/// (`post_layernorm`), or an unknown name; its gradient is complete only at the end.
pub fn param_segment(name: &str) -> Option<Segment> {
    use crate::model::config::{LANGUAGE_PREFIX, PROJECTOR_PREFIX, VISION_PREFIX};
    let layer = |rest: &str| -> Option<usize> { rest.split('.').next()?.parse().ok() };
    if let Some(rest) = name.strip_prefix(VISION_PREFIX) {
        if let Some(l) = rest.strip_prefix(".encoder.layers.") {
            return layer(l).map(Segment::VisionLayer);
        }
        if rest.starts_with(".embeddings.") || rest.starts_with(".pre_layrnorm.") {
            return Some(Segment::VisionEmbed);
        }
        return None;
    }
    if name.starts_with(PROJECTOR_PREFIX) || name == crate::model::config::IMAGE_NEWLINE {
        return Some(Segment::Merge);
    }
    let rest = name.strip_prefix(LANGUAGE_PREFIX)?;
    if let Some(l) = rest.strip_prefix(".model.layers.") {
        return layer(l).map(Segment::TextLayer);
    }
    if rest.starts_with(".model.embed_tokens.") {
        // Also the head's weight when tied: the merge comes later in the backward.
        return Some(Segment::Merge);
    }
    if rest.starts_with(".model.norm.") || rest.starts_with(".lm_head.") {
        return Some(Segment::Head);
    }
    None
}

/// Position of a segment's backward in the backward's order (the head first); `None` (unused
/// parameters) last.
pub fn backward_order(seg: Option<Segment>) -> (u8, usize) {
    match seg {
        Some(Segment::Head) => (0, 0),
        Some(Segment::TextLayer(k)) => (1, usize::MAX - k),
        Some(Segment::Merge) => (2, 0),
        Some(Segment::VisionLayer(k)) => (3, usize::MAX - k),
        Some(Segment::VisionEmbed) => (4, 0),
        None => (5, 0),
    }
}

/// Everything the segments of one micro-batch share.
struct Run<'a> {
    model: &'a LlavaNext,
    batch: &'a Batch,
    prep: Prepared,
    ctx: LayerContext,
}

impl Run<'_> {
    /// Output of a non-head segment.
    fn forward(&self, seg: Segment, x: Option<&Tensor>) -> Result<Tensor> {
        let m = self.model;
        let need = || x.ok_or_else(|| Error::Batch(format!("segment {seg:?} has no input")));
        match seg {
            Segment::VisionEmbed => m.vision_embed(need()?),
            Segment::VisionLayer(k) => m.vision_layer(k, need()?),
            Segment::Merge => m.merge(x, self.batch, &self.prep),
            Segment::TextLayer(k) => m.text_layer(k, need()?, &self.ctx),
            Segment::Head => Err(Error::Batch("the head has no hidden output".into())),
        }
    }
}

/// See [`super::micro_batch`] (recomputed path).
pub fn micro_batch(
    model: &LlavaNext,
    batch: &Batch,
    acc: &mut GradAccumulator,
    grad_accum: usize,
) -> Result<MicroBatchLoss> {
    let prep = model.prepare(batch)?;
    if prep.labels.is_none() {
        return Err(Error::Batch("a training batch needs labels".into()));
    }
    let ctx = model.text_context(&prep)?;
    let has_images = !batch.images.is_empty();
    let pixels = match (&batch.pixel_values, has_images) {
        (Some(px), true) => Some(px.clone()),
        (None, true) => return Err(Error::Batch("images listed but no pixel_values".into())),
        _ => None,
    };
    let run = Run {
        model,
        batch,
        prep,
        ctx,
    };
    let segs = chain(model, has_images);

    // Forward: each segment on a detached input; remember the input and whether the segment
    // touches a trainable parameter (its output then carries a graph).
    let mut inputs: Vec<Option<Tensor>> = Vec::with_capacity(segs.len());
    let mut trainable: Vec<bool> = Vec::with_capacity(segs.len());
    let mut x: Option<Tensor> = pixels;
    for &seg in &segs {
        inputs.push(x.clone());
        if seg == Segment::Head {
            // Whether the head trains is known once its graph exists; it always runs backward.
            trainable.push(true);
            break;
        }
        let y = {
            let _t = span(Phase::Forward);
            run.forward(seg, x.as_ref())?
        };
        trainable.push(y.track_op());
        x = Some(y.detach());
    }

    // A segment's input needs a gradient iff an earlier segment trains.
    let mut needs_input_grad = vec![false; segs.len()];
    let mut any_before = false;
    for (i, t) in trainable.iter().enumerate() {
        needs_input_grad[i] = any_before && segs[i] != Segment::VisionEmbed;
        any_before |= *t;
    }

    // Backward, from the head down.
    let n = run.prep.loss_positions.len();
    let head_input = inputs
        .pop()
        .flatten()
        .ok_or_else(|| Error::Batch("the head has no input".into()))?;
    let (nll, mut grad) = head_backward(
        &run,
        &head_input,
        *needs_input_grad.last().unwrap_or(&false),
        acc,
        grad_accum,
    )?;
    acc.segment_done(Segment::Head)?;
    for i in (0..segs.len() - 1).rev() {
        let Some(g) = grad.take() else { break };
        if !(trainable[i] || needs_input_grad[i]) {
            break;
        }
        let input = inputs[i].take();
        let var = match (&input, needs_input_grad[i]) {
            (Some(t), true) => Some(Var::from_tensor(t)?),
            _ => None,
        };
        let x = match &var {
            Some(v) => Some(v.as_tensor().clone()),
            None => input,
        };
        let y = {
            let _t = span(Phase::Recompute);
            run.forward(segs[i], x.as_ref())?
        };
        let _t = span(Phase::Backward);
        let store = (y * g)?.sum_all()?.backward()?;
        acc.absorb(&store)?;
        grad = var.and_then(|v| store.get(v.as_tensor()).cloned());
        drop(store);
        acc.segment_done(segs[i])?;
    }
    // Whatever the backward did not reach (frozen early segments) goes out as zeros.
    acc.end_micro_batch()?;
    let loss = (nll / n.max(1) as f64)?;
    Ok(MicroBatchLoss { loss, targets: n })
}

/// The head's backward, chunk by chunk: returns the summed cross entropy (detached) and the
/// gradient of the head's input when asked for.
fn head_backward(
    run: &Run,
    input: &Tensor,
    input_grad: bool,
    acc: &mut GradAccumulator,
    grad_accum: usize,
) -> Result<(Tensor, Option<Tensor>)> {
    let m = run.model;
    let prep = &run.prep;
    let var = if input_grad {
        Some(Var::from_tensor(input)?)
    } else {
        None
    };
    let x = match &var {
        Some(v) => v.as_tensor().clone(),
        None => input.clone(),
    };
    let n = prep.loss_positions.len();
    let scale = |t: Tensor| -> Result<Tensor> {
        // (nll / n) / grad_accum, the monolithic path's scalings in its order.
        let t = (t / n.max(1) as f64)?;
        Ok(if grad_accum > 1 {
            (t / grad_accum as f64)?
        } else {
            t
        })
    };
    let fwd = span(Phase::Forward);
    let xn = m.language_model().final_norm(&x)?;
    if n == 0 {
        let nll = m.head_nll(&x, prep)?;
        drop(fwd);
        let _t = span(Phase::Backward);
        let store = scale(nll.clone())?.backward()?;
        acc.absorb(&store)?;
        let g = var.and_then(|v| store.get(v.as_tensor()).cloned());
        return Ok((nll.detach(), g));
    }
    // Hidden states at the supervised rows, cut from the graph: each chunk's logits live only
    // during its own backward.
    let sel = m.supervised_hidden(&xn, prep)?;
    let sel_var = Var::from_tensor(&sel.detach())?;
    drop(fwd);
    let mut nll_total: Option<Tensor> = None;
    let mut sel_grad: Option<Tensor> = None;
    for (start, len) in m.loss_chunks(n) {
        let rows = sel_var.as_tensor().narrow(0, start, len)?;
        let nll = {
            let _t = span(Phase::Forward);
            m.chunk_nll(&rows, prep, start)?
        };
        let _t = span(Phase::Backward);
        let store = scale(nll.clone())?.backward()?;
        acc.absorb(&store)?;
        if let Some(g) = store.get(sel_var.as_tensor()) {
            sel_grad = Some(match sel_grad {
                Some(a) => (a + g)?,
                None => g.clone(),
            });
        }
        let nll = nll.detach();
        nll_total = Some(match nll_total {
            Some(t) => (t + nll)?,
            None => nll,
        });
    }
    let nll = nll_total.ok_or_else(|| Error::Batch("no loss chunk".into()))?;
    // Through the final norm: the head's own parameters and its input.
    let mut input_grad_out = None;
    if let Some(g) = sel_grad {
        if sel.track_op() {
            let _t = span(Phase::Backward);
            let store = (sel * g)?.sum_all()?.backward()?;
            acc.absorb(&store)?;
            input_grad_out = var.and_then(|v| store.get(v.as_tensor()).cloned());
        }
    }
    Ok((nll, input_grad_out))
}

/// The loss of `batch` without gradients (evaluation): the segments' forward on detached
/// inputs, so no graph outlives a segment; the same value as the training forward.
pub fn eval_loss(model: &LlavaNext, batch: &Batch) -> Result<MicroBatchLoss> {
    let prep = model.prepare(batch)?;
    if prep.labels.is_none() {
        return Err(Error::Batch("an evaluation batch needs labels".into()));
    }
    let ctx = model.text_context(&prep)?;
    let has_images = !batch.images.is_empty();
    let mut x: Option<Tensor> = match (&batch.pixel_values, has_images) {
        (Some(px), true) => Some(px.clone()),
        (None, true) => return Err(Error::Batch("images listed but no pixel_values".into())),
        _ => None,
    };
    let n = prep.loss_positions.len();
    let run = Run {
        model,
        batch,
        prep,
        ctx,
    };
    for seg in chain(model, has_images) {
        if seg == Segment::Head {
            break;
        }
        x = Some(run.forward(seg, x.as_ref())?.detach());
    }
    let h = x.ok_or_else(|| Error::Batch("no hidden states".into()))?;
    let nll = model.head_nll(&h, &run.prep)?.detach();
    Ok(MicroBatchLoss {
        loss: (nll / n.max(1) as f64)?,
        targets: n,
    })
}
