//! Scaled dot-product attention behind one interface, for Llama's causal GQA and CLIP's
//! bidirectional attention.
//!
//! Every mask this trainer needs gives each query a *contiguous* range of visible keys:
//! causal + right padding (`[0, min(i, len - 1)]`), packed samples in one row (`[start of i's
//! sample, i]`) and bidirectional tiles (`[0, L - 1]`). [`AttentionMask`] stores that range per
//! query, so the dense and the blockwise kernels build exactly the same mask, and the blockwise one
//! can skip key blocks no query sees and drop the mask where a block is fully visible.
//!
//! Implementations:
//! - [`dense`]: materialises `[B, H, L, L]` scores; backward through candle's autograd. The
//!   reference, and the cheap choice for CLIP's 577-token tiles.
//! - [`blockwise`]: online-softmax forward over key blocks and a recomputing backward (the
//!   flash-attention algorithm written with tensor ops, so it runs on every device); never holds
//!   more than one `[B, H, block_q, block_k]` score block.
//!
//! A fused CUDA kernel would be a third [`AttentionKind`].

pub mod blockwise;
pub mod dense;
mod mask;

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

pub use mask::{AttentionMask, BlockVisibility};

/// Which attention algorithm a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum AttentionKind {
    /// Full score matrix (memory O(L²) per head).
    Dense,
    /// Key/query blocks of this many positions (memory O(L · block) per head).
    Blockwise { block: usize },
}

impl Default for AttentionKind {
    fn default() -> Self {
        Self::Blockwise {
            block: blockwise::DEFAULT_BLOCK,
        }
    }
}

impl std::str::FromStr for AttentionKind {
    type Err = String;

    /// `dense`, `blockwise` or `blockwise:N`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.split_once(':') {
            None if s == "dense" => Ok(Self::Dense),
            None if s == "blockwise" => Ok(Self::default()),
            Some(("blockwise", n)) => match n.parse::<usize>() {
                Ok(block) if block > 0 => Ok(Self::Blockwise { block }),
                _ => Err(format!("block size {n:?} is not a positive integer")),
            },
            _ => Err(format!(
                "unknown attention {s:?} (dense, blockwise or blockwise:N)"
            )),
        }
    }
}

impl std::fmt::Display for AttentionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dense => write!(f, "dense"),
            Self::Blockwise { block } => write!(f, "blockwise:{block}"),
        }
    }
}

/// `softmax(q kᵀ · scale + mask) v` per head.
///
/// `q`: `[B, Hq, L, d]`; `k`, `v`: `[B, Hkv, L, d]` with `Hq` a multiple of `Hkv` (query head
/// `h` reads key/value head `h / (Hq / Hkv)`, HF's `repeat_kv`). Returns `[B, Hq, L, d]` in the
/// dtype of `q`. Scores, softmax statistics and accumulators are f32 whatever the input dtype.
/// A query that sees no key (an empty row) gets a zero output.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f64,
    kind: AttentionKind,
) -> Result<Tensor> {
    match kind {
        AttentionKind::Dense => dense::attend(q, k, v, mask, scale),
        AttentionKind::Blockwise { block } => blockwise::attend(q, k, v, mask, scale, block),
    }
}

/// Checks the shapes [`attend`] expects; returns `(B, Hq, Hkv, L, d)`.
fn check_shapes(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
) -> Result<(usize, usize, usize, usize, usize)> {
    let (b, hq, l, d) = q.dims4()?;
    let (bk, hkv, lk, dk) = k.dims4()?;
    if (bk, lk, dk) != (b, l, d) || v.dims() != k.dims() {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit together",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    if hkv == 0 || hq % hkv != 0 {
        candle_core::bail!("attention: {hq} query heads are not a multiple of {hkv} kv heads")
    }
    if mask.batch() != b || mask.seq_len() != l {
        candle_core::bail!(
            "attention: mask for {}x{} positions, tensors have {b}x{l}",
            mask.batch(),
            mask.seq_len()
        )
    }
    Ok((b, hq, hkv, l, d))
}
