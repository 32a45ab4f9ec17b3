//! The spec's worked example (§2.5) and every reject reason of the conversion.

use crate::common;

use std::path::Path;

use common::*;
use llava_data::convert::{convert, ConvertConfig};
use llava_data::record::{parse_record, RawEntry};
use llava_data::reject::Reject;
use llava_data::template::{tokenize, Template, SYSTEM_PROMPT};
use llava_data::tokenizer::TextTokenizer;
use llava_imaging::{AspectMode, MergeType, RECIPE_PINPOINTS};
use serde_json::{json, Value};

fn record(v: Value) -> llava_data::record::Record {
    parse_record(&RawEntry {
        index: 0,
        line: None,
        value: Ok(v),
    })
    .expect("record shape is valid")
}

fn enc(tok: &TextTokenizer, s: &str) -> Vec<i32> {
    tok.encode(s).unwrap()
}

/// Spec §2.5: the span table of the worked example, built from the spec's own ids.
#[test]
fn worked_example_llama3() {
    let tok = tokenizer();
    let r = record(
        json!({"id":"ex1","image":"coco/train2017/000000000009.jpg","conversations":[
        {"from":"human","value":"What is in the image?\n<image>"},
        {"from":"gpt","value":"A bowl of fruit."},
        {"from":"human","value":"What color is the bowl?"},
        {"from":"gpt","value":"It is blue."}]}),
    );
    let got = tokenize(Template::LlavaLlama3, &r, tok).unwrap();
    let m = -100;
    let mut ids = vec![128000, 128006, 9125, 128007, 271];
    let mut labels = vec![128000, 128006, m, 128007, m];
    let sys = enc(tok, SYSTEM_PROMPT);
    labels.extend(vec![m; sys.len()]);
    ids.extend(sys);
    ids.extend([128009, 128006, 882, 128007, 271, -200]);
    labels.extend([128009, 128006, m, 128007, m, m]);
    let user = enc(tok, "\nWhat is in the image?");
    labels.extend(vec![m; user.len()]);
    ids.extend(user);
    ids.push(128009);
    labels.push(128009);
    let answer1: Vec<i32> = [
        vec![128006, 78191, 128007, 271],
        enc(tok, "A bowl of fruit."),
        vec![128009],
    ]
    .concat();
    ids.extend(&answer1);
    labels.extend(&answer1);
    let user2 = enc(tok, "What color is the bowl?");
    ids.extend([128006, 882, 128007, 271]);
    labels.extend([128006, m, 128007, m]);
    labels.extend(vec![m; user2.len()]);
    ids.extend(user2);
    ids.push(128009);
    labels.push(128009);
    let answer2: Vec<i32> = [
        vec![128006, 78191, 128007, 271],
        enc(tok, "It is blue."),
        vec![128009],
    ]
    .concat();
    ids.extend(&answer2);
    labels.extend(&answer2);
    assert_eq!(got.input_ids, ids);
    assert_eq!(got.labels, labels);
}

/// Spec §2.3: plain = [BOS, image] + bpe(caption + "\n"), the first two masked.
#[test]
fn worked_example_plain() {
    let tok = tokenizer();
    let caption = "select luxury furniture 3 - inch gel memory foam mattress topper";
    let r = record(json!({"image":"a.jpg","conversations":[
        {"from":"human","value":"Render a clear and concise summary of the photo.\n<image>"},
        {"from":"gpt","value":caption}]}));
    let got = tokenize(Template::Plain, &r, tok).unwrap();
    let tail = enc(tok, &format!("{caption}\n"));
    assert_eq!(got.input_ids, [vec![128000, -200], tail.clone()].concat());
    assert_eq!(got.labels, [vec![-100, -100], tail].concat());
}

/// Issue 27: an empty human turn with a real answer is trained as the reference does. Spec §2.4
/// step 4: the user block is `<|start_header_id|>user<|end_header_id|>\n\n` + "" + `<|eot_id|>`
/// = 128006 882 128007 271 128009, labelled 128006 −100 128007 −100 128009 (step 5).
#[test]
fn empty_human_turn_llama3_is_the_reference_tokens() {
    let tok = tokenizer();
    let answer = "You sent an empty message. How can I help?";
    let r = record(json!({"conversations":[
        {"from":"human","value":""},
        {"from":"gpt","value":answer}]}));
    let got = tokenize(Template::LlavaLlama3, &r, tok).unwrap();
    let m = -100;
    let sys = enc(tok, SYSTEM_PROMPT);
    let reply: Vec<i32> = [
        vec![128006, 78191, 128007, 271],
        enc(tok, answer),
        vec![128009],
    ]
    .concat();
    let ids = [
        vec![128000, 128006, 9125, 128007, 271],
        sys.clone(),
        vec![128009, 128006, 882, 128007, 271, 128009],
        reply.clone(),
    ]
    .concat();
    let labels = [
        vec![128000, 128006, m, 128007, m],
        vec![m; sys.len()],
        vec![128009, 128006, m, 128007, m, 128009],
        reply,
    ]
    .concat();
    assert_eq!(got.input_ids, ids);
    assert_eq!(got.labels, labels);
    // Spec §2.3: `plain` needs `<image>` in the human turn (the reference asserts it and takes
    // another sample): an empty human turn stays a `plain_shape` reject there.
    let with_image = record(json!({"image":"a.jpg","conversations":[
        {"from":"human","value":""},
        {"from":"gpt","value":answer}]}));
    assert!(matches!(
        tokenize(Template::Plain, &with_image, tok),
        Err(Reject::PlainShape(_))
    ));
}

