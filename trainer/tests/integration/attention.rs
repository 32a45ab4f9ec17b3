//! Blockwise attention equals dense attention, forward and gradients, for every mask the trainer
//! uses: causal GQA with right padding, packed samples inside a row, and bidirectional tiles; at
//! lengths that are not multiples of the block size, and with an empty row.

use candle_core::{DType, Device, Tensor, Var};
use llava_trainer::model::attention::{attend, AttentionKind, AttentionMask};

/// Relative error as in the issue: max |a - e| / max |e|.
fn rel_err(a: &Tensor, e: &Tensor) -> f64 {
    let d = (a - e)
        .and_then(|t| t.abs())
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.max(0))
        .and_then(|t| t.to_scalar::<f32>())
        .expect("diff");
    let m = e
        .abs()
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.max(0))
        .and_then(|t| t.to_scalar::<f32>())
        .expect("max");
    f64::from(d) / f64::from(m).max(f64::MIN_POSITIVE)
}

struct Case {
    name: &'static str,
    b: usize,
    hq: usize,
    hkv: usize,
    l: usize,
    d: usize,
    mask: AttentionMask,
}

/// Output and the gradients of `sum(out · w)` w.r.t. q, k, v.
fn run(case: &Case, kind: AttentionKind, seed: u64) -> (Tensor, Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    let r = |shape: (usize, usize, usize, usize), s: u64| {
        // Deterministic pseudo-random values (candle's randn has no seed on the CPU).
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let mut x = s.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect();
        Tensor::from_vec(v, shape, &dev).expect("tensor")
    };
    let q = Var::from_tensor(&r((case.b, case.hq, case.l, case.d), seed)).expect("q");
    let k = Var::from_tensor(&r((case.b, case.hkv, case.l, case.d), seed + 1)).expect("k");
    let v = Var::from_tensor(&r((case.b, case.hkv, case.l, case.d), seed + 2)).expect("v");
    let w = r((case.b, case.hq, case.l, case.d), seed + 3);
    let scale = 1.0 / (case.d as f64).sqrt();
    let out = attend(
        q.as_tensor(),
        k.as_tensor(),
        v.as_tensor(),
        &case.mask,
        scale,
        kind,
    )
    .expect("attend");
    let grads = (&out * &w)
        .and_then(|t| t.sum_all())
        .and_then(|t| t.backward())
        .expect("backward");
    let g = |x: &Var| grads.get(x.as_tensor()).expect("grad").clone();
    (out, g(&q), g(&k), g(&v))
}

fn cases() -> Vec<Case> {
    let dev = Device::Cpu;
    vec![
        Case {
            name: "causal GQA 4/2 heads, right padding, L=37",
            b: 3,
            hq: 4,
            hkv: 2,
            l: 37,
            d: 16,
            mask: AttentionMask::causal(&[37, 20, 1], 37, &dev).expect("mask"),
        },
        Case {
            name: "causal GQA 8/2, packed samples + padding, L=45",
            b: 2,
            hq: 8,
            hkv: 2,
            l: 45,
            d: 8,
            mask: AttentionMask::causal_packed(&[vec![10, 17, 9], vec![3, 30]], 45, &dev)
                .expect("mask"),
        },
        Case {
            name: "causal MHA, an empty row, L=23",
            b: 2,
            hq: 2,
            hkv: 2,
            l: 23,
            d: 8,
            mask: AttentionMask::causal(&[23, 0], 23, &dev).expect("mask"),
        },
        Case {
            name: "bidirectional (CLIP), L=50",
            b: 3,
            hq: 4,
            hkv: 4,
            l: 50,
            d: 16,
            mask: AttentionMask::bidirectional(3, 50, &dev).expect("mask"),
        },
    ]
}

