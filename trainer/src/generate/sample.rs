//! Choosing the next token: greedy argmax (HF `do_sample=False`), or HF's sampling order:
//! temperature, then top-p (nucleus), then a draw from the renormalised distribution, with a
//! seeded SplitMix64 so that a seed gives the same answer on every machine.

use llava_formats::rng::SplitMix64;

/// `None` in [`super::GenerateOptions::sampling`] is greedy decoding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
}

/// Index of the largest logit; the first one on ties (as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// A token drawn from `softmax(logits / temperature)` restricted to the smallest set of most
/// likely tokens whose probability reaches `top_p` (at least one token).
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut SplitMix64) -> u32 {
    if s.temperature <= 0.0 {
        return argmax(logits);
    }
    let t = s.temperature;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut p: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, ((x as f64 - max) / t).exp()))
        .collect();
    let z: f64 = p.iter().map(|x| x.1).sum();
    p.iter_mut().for_each(|x| x.1 /= z);
    p.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut keep = 0;
    let mut acc = 0.0;
    for &(_, q) in &p {
        keep += 1;
        acc += q;
        if acc >= s.top_p {
            break;
        }
    }
    p.truncate(keep.max(1));
    let mass: f64 = p.iter().map(|x| x.1).sum();
    // 53 random bits → uniform in [0, 1).
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * mass;
    let mut acc = 0.0;
    for &(id, q) in &p {
        acc += q;
        if u < acc {
            return id;
        }
    }
    p.last().map_or(0, |x| x.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_first_on_ties() {
        assert_eq!(argmax(&[0.0, 2.0, 2.0, 1.0]), 1);
    }

    #[test]
    fn top_p_keeps_the_nucleus_and_seed_repeats() {
        let logits = [5.0, 4.0, -10.0, -10.0];
        let s = Sampling {
            temperature: 1.0,
            top_p: 0.5,
            seed: 3,
        };
        let mut rng = SplitMix64::new(s.seed);
        // p(0) = 0.73 >= 0.5: only token 0 survives.
        assert!((0..50).all(|_| sample(&logits, &s, &mut rng) == 0));
        let s = Sampling { top_p: 1.0, ..s };
        let draw = |seed| {
            let mut rng = SplitMix64::new(seed);
            (0..64)
                .map(|_| sample(&logits, &s, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(9), draw(9));
        assert!(draw(9).contains(&1) && draw(9).contains(&0));
        assert!(!draw(9).contains(&2));
    }
}