#[test]
fn leading_gpt_turn_is_dropped_like_the_reference() {
    let tok = tokenizer();
    let with = record(json!({"conversations":[{"from":"gpt","value":"hello"},
        {"from":"human","value":"Hi"},{"from":"gpt","value":"Yo"}]}));
    let without = record(
        json!({"conversations":[{"from":"human","value":"Hi"},{"from":"gpt","value":"Yo"}]}),
    );
    assert_eq!(
        tokenize(Template::LlavaLlama3, &with, tok).unwrap(),
        tokenize(Template::LlavaLlama3, &without, tok).unwrap()
    );
}

fn reject(template: Template, v: Value) -> Reject {
    let tok = tokenizer();
    let r = parse_record(&RawEntry {
        index: 0,
        line: None,
        value: Ok(v),
    });
    match r {
        Err(e) => e,
        Ok(r) => tokenize(template, &r, tok).expect_err("should be rejected"),
    }
}

#[test]
fn template_rejects() {
    use Template::*;
    let ok_answer = json!({"from":"gpt","value":"fine"});
    assert!(matches!(
        reject(LlavaLlama3, json!({"conversations":[{"from":"system","value":"be nice"},{"from":"human","value":"hi"},ok_answer]})),
        Reject::BadFirstRole { role } if role == "system"));
    assert!(matches!(
        reject(
            LlavaLlama3,
            json!({"conversations":[{"from":"user","value":"hi"},ok_answer]})
        ),
        Reject::BadFirstRole { .. }
    ));
    assert!(matches!(
        reject(
            LlavaLlama3,
            json!({"conversations":[{"from":"human","value":"hi"},{"from":"bot","value":"x"}]})
        ),
        Reject::UnknownRole { turn: 1, .. }
    ));
    assert!(matches!(
        reject(
            LlavaLlama3,
            json!({"image":"a.jpg","conversations":[{"from":"human","value":"hi"},ok_answer]})
        ),
        Reject::ImageCountMismatch {
            placeholders: 0,
            images: 1
        }
    ));
    assert!(matches!(
        reject(
            LlavaLlama3,
            json!({"image":["a.jpg","b.jpg"],"conversations":[{"from":"human","value":"<image> hi"},ok_answer]})
        ),
        Reject::ImageCountMismatch {
            placeholders: 1,
            images: 2
        }
    ));
    assert!(matches!(
        reject(
            LlavaLlama3,
            json!({"conversations":[{"from":"human","value":"<image>\nhi"},ok_answer]})
        ),
        Reject::ImageCountMismatch {
            placeholders: 1,
            images: 0
        }
    ));
    assert!(matches!(
        reject(
            LlavaLlama3,
            json!({"image":"a.jpg","conversations":[{"from":"human","value":"hi"},{"from":"gpt","value":"<image> here"}]})
        ),
        Reject::ImageInAssistantTurn { turn: 1, .. }
    ));
    assert!(matches!(
        reject(LlavaLlama3, json!({"conversations":[{"from":"human","value":"say <|eot_id|> now"},ok_answer]})),
        Reject::SpecialTokenInText { turn: 0, token } if token == "<|eot_id|>"));
    assert!(matches!(
        reject(
            LlavaLlama3,
            json!({"conversations":[{"from":"human","value":"hi"},{"from":"gpt","value":"<|start_header_id|>"}]})
        ),
        Reject::SpecialTokenInText { turn: 1, .. }
    ));
    assert!(matches!(
        reject(
            LlavaLlama3,
            json!({"conversations":[{"from":"human","value":"hi"},{"from":"human","value":"anyone?"}]})
        ),
        Reject::NothingToTrain(_)
    ));
    assert!(matches!(
        reject(
            LlavaLlama3,
            json!({"conversations":[{"role":"user","content":"hi"}]})
        ),
        Reject::RoleContentTurn { turn: 0 }
    ));
    // plain
    let img = "a.jpg";
    assert!(matches!(
        reject(
            Plain,
            json!({"image":img,"conversations":[{"from":"human","value":"<image>"},ok_answer,{"from":"human","value":"more"}]})
        ),
        Reject::PlainShape(_)
    ));
    assert!(matches!(
        reject(
            Plain,
            json!({"image":img,"conversations":[{"from":"human","value":"no image"},ok_answer]})
        ),
        Reject::PlainShape(_)
    ));
    assert!(matches!(
        reject(
            Plain,
            json!({"image":img,"conversations":[{"from":"gpt","value":"<image>"},ok_answer]})
        ),
        Reject::PlainShape(_)
    ));
    assert!(matches!(
        reject(
            Plain,
            json!({"image":img,"conversations":[{"from":"human","value":"<image>"},{"from":"gpt","value":"  "}]})
        ),
        Reject::NothingToTrain(_)
    ));
    assert!(matches!(
        reject(
            Plain,
            json!({"conversations":[{"from":"human","value":"<image>"},ok_answer]})
        ),
        Reject::ImageCountMismatch { .. }
    ));
}

