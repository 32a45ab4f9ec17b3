//! `generate` on a checkpoint written by `llava-trainer run` on the example data (issue 33): the
//! checkpoint's own tokenizer and the build's conversion path (llava_llama_3, square tiles) make
//! the prompt; greedy decoding gives the same tokens with and without the KV cache, and batched
//! with a prompt of another length as one at a time.

use std::path::{Path, PathBuf};

use llava_e2e::*;
use llava_trainer::generate::prompt::{self, Aspect, Template};
use llava_trainer::generate::{generate, GenerateOptions};
use llava_trainer::io::weights::{self, LoadOptions};
use llava_trainer::model::config::LlavaNextConfig;
use llava_trainer::train::{self, RunOptions, TrainConfig};

/// The instructions alone (llava_llama_3), square images, flat merge.
fn shards(dir: &Path) -> PathBuf {
    build_square_shards(dir, false)
}

fn trained_checkpoint(dir: &Path) -> PathBuf {
    let model = tiny_model(dir);
    let mut c = TrainConfig::new(shards(dir), model, dir.join("run"));
    c.lr = 1e-3;
    c.max_steps = Some(2);
    c.save_every = Some(2);
    c.workers = 1;
    c.tokenizer = Some(tokenizer_path());
    c.merge_type = Some(llava_trainer::model::config::MergeType::Flat);
    train::run(&c, RunOptions::default()).expect("run");
    dir.join("run/checkpoint-2")
}

#[test]
fn generate_from_a_run_checkpoint() {
    let (dir, _cleanup) = scratch_removed_on_success("generate");
    let ck = trained_checkpoint(&dir);
    let cfg = LlavaNextConfig::from_file(ck.join("config.json")).expect("config");
    let (model, _, _) = weights::load(&cfg, std::slice::from_ref(&ck), &LoadOptions::default())
        .expect("load checkpoint");
    // A run's checkpoint has no tokenizer.json unless its tokenizer folder had the HF files:
    // then `generate --tokenizer DIR`, as here.
    let tok_file = Some(ck.join("tokenizer.json"))
        .filter(|p| p.is_file())
        .unwrap_or_else(tokenizer_path);
    let tok = tokenizers::Tokenizer::from_file(tok_file).expect("tokenizer");
    assert_eq!(prompt::default_template(&tok), Template::LlavaLlama3);
    let image = fixtures().join("images/coco/train2017/000000352481.png");
    let dev = candle_core::Device::Cpu;
    let (text, with_image) = prompt::build_prompt(
        &tok,
        &cfg,
        "What is in the image?",
        &[image.as_path()],
        &Template::LlavaLlama3.into(),
        Aspect::Square,
        &dev,
    )
    .expect("prompt");
    assert!(
        text.contains("<image>\nWhat is in the image?<|eot_id|>"),
        "{text}"
    );
    let ids = with_image.input_ids.clone();
    assert_eq!(ids[0], 128000, "<|begin_of_text|> first");
    let placeholders = ids.iter().filter(|&&i| i == cfg.image_token_index).count();
    assert_eq!(placeholders, 1, "one <image> placeholder: {ids:?}");
    let (_, text_only) = prompt::build_prompt(
        &tok,
        &cfg,
        "Say something.",
        &[],
        &Template::LlavaLlama3.into(),
        Aspect::Square,
        &dev,
    )
    .expect("prompt");
    let eot = tok.token_to_id("<|eot_id|>").expect("eot");
    let opts = |use_cache| GenerateOptions {
        max_new_tokens: 8,
        sampling: None,
        stop_ids: vec![eot],
        use_cache,
    };
    let prompts = [with_image, text_only];
    let mut singles = Vec::new();
    for p in &prompts {
        let a = generate(&model, std::slice::from_ref(p), &opts(true)).expect("cached");
        let b = generate(&model, std::slice::from_ref(p), &opts(false)).expect("uncached");
        assert_eq!(a[0].tokens, b[0].tokens, "KV cache changes the answer");
        assert!(!a[0].tokens.is_empty());
        singles.push(a[0].clone());
    }
    let n_image = cfg.image_token_count(&prompts[0].images[0]).expect("count");
    assert_eq!(singles[0].prompt_tokens, ids.len() - 1 + n_image);
    let batched = generate(&model, &prompts, &opts(true)).expect("batched");
    assert_eq!(batched, singles, "batched differs from one at a time");
    let answer = tok.decode(&singles[0].tokens, true).expect("decode");
    println!("answer tokens {:?}: {answer:?}", singles[0].tokens);
}

