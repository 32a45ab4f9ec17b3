//! Forward + backward of the tiny fixture model on CPU (f32): `cargo bench -p llava-trainer`.

#[path = "../tests/integration/common.rs"]
mod common;

use criterion::{criterion_group, criterion_main, Criterion};

fn fwd_bwd(c: &mut Criterion) {
    let fx = common::load_fixture();
    let (model, _varmap) = fx.model();
    let batch = fx.batch();
    let timing =
        llava_trainer::diag::bench::time_forward_backward(&model, &batch, 2, 10).expect("step");
    println!(
        "tiny-llava-next-a, batch 3 x 85, 13 tiles: forward {:?}, backward {:?} (mean of {})",
        timing.forward, timing.backward, timing.iters
    );
    c.bench_function("tiny_llava_next_forward", |b| {
        b.iter(|| model.forward(&batch).expect("forward"))
    });
    c.bench_function("tiny_llava_next_forward_backward", |b| {
        b.iter(|| {
            let out = model.forward(&batch).expect("forward");
            out.loss.expect("loss").backward().expect("backward")
        })
    });
}

criterion_group!(benches, fwd_bwd);
criterion_main!(benches);
