//! Llama-3-8B-shaped LLaVA-NeXT: parameter shapes and totals from the config alone (no weights).

use std::collections::HashMap;

use llava_trainer::model::llama::LlamaConfig;
use llava_trainer::LlavaNextConfig;

/// Meta-Llama-3-8B(-Instruct), vocabulary 128256: its `model.safetensors.index.json` gives
/// `"total_size": 16060522496` bytes of bf16 weights, two bytes per parameter.
const LLAMA3_8B: usize = 16_060_522_496 / 2;
/// llava-hf/llama3-llava-next-8b-hf as the Hub lists it: "8.36B params" (three digits).
const LLAMA3_LLAVA_NEXT_8B_BILLIONS: f64 = 8.36;

fn total(shapes: &[(String, Vec<usize>)], prefix: &str) -> usize {
    shapes
        .iter()
        .filter(|(n, _)| n.starts_with(prefix))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum()
}

#[test]
fn llama3_8b_alone() {
    let cfg = LlamaConfig::llama3_8b();
    let shapes = cfg.param_shapes();
    assert_eq!(total(&shapes, ""), LLAMA3_8B);
    assert_eq!(shapes.len(), 1 + 32 * 9 + 2);
}

#[test]
fn llama3_llava_next_8b_shapes_and_totals() {
    let cfg = LlavaNextConfig::llama3_llava_next_8b();
    assert_eq!(cfg.text_config.vocab_size, 128_320);
    let shapes = cfg.param_shapes();
    let by_name: HashMap<&str, &Vec<usize>> = shapes.iter().map(|(n, s)| (n.as_str(), s)).collect();
    assert_eq!(by_name.len(), shapes.len(), "names are unique");

    let expect = [
        (
            "language_model.model.embed_tokens.weight",
            vec![128_320, 4096],
        ),
        ("language_model.lm_head.weight", vec![128_320, 4096]),
        (
            "language_model.model.layers.31.self_attn.q_proj.weight",
            vec![4096, 4096],
        ),
        (
            "language_model.model.layers.31.self_attn.k_proj.weight",
            vec![1024, 4096],
        ),
        (
            "language_model.model.layers.31.self_attn.v_proj.weight",
            vec![1024, 4096],
        ),
        (
            "language_model.model.layers.31.self_attn.o_proj.weight",
            vec![4096, 4096],
        ),
        (
            "language_model.model.layers.31.mlp.gate_proj.weight",
            vec![14336, 4096],
        ),
        (
            "language_model.model.layers.31.mlp.up_proj.weight",
            vec![14336, 4096],
        ),
        (
            "language_model.model.layers.31.mlp.down_proj.weight",
            vec![4096, 14336],
        ),
        (
            "language_model.model.layers.31.input_layernorm.weight",
            vec![4096],
        ),
        ("language_model.model.norm.weight", vec![4096]),
        (
            "vision_tower.vision_model.embeddings.class_embedding",
            vec![1024],
        ),
        (
            "vision_tower.vision_model.embeddings.patch_embedding.weight",
            vec![1024, 3, 14, 14],
        ),
        (
            "vision_tower.vision_model.embeddings.position_embedding.weight",
            vec![577, 1024],
        ),
        (
            "vision_tower.vision_model.encoder.layers.23.mlp.fc1.weight",
            vec![4096, 1024],
        ),
        (
            "vision_tower.vision_model.encoder.layers.23.self_attn.out_proj.bias",
            vec![1024],
        ),
        (
            "vision_tower.vision_model.post_layernorm.weight",
            vec![1024],
        ),
        ("multi_modal_projector.linear_1.weight", vec![4096, 1024]),
        ("multi_modal_projector.linear_2.weight", vec![4096, 4096]),
        ("image_newline", vec![4096]),
    ];
    for (name, shape) in expect {
        assert_eq!(
            by_name.get(name).map(|s| s.as_slice()),
            Some(shape.as_slice()),
            "{name}"
        );
    }
    assert!(!by_name.contains_key("language_model.model.layers.32.input_layernorm.weight"));
    assert!(!by_name.contains_key("vision_tower.vision_model.encoder.layers.24.mlp.fc1.weight"));

    // Vocab 128256 → 128320 adds 64 rows to embed_tokens and to the untied lm_head; nothing
    // else of the LLM differs from the published Llama-3-8B.
    let llm = total(&shapes, "language_model.");
    assert_eq!(llm - LLAMA3_8B, 2 * 64 * 4096);
    let vision = total(&shapes, "vision_tower.");
    let projector = total(&shapes, "multi_modal_projector.");
    let newline = total(&shapes, "image_newline");
    let all = total(&shapes, "");
    assert_eq!(
        all,
        llm + vision + projector + newline,
        "no parameter outside the four parts"
    );
    let billions = (all as f64 / 1e7).round() / 100.0;
    assert_eq!(billions, LLAMA3_LLAVA_NEXT_8B_BILLIONS, "total {all}");
    println!(
        "llama3-llava-next-8b: LLM {llm}, vision {vision}, projector {projector}, newline {newline}, total {all}"
    );
}

#[test]
fn hf_config_defaults_fill_missing_fields() {
    // A minimal HF config: omitted fields take Llama-3-8B / CLIP-L-336 values.
    let cfg = LlavaNextConfig::from_json_str(
        r#"{"text_config": {"vocab_size": 128320, "rope_theta": 500000.0},
            "vision_config": {"hidden_act": "quick_gelu"}, "image_token_index": 128256}"#,
    )
    .expect("parse");
    assert_eq!(
        cfg.param_shapes(),
        LlavaNextConfig::llama3_llava_next_8b().param_shapes()
    );
    assert_eq!(cfg.vision_config.grid_size(), 24);
    assert_eq!(cfg.tokens_per_tile(), 576);
}
