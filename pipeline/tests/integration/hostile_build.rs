//! A build over deliberately broken and unusual records (issue 13): every one is either written
//! or reported in `rejects.jsonl` with the right kind, and `read = written + rejected`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use llava_data::shard_build::{build, BuildOptions, Partition};
use serde_json::{json, Value};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn tokenizer() -> PathBuf {
    std::env::var_os("LLAVA_TOKENIZER")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache/tokenizer/tokenizer.json"))
}

fn fixture(rel: &str) -> Vec<u8> {
    std::fs::read(repo_root().join("fixtures/images").join(rel)).unwrap()
}

/// A PNG header declaring `w x h` RGB (the IDAT could not fill one row).
fn png_declaring(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    for (kind, data) in [
        (&b"IHDR"[..], &ihdr[..]),
        (b"IDAT", &[0x78, 0x9C, 0x03, 0x00][..]),
        (b"IEND", &[][..]),
    ] {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    out
}

#[test]
fn hostile_records_are_written_or_rejected_with_their_kind() {
    let dir = repo_root()
        .join("target/e2e-scratch")
        .join(format!("hostile-build-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();

    let jpeg = fixture("gqa/images/2337875.jpg");
    // Stray bytes between the first two markers: libjpeg skips them with a warning.
    let at = 4 + usize::from(u16::from_be_bytes([jpeg[4], jpeg[5]]));
    let stray = [&jpeg[..at], &[0x00, 0x13, 0x37][..], &jpeg[at..]].concat();
    let baseline = fixture("gqa/images/2414911.jpg");
    let progressive = fixture("sam/images/sa_2862.jpg");
    let png = fixture("coco/train2017/000000352481.png");
    let gif = fixture("coco/train2017/000000041928.gif");
    let webp = fixture("llava/llava_pretrain/images/39677/396779357.webp");
    let bmp = fixture("textvqa/train_images/86a09d76939d412c.bmp");
    let files: Vec<(&str, Vec<u8>, &str)> = vec![
        ("good.png", png.clone(), "ok"),
        ("stray.jpg", stray, "ok"),
        (
            "cut_baseline.jpg",
            baseline[..baseline.len() / 2].to_vec(),
            "truncated_image",
        ),
        (
            "cut_progressive.jpg",
            progressive[..progressive.len() / 2].to_vec(),
            "truncated_image",
        ),
        ("cut.png", png[..png.len() / 2].to_vec(), "truncated_image"),
        ("cut.gif", gif[..gif.len() / 8].to_vec(), "truncated_image"),
        (
            "cut.webp",
            webp[..webp.len() / 2].to_vec(),
            "truncated_image",
        ),
        ("cut.bmp", bmp[..bmp.len() / 2].to_vec(), "truncated_image"),
        ("bomb.png", png_declaring(40_000, 40_000), "image_too_large"),
    ];
    let mut records = Vec::new();
    let mut want = BTreeMap::new();
    for (name, bytes, kind) in &files {
        std::fs::write(images.join(name), bytes).unwrap();
        records.push(json!({"id": name, "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"},
            {"from": "gpt", "value": "A picture."}]}));
        want.insert(name.to_string(), kind.to_string());
    }
    for (id, conv, kind) in [
        (
            "all_empty",
            json!([{"from":"human","value":""},{"from":"gpt","value":""}]),
            "empty_conversation",
        ),
        // Any text is something to train on, as in the reference (issue 27).
        (
            "blank_answer",
            json!([{"from":"human","value":"Hi?"},{"from":"gpt","value":"  \n"}]),
            "ok",
        ),
        (
            "no_question",
            json!([{"from":"human","value":""},{"from":"gpt","value":"Hello."}]),
            "ok",
        ),
        (
            "fine_text",
            json!([{"from":"human","value":"Hi?"},{"from":"gpt","value":"Hello."}]),
            "ok",
        ),
    ] {
        records.push(json!({"id": id, "conversations": conv}));
        want.insert(id.to_string(), kind.to_string());
    }
    let jsonl: String = records.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(dir.join("hostile.jsonl"), jsonl).unwrap();
    std::fs::write(
        dir.join("datasets.toml"),
        format!(
            r#"output = "out"
tokenizer = "{}"
batch_size = 1
group_size = 1

[[sources]]
name = "hostile"
json = "hostile.jsonl"
image_folder = "images"
template = "llava_llama_3"
"#,
            tokenizer().display()
        ),
    )
    .unwrap();
    let options = BuildOptions {
        output: None,
        partition: Partition::WHOLE,
        progress: false,
    };
    let report = build(&dir.join("datasets.toml"), &options).expect("the build runs");
    let manifest = report.manifest.expect("manifest");

    let rejects = std::fs::read_to_string(dir.join("out/rejects.jsonl")).unwrap();
    let mut got: BTreeMap<String, String> =
        want.keys().map(|k| (k.clone(), "ok".to_string())).collect();
    for line in rejects.lines() {
        let r: Value = serde_json::from_str(line).unwrap();
        let id = r["id"].as_str().unwrap().to_string();
        let reason = r["reason"].as_str().unwrap();
        assert!(!reason.is_empty() && r["source"] == "hostile", "{line}");
        if r["kind"] == "truncated_image" {
            assert!(reason.contains("more byte"), "says what is missing: {line}");
        }
        got.insert(id, r["kind"].as_str().unwrap().to_string());
    }
    assert_eq!(got, want);
    let s = &manifest.sources[0];
    assert_eq!(s.read, want.len() as u64);
    assert_eq!(s.read, s.written + s.rejected);
    assert_eq!(s.written, 5);
    std::fs::remove_dir_all(&dir).ok();
}