#[test]
fn blockwise_equals_dense_forward_and_gradients() {
    println!("| case | block | out | dq | dk | dv |");
    let mut worst = 0f64;
    for (i, case) in cases().iter().enumerate() {
        let (o, dq, dk, dv) = run(case, AttentionKind::Dense, 7 + i as u64);
        for block in [1, 5, 8, 16, 64] {
            let (ob, dqb, dkb, dvb) = run(case, AttentionKind::Blockwise { block }, 7 + i as u64);
            let errs = [
                rel_err(&ob, &o),
                rel_err(&dqb, &dq),
                rel_err(&dkb, &dk),
                rel_err(&dvb, &dv),
            ];
            println!(
                "| {} | {block} | {:.1e} | {:.1e} | {:.1e} | {:.1e} |",
                case.name, errs[0], errs[1], errs[2], errs[3]
            );
            for e in errs {
                worst = worst.max(e);
                assert!(
                    e <= 1e-6,
                    "{}: block {block}: relative error {e:e}",
                    case.name
                );
            }
        }
    }
    println!("worst relative error {worst:.2e}");
}

#[test]
fn packed_rows_never_attend_across_samples() {
    // Changing sample 2 of a packed row leaves sample 1's outputs bit-identical.
    let dev = Device::Cpu;
    let mask = AttentionMask::causal_packed(&[vec![6, 5]], 11, &dev).expect("mask");
    let x = Tensor::arange(0f32, (11 * 8) as f32, &dev)
        .and_then(|t| t.affine(0.01, 0.0))
        .and_then(|t| t.reshape((1, 1, 11, 8)))
        .expect("x");
    let y = x
        .narrow(2, 6, 5)
        .and_then(|t| t.affine(-3.0, 1.0))
        .and_then(|t| Tensor::cat(&[&x.narrow(2, 0, 6).expect("a"), &t], 2))
        .expect("y");
    for kind in [AttentionKind::Dense, AttentionKind::Blockwise { block: 4 }] {
        let a = attend(&x, &x, &x, &mask, 0.5, kind).expect("a");
        let b = attend(&y, &y, &y, &mask, 0.5, kind).expect("b");
        let a1 = a.narrow(2, 0, 6).and_then(|t| t.flatten_all()).expect("a1");
        let b1 = b.narrow(2, 0, 6).and_then(|t| t.flatten_all()).expect("b1");
        assert_eq!(
            a1.to_vec1::<f32>().expect("a1"),
            b1.to_vec1::<f32>().expect("b1"),
            "{kind}"
        );
        let a2 = a.narrow(2, 6, 5).and_then(|t| t.flatten_all()).expect("a2");
        let b2 = b.narrow(2, 6, 5).and_then(|t| t.flatten_all()).expect("b2");
        assert_ne!(
            a2.to_vec1::<f32>().expect("a2"),
            b2.to_vec1::<f32>().expect("b2")
        );
    }
}

#[test]
fn bf16_blockwise_tracks_dense() {
    let case = &cases()[0];
    let (o, ..) = run(case, AttentionKind::Dense, 3);
    let dev = Device::Cpu;
    let to = |t: &Tensor| t.to_dtype(DType::BF16).expect("bf16");
    let q = to(&o);
    let out = attend(
        &q,
        &to(&o.narrow(1, 0, 2).expect("k")),
        &to(&o.narrow(1, 2, 2).expect("v")),
        &case.mask,
        0.25,
        AttentionKind::Blockwise { block: 8 },
    )
    .expect("bf16");
    let dense = attend(
        &q.to_dtype(DType::F32).expect("q"),
        &o.narrow(1, 0, 2)
            .and_then(|t| t.to_dtype(DType::BF16))
            .and_then(|t| t.to_dtype(DType::F32))
            .expect("k"),
        &o.narrow(1, 2, 2)
            .and_then(|t| t.to_dtype(DType::BF16))
            .and_then(|t| t.to_dtype(DType::F32))
            .expect("v"),
        &case.mask,
        0.25,
        AttentionKind::Dense,
    )
    .expect("f32");
    assert_eq!(out.dtype(), DType::BF16);
    let e = rel_err(&out.to_dtype(DType::F32).expect("f32"), &dense);
    assert!(e < 1e-2, "bf16 relative error {e}");
    let _ = dev;
}