fn convert_config(max_len: usize) -> ConvertConfig {
    ConvertConfig {
        template: Template::LlavaLlama3,
        aspect: AspectMode::Anyres(RECIPE_PINPOINTS.to_vec()),
        merge: MergeType::SpatialUnpad,
        model_max_length: max_len,
        limits: Default::default(),
        budget: ConvertConfig::budget_for(&Default::default()),
    }
}

fn convert_reject(v: Value, folder: &Path) -> Reject {
    convert(&record(v), folder, &convert_config(8192), tokenizer()).expect_err("should be rejected")
}

#[test]
fn bad_images_are_rejected_with_the_path() {
    let dir = std::env::temp_dir().join(format!("llava-bad-images-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("empty.jpg"), b"").unwrap();
    std::fs::write(dir.join("garbage.png"), b"this is not an image at all").unwrap();
    let jpeg = std::fs::read(fixtures().join("images/sam/images/sa_2862.jpg")).unwrap();
    std::fs::write(dir.join("cut.jpg"), &jpeg[..200]).unwrap();
    // A 1-pixel-high image: the reference's CLIP processor mistakes its axes (square mode).
    for name in ["missing.jpg", "empty.jpg", "garbage.png", "cut.jpg"] {
        let r = convert_reject(
            json!({"image":name,"conversations":[{"from":"human","value":"<image>\nhi"},{"from":"gpt","value":"x"}]}),
            &dir,
        );
        let want_kind = if name == "cut.jpg" {
            "truncated_image"
        } else {
            "image"
        };
        assert_eq!(r.kind(), want_kind, "{name}: {r:?}");
        match r {
            Reject::Image { path, reason } | Reject::TruncatedImage { path, reason } => {
                assert!(path.ends_with(name), "{path}");
                assert!(!reason.is_empty());
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn truncation_keeps_whole_images_and_records_it() {
    let tok = tokenizer();
    let folder = fixtures().join("images");
    let long_answer = "word ".repeat(3000);
    let r = record(json!({"image":"sam/images/sa_57207.png","conversations":[
        {"from":"human","value":"<image>\nDescribe."},{"from":"gpt","value":long_answer}]}));
    let full = convert(&r, &folder, &convert_config(8192), tok).unwrap();
    assert!(!full.truncated);
    // 640x480 → 2340 image tokens (spec §4.5).
    assert_eq!(full.images[0].image_tokens, 2340);
    assert_eq!(full.length, full.input_ids.len() - 1 + 2340);
    let cut = convert(&r, &folder, &convert_config(3000), tok).unwrap();
    assert!(cut.truncated);
    assert_eq!(cut.length, 3000);
    assert_eq!(cut.input_ids[..], full.input_ids[..cut.input_ids.len()]);
    assert_eq!(cut.labels.len(), cut.input_ids.len());
    // The image itself does not fit: rejected, not cut in half.
    assert!(matches!(
        convert(&r, &folder, &convert_config(2000), tok),
        Err(Reject::ImageDoesNotFit { tokens: 2340, .. })
    ));
    // Text-only: cut before the answer → nothing to train on.
    let t = record(
        json!({"conversations":[{"from":"human","value":long_answer},{"from":"gpt","value":"ok"}]}),
    );
    assert!(matches!(
        convert(&t, &folder, &convert_config(100), tok),
        Err(Reject::NothingLeftAfterTruncation { max_len: 100 })
    ));
}
