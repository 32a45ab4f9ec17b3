//! Model FLOPs of a step, for achieved TFLOP/s and MFU.

use super::BenchSpec;
use crate::io::init;
use crate::model::config::LlavaNextConfig;

/// Model FLOPs of one step (not counting recomputation): per token `6·N + 12·l·h·s` with N the
/// Llama parameters without the embedding table (lm_head included) — torchtitan's and PaLM's
/// formula — and per tile `k·N_v·P + (k/6)·12·l_v·h_v·P²` for the vision layers that run (k = 6
/// when the vision tower trains, 2 when it only runs forward; P = positions per tile).
pub(super) fn model_flops(
    spec: &BenchSpec,
    cfg: &LlavaNextConfig,
    tiles: usize,
    trainable: &dyn Fn(&str) -> bool,
) -> (f64, f64, String) {
    let t = &cfg.text_config;
    let params = init::all_params(cfg);
    let count = |pred: &dyn Fn(&str) -> bool| -> f64 {
        params
            .iter()
            .filter(|(n, _)| pred(n))
            .map(|(_, s)| s.iter().product::<usize>() as f64)
            .sum()
    };
    let n_llm = count(&|n| n.starts_with("language_model.") && !n.contains("embed_tokens"));
    let l = t.num_hidden_layers as f64;
    let per_token = 6.0 * n_llm + 12.0 * l * t.hidden_size as f64 * spec.seq as f64;
    let vision_layers = cfg
        .vision_config
        .layers_for_feature_layer(cfg.vision_feature_layer)
        .unwrap_or(0);
    let n_v = count(&|n| {
        n.starts_with("vision_tower.")
            && n.split(".layers.")
                .nth(1)
                .and_then(|r| r.split('.').next())
                .and_then(|k| k.parse::<usize>().ok())
                .is_some_and(|k| k < vision_layers)
    });
    let k = if params
        .iter()
        .any(|(n, _)| n.starts_with("vision_tower.") && trainable(n))
    {
        6.0
    } else {
        2.0
    };
    let p = cfg.vision_config.num_positions() as f64;
    let per_tile = k * n_v * p
        + k / 6.0 * 12.0 * vision_layers as f64 * cfg.vision_config.hidden_size as f64 * p * p;
    let per_step = per_token * (spec.batch * spec.seq) as f64 + per_tile * tiles as f64;
    let formula = "per token 6·N_llm + 12·layers·hidden·seq (N_llm: Llama without the embedding \
                   table, lm_head included); per tile k·N_vision·577 + (k/6)·12·layers_v·1024·577² \
                   (k = 6 if the vision tower trains, else 2); recomputation not counted; \
                   MFU = model_flops_per_step / step_s / peak_flops (torchtitan)"
        .to_string();
    (per_token, per_step, formula)
}
