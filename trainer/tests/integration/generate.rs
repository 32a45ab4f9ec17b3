//! `generate` against HF transformers' `generate` on the parity fixture (`LLAVA_PARITY_FIXTURE`,
//! default tiny-llava-next-a): greedy, 20 new tokens, each sample's prompt and image, token for
//! token with and without the KV cache (goldens in the fixture's generate.json, made by
//! scripts/make-parity-fixture.py). Then all prompts as one left-padded batch: the same tokens.

use crate::common::load_fixture;

use llava_trainer::generate::{generate, GenerateOptions, Prompt, Sampling};
use serde_json::Value;

fn prompts(fx: &crate::common::Fixture) -> (Vec<Prompt>, Vec<Vec<u32>>, Vec<u32>) {
    let path = fx.dir.join("generate.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (make it with --generate-only)", path.display()));
    let doc: Value = serde_json::from_str(&text).expect("generate.json");
    let ids = fx.inputs["input_ids"].to_vec2::<i64>().expect("ids");
    let px = fx.inputs["pixel_values"].clone();
    let mut out = Vec::new();
    let mut want = Vec::new();
    for p in doc["prompts"].as_array().expect("prompts") {
        let i = p["sample"].as_u64().expect("sample") as usize;
        let n = p["prompt_len"].as_u64().expect("prompt_len") as usize;
        let tiles = fx.num_patches[i];
        let cached: Vec<u32> = serde_json::from_value(p["new_tokens_cached"].clone()).unwrap();
        let uncached: Vec<u32> = serde_json::from_value(p["new_tokens_uncached"].clone()).unwrap();
        assert_eq!(cached, uncached, "HF itself: cache on/off differ");
        out.push(Prompt {
            input_ids: ids[i][..n].to_vec(),
            pixel_values: Some(px.get(i).unwrap().narrow(0, 0, tiles).unwrap()),
            images: vec![fx.images[i]],
        });
        want.push(cached);
    }
    let eos = doc["eos_id"].as_u64().expect("eos_id") as u32;
    (out, want, vec![eos])
}

fn opts(stop_ids: &[u32], use_cache: bool) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: 20,
        sampling: None,
        stop_ids: stop_ids.to_vec(),
        use_cache,
    }
}

#[test]
fn greedy_matches_hf_generate_with_and_without_cache() {
    let fx = load_fixture();
    let (model, _) = fx.model();
    let (prompts, want, stop) = prompts(&fx);
    for use_cache in [true, false] {
        for (p, w) in prompts.iter().zip(&want) {
            let got = generate(&model, std::slice::from_ref(p), &opts(&stop, use_cache))
                .expect("generate");
            assert_eq!(&got[0].tokens, w, "use_cache {use_cache}");
        }
    }
}

#[test]
fn batch_of_different_lengths_gives_the_same_tokens() {
    let fx = load_fixture();
    let (model, _) = fx.model();
    let (prompts, want, stop) = prompts(&fx);
    let got = generate(&model, &prompts, &opts(&stop, true)).expect("generate");
    let lens: Vec<usize> = got.iter().map(|g| g.prompt_tokens).collect();
    assert!(
        lens.iter().any(|&l| l != lens[0]),
        "lengths differ: {lens:?}"
    );
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(&g.tokens, w);
    }
    // Sampling: a seed repeats, and batched equals one at a time.
    let mut o = opts(&stop, true);
    o.sampling = Some(Sampling {
        temperature: 1.0,
        top_p: 0.9,
        seed: 5,
    });
    let batched = generate(&model, &prompts, &o).expect("sample");
    for (p, b) in prompts.iter().zip(&batched) {
        let one = generate(&model, std::slice::from_ref(p), &o).expect("sample one");
        assert_eq!(one[0].tokens, b.tokens);
    }
}
