//! Helpers of the end-to-end tests: fixture mixtures in temporary folders, shard readers.

use std::fs::File;
use std::path::{Path, PathBuf};

use llava_data::shard_build::{build, BuildOptions, Partition};
use llava_formats::constants::TILE_SIZE;
use llava_formats::schema::{batch_to_rows, ShardRow};
use llava_trainer::io::checkpoint;
use llava_trainer::io::init::{self, InitSpec};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

pub use llava_test_support::{
    fixtures, repo_root, scratch, scratch_removed_on_success, tokenizer_path, RemoveOnSuccess,
};

/// Bad records, one per reason, plus one good text record (index 4), in JSONL.
pub const BAD_JSONL: &str = r#"{"id": "broken", "conversations": [
{"id": "missing_image", "image": "nope/none.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}
{"id": "system_first", "conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]}
{"id": "corrupt_pixels", "image": "corrupt.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}
{"id": "good_text", "conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]}
"#;

/// Writes `datasets.toml` for the fixture mixture (every source style, plus the bad records) into
/// `dir` and returns its path. `extra` is appended to the top-level keys.
pub fn fixture_mixture(dir: &Path, extra: &str) -> PathBuf {
    let f = fixtures();
    std::fs::write(dir.join("bad.jsonl"), BAD_JSONL).unwrap();
    // A PNG whose header is fine and whose pixel data is not: found only when decoding (pass 2).
    let mut png = std::fs::read(f.join("images/coco/train2017/000000352481.png")).unwrap();
    let mid = png.len() / 2;
    png[mid..mid + 4000].fill(0x55);
    std::fs::write(dir.join("corrupt.png"), png).unwrap();
    let text = format!(
        r#"output = "out"
tokenizer = "{tok}"
seed = 7
batch_size = 2
group_size = 4
length_pool_groups = 2
shard_target_mb = 1
{extra}

[[sources]]
name = "blip"
json = "{f}/data/blip_laion_cc_sbu_558k.json"
image_folder = "{f}/images/llava/llava_pretrain/images"
template = "plain"
image_aspect_ratio = "square"

[[sources]]
name = "instruct"
json = "{f}/data/llava_instruct_150k.json"
image_folder = "{f}/images/coco/train2017"
template = "llava_llama_3"

[[sources]]
name = "mix665k"
json = ["{f}/data/llava_v1_5_mix665k.json"]
image_folder = "{f}/images"
template = "llava_llama_3"
image_aspect_ratio = "anyres"

[[sources]]
name = "sharegpt4v"
json = "{f}/data/sharegpt4v.json"
image_folder = "{f}/images"
template = "llava_llama_3"
sampling = "first:4"

[[sources]]
name = "text"
json = "{f}/data/sharegpt_text.json"
template = "llava_llama_3"

[[sources]]
name = "bad"
json = "bad.jsonl"
image_folder = "."
template = "llava_llama_3"
"#,
        tok = tokenizer_path().display(),
        f = f.display(),
    );
    let path = dir.join("datasets.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Every row of a shard in file order, read with Parquet alone; `raw` tiles are decoded to their CHW bytes
/// (`tile_codec::decode_raw`), so the rows hold what the loader hands over.
pub fn read_shard(path: &Path) -> Vec<ShardRow> {
    let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let encoding = builder
        .schema()
        .metadata()
        .get(llava_formats::schema::META_TILE_ENCODING)
        .cloned()
        .expect("shards record their tile encoding");
    let reader = builder.build().unwrap();
    reader
        .flat_map(|b| batch_to_rows(&b.unwrap()).unwrap())
        .map(|mut row| {
            if encoding == llava_formats::tile_codec::TileEncoding::Raw.name() {
                for t in &mut row.tiles {
                    *t = llava_formats::tile_codec::decode_raw(t, TILE_SIZE as usize)
                        .expect("raw tile decodes");
                }
            }
            row
        })
        .collect()
}

/// (relative path, bytes) of every file under `dir/shards` plus the manifest and rejects.
pub fn output_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for name in ["manifest.json", "rejects.jsonl"] {
        files.push((name.to_string(), std::fs::read(dir.join(name)).unwrap()));
    }
    let mut shards: Vec<_> = std::fs::read_dir(dir.join("shards"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    shards.sort();
    for p in shards {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        files.push((format!("shards/{name}"), std::fs::read(&p).unwrap()));
    }
    files
}

/// Writes `tensors` as `torch.save(OrderedDict(tensors))` does: a zip of `archive/data.pkl`
/// (pickle protocol 2, `torch._utils._rebuild_tensor_v2` over persistent-id storages) and one
/// raw little-endian storage per tensor in `archive/data/<i>`. CI has no torch; this writer's
/// output was checked to load with `torch.load` (torch 2.15.0) when it was written, and the
/// reader is checked against files torch itself made (fixtures/torch/).
pub fn write_torch_zip(path: &Path, tensors: &[(String, candle_core::Tensor)]) {
    use candle_core::DType;
    use std::io::Write;
    fn unicode(p: &mut Vec<u8>, s: &str) {
        p.push(b'X');
        p.extend_from_slice(&(s.len() as u32).to_le_bytes());
        p.extend_from_slice(s.as_bytes());
    }
    fn int(p: &mut Vec<u8>, v: usize) {
        p.push(b'J');
        p.extend_from_slice(&(i32::try_from(v).expect("fits BININT")).to_le_bytes());
    }
    fn global(p: &mut Vec<u8>, module: &str, name: &str) {
        p.push(b'c');
        p.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }
    let mut pkl = vec![0x80, 2];
    global(&mut pkl, "collections", "OrderedDict");
    pkl.extend_from_slice(b")R(");
    let mut storages = Vec::new();
    for (i, (name, t)) in tensors.iter().enumerate() {
        let t = t.flatten_all().expect("flatten");
        let (class, bytes): (&str, Vec<u8>) = match t.dtype() {
            DType::F32 => (
                "FloatStorage",
                t.to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            DType::BF16 => (
                "BFloat16Storage",
                t.to_vec1::<half::bf16>()
                    .unwrap()
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            DType::F16 => (
                "HalfStorage",
                t.to_vec1::<half::f16>()
                    .unwrap()
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            DType::I64 => (
                "LongStorage",
                t.to_vec1::<i64>()
                    .unwrap()
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            d => panic!("write_torch_zip: {d:?} not supported"),
        };
        let dims = tensors[i].1.dims();
        unicode(&mut pkl, name);
        global(&mut pkl, "torch._utils", "_rebuild_tensor_v2");
        pkl.extend_from_slice(b"((");
        unicode(&mut pkl, "storage");
        global(&mut pkl, "torch", class);
        unicode(&mut pkl, &i.to_string());
        unicode(&mut pkl, "cpu");
        int(&mut pkl, t.elem_count());
        pkl.extend_from_slice(b"tQ");
        int(&mut pkl, 0);
        // Contiguous strides, row-major.
        let mut strides = vec![1usize; dims.len()];
        for d in (0..dims.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * dims[d + 1];
        }
        for v in [dims.to_vec(), strides] {
            pkl.push(b'(');
            for x in v {
                int(&mut pkl, x);
            }
            pkl.push(b't');
        }
        pkl.push(0x89); // requires_grad False
        global(&mut pkl, "collections", "OrderedDict");
        pkl.extend_from_slice(b")RtR"); // backward hooks; close the args; rebuild
        storages.push(bytes);
    }
    pkl.extend_from_slice(b"u.");
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut z = zip::ZipWriter::new(File::create(path).expect("create .bin"));
    let mut put = |name: &str, data: &[u8]| {
        z.start_file(format!("archive/{name}"), stored)
            .expect("zip entry");
        z.write_all(data).expect("zip write");
    };
    put("data.pkl", &pkl);
    put("byteorder", b"little");
    for (i, s) in storages.iter().enumerate() {
        put(&format!("data/{i}"), s);
    }
    put("version", b"3\n");
    z.finish().expect("zip finish");
}

/// Pretraining-style shards (`train`, `integrity`): captions (plain) and instructions (llava_llama_3), square images
/// (577 tokens each), flat merge; short rows keep CPU steps fast.
pub fn build_shards(dir: &Path) -> PathBuf {
    build_square_shards(dir, true)
}

/// The shards of `build_shards`, with or without the captions source (`generate` trains on the
/// instructions alone); returns the build's output folder.
pub fn build_square_shards(dir: &Path, with_captions: bool) -> PathBuf {
    let f = fixtures();
    let captions = format!(
        r#"
[[sources]]
name = "blip"
json = "{f}/data/blip_laion_cc_sbu_558k.json"
image_folder = "{f}/images/llava/llava_pretrain/images"
template = "plain"
image_aspect_ratio = "square"
"#,
        f = f.display()
    );
    let text = format!(
        r#"output = "out"
tokenizer = "{tok}"
seed = 7
batch_size = 2
group_size = 2
length_pool_groups = 1
mm_patch_merge_type = "flat"
{captions}
[[sources]]
name = "instruct"
json = "{f}/data/llava_instruct_150k.json"
image_folder = "{f}/images/coco/train2017"
template = "llava_llama_3"
image_aspect_ratio = "square"
"#,
        tok = tokenizer_path().display(),
        captions = if with_captions { captions.as_str() } else { "" },
        f = f.display()
    );
    let config = dir.join("datasets.toml");
    std::fs::write(&config, text).unwrap();
    let opts = BuildOptions {
        output: None,
        partition: Partition::WHOLE,
        progress: false,
    };
    build(&config, &opts).expect("build");
    dir.join("out")
}

/// Tiny model with the fixture's layer counts (so the key set is the fixture's) and the shards'
/// geometry: 336-pixel tiles, patch 14, Llama-3's grown vocabulary.
pub fn tiny_model(dir: &Path) -> PathBuf {
    let spec: InitSpec = serde_json::from_value(serde_json::json!({
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                          "num_attention_heads": 2, "image_size": 336, "patch_size": 14},
        "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128320,
                        "max_position_embeddings": 8192},
        "seed": 1
    }))
    .unwrap();
    let (cfg, varmap) = init::random_model(&spec).expect("init");
    let out = dir.join("tiny-model");
    checkpoint::save_hf_model(&out, &cfg, &varmap, None).expect("save");
    out
}

/// A u8-pixel loader (2 workers) over epoch 0 of `index` as rank 0 of 1, batches as the build
/// grouped them: how the build-to-loader, integrity and object-store tests read a build back.
pub fn epoch0_u8_loader(
    index: &std::sync::Arc<llava_loader::ShardIndex>,
    seed: u64,
    prefetch: usize,
    on_corrupt: llava_loader::OnCorrupt,
) -> llava_loader::DataResult<llava_loader::Loader> {
    use llava_loader::{DataState, EpochPlan, Loader, LoaderConfig, PixelFormat, PlanConfig};
    let cfg = PlanConfig {
        seed,
        world_size: 1,
        batch_size: None,
        pack_length: None,
        across_batches: false,
    };
    let planned = EpochPlan::new(index, &cfg, &DataState::new(0))?.rank(0)?;
    let config = LoaderConfig {
        workers: 2,
        prefetch,
        pixels: PixelFormat::U8,
        on_corrupt,
    };
    Loader::new(std::sync::Arc::clone(index), planned, &config)
}
