//! Per-core cost of turning a JPEG into anyres tiles, next to the plain libjpeg-turbo decode
//! of the same file, so the ratio (target: convert <= 2x decode) is visible in one run:
//!   cargo bench -p llava-imaging --bench convert
//! Groups: `decode/<img>` = turbojpeg to RGB only; `convert/<img>` = decode_rgb + anyres
//! tiles (recipe pinpoints); `tiles/<img>` = tiling of an already decoded image.

use std::path::PathBuf;
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use llava_imaging::{decode_rgb, make_tiles, AspectMode, RECIPE_PINPOINTS};

const JPEGS: &[&str] = &[
    "llava/llava_pretrain/images/29073/290733225.jpg", // 1280x1024 progressive
    "sam/images/sa_2862.jpg",                          // 900x506 progressive
    "llava/llava_pretrain/images/24724/247245600.jpg", // 512x600 baseline
    "gqa/images/2414911.jpg",                          // 500x500 grey
    "coco/train2017/000000563812.jpg",                 // 320x213
    "sam/images/sa_67233.jpg",                         // 180x181
];

fn bench(c: &mut Criterion) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/images");
    let mode = AspectMode::Anyres(RECIPE_PINPOINTS.to_vec());
    for rel in JPEGS {
        let bytes = std::fs::read(root.join(rel)).expect("fixture jpeg");
        let name = rel.rsplit('/').next().unwrap_or(rel);
        let mut g = c.benchmark_group(name.to_string());
        g.bench_function("decode", |b| {
            b.iter(|| turbojpeg::decompress(black_box(&bytes), turbojpeg::PixelFormat::RGB))
        });
        g.bench_function("convert", |b| {
            b.iter(|| {
                let img = decode_rgb(black_box(&bytes)).expect("decode");
                make_tiles(&img, &mode).expect("tiles")
            })
        });
        let img = decode_rgb(&bytes).expect("decode");
        g.bench_function("tiles", |b| {
            b.iter(|| make_tiles(black_box(&img), &mode).expect("tiles"))
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