/// `eval_prompts` during a 2-rank (threads) run: rank 0 answers every step while rank 1 waits
/// at the next collective; each answer in log.jsonl is the one `generate`'s path gives on the
/// checkpoint of that step (same tokens); the TensorBoard events hold the answers as text.
#[test]
fn eval_prompts_during_training_equal_generate_on_the_checkpoints() {
    let (dir, _cleanup) = scratch_removed_on_success("eval-generate");
    let model = tiny_model(&dir);
    let image = fixtures().join("images/coco/train2017/000000352481.png");
    let prompts = dir.join("prompts.jsonl");
    std::fs::create_dir_all(dir.join("img")).unwrap();
    std::fs::copy(&image, dir.join("img/a.png")).unwrap();
    std::fs::write(
        &prompts,
        "{\"id\": \"img\", \"prompt\": \"What is in the image?\", \"images\": [\"img/a.png\"]}\n\
         {\"prompt\": \"Say something.\"}\n",
    )
    .unwrap();
    let mut c = TrainConfig::new(shards(&dir), model, dir.join("run"));
    c.lr = 1e-2;
    c.batch_size = Some(1);
    c.max_steps = Some(2);
    c.save_every = Some(1);
    c.workers = 1;
    c.tokenizer = Some(tokenizer_path());
    c.merge_type = Some(llava_trainer::model::config::MergeType::Flat);
    c.tensorboard = Some(dir.join("tb"));
    c.eval_prompts = Some(prompts.clone());
    c.eval_generate_every = Some(1);
    c.eval_max_new_tokens = 6;
    c.validate().expect("valid config");
    train::run_threads(&c, 2, RunOptions::default()).expect("run");

    let log = std::fs::read_to_string(dir.join("run/log.jsonl")).expect("log.jsonl");
    let answers: Vec<train::GenerateLog> = log
        .lines()
        .filter(|l| l.contains("\"answer\""))
        .map(|l| serde_json::from_str(l).expect("a generate record"))
        .collect();
    let ids: Vec<(u64, String)> = answers
        .iter()
        .map(|a| (a.step, a.prompt_id.to_string()))
        .collect();
    assert_eq!(
        ids,
        [(1, "\"img\""), (1, "2"), (2, "\"img\""), (2, "2")]
            .map(|(s, i)| (s, i.to_string()))
            .to_vec(),
        "{log}"
    );
    let tok = tokenizers::Tokenizer::from_file(tokenizer_path()).expect("tokenizer");
    let dev = candle_core::Device::Cpu;
    for step in [1u64, 2] {
        let ck = dir.join(format!("run/checkpoint-{step}"));
        let cfg = LlavaNextConfig::from_file(ck.join("config.json")).expect("config");
        let (m, _, _) = weights::load(&cfg, std::slice::from_ref(&ck), &LoadOptions::default())
            .expect("load checkpoint");
        let items = llava_trainer::generate::input::read_input(&prompts).expect("prompts");
        let mut built = Vec::new();
        for it in &items {
            let imgs: Vec<&Path> = it.images.iter().map(PathBuf::as_path).collect();
            let (_, p) = prompt::build_prompt(
                &tok,
                &cfg,
                &it.prompt,
                &imgs,
                &prompt::default_template(&tok).into(),
                Aspect::Square,
                &dev,
            )
            .expect("prompt");
            built.push(p);
        }
        let opts = GenerateOptions {
            max_new_tokens: 6,
            sampling: None,
            stop_ids: llava_trainer::generate::input::stop_ids(&tok, Some(&ck), &[]),
            use_cache: true,
        };
        for (k, p) in built.iter().enumerate() {
            let g = generate(&m, std::slice::from_ref(p), &opts).expect("generate");
            let logged = &answers[(step as usize - 1) * 2 + k];
            assert_eq!(
                g[0].tokens, logged.tokens,
                "step {step} prompt {k}: generate on checkpoint-{step} differs from the run's"
            );
            assert_eq!(g[0].prompt_tokens, logged.prompt_tokens);
            println!(
                "step {step} prompt {k}: {:?} {:?}",
                logged.tokens, logged.answer
            );
        }
    }
    // TensorBoard: the answers as text summaries (the text plugin's metadata).
    let tb = std::fs::read_dir(dir.join("tb"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let bytes = std::fs::read(tb).unwrap();
    let has = |s: &[u8]| bytes.windows(s.len()).any(|w| w == s);
    assert!(
        has(b"generate/img") && has(b"\x0a\x04text"),
        "no text summary"
    );
    assert!(has(answers[3].answer.as_bytes()) || answers[3].answer.is_empty());
}
