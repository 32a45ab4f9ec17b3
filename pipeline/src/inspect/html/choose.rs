//! Which samples the report shows: `n` of them, drawn with a seed across sources and length
//! deciles, from the small columns only (source and length per row).

use llava_formats::rng::{shuffle, SplitMix64};

/// Row numbers (in shard order) of up to `n` samples: per source, its rows sorted by length and
/// cut into ten deciles, each decile shuffled; then taken round-robin over the strata (decile
/// `d` of every source before decile `d + 1`, the deciles' order shuffled per source), so that
/// a small `n` still spans the sources and the lengths. Returned sorted by (source, length).
pub fn choose(sources: &[u32], lengths: &[u32], n: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64::for_purpose(seed, "inspect:html:samples");
    let n_sources = sources.iter().copied().max().map_or(0, |m| m as usize + 1);
    let mut by_source: Vec<Vec<usize>> = vec![Vec::new(); n_sources];
    for (i, &s) in sources.iter().enumerate() {
        by_source[s as usize].push(i);
    }
    // strata[source][decile]: rows shuffled.
    let mut strata: Vec<Vec<Vec<usize>>> = Vec::with_capacity(n_sources);
    for rows in &mut by_source {
        rows.sort_by_key(|&i| (lengths[i], i));
        let size = rows.len().div_ceil(10).max(1);
        let mut deciles: Vec<Vec<usize>> = rows.chunks(size).map(<[usize]>::to_vec).collect();
        for d in &mut deciles {
            shuffle(d, &mut rng);
        }
        shuffle(&mut deciles, &mut rng);
        strata.push(deciles);
    }
    let order: Vec<&Vec<usize>> = (0..10)
        .flat_map(|d| strata.iter().filter_map(move |s| s.get(d)))
        .collect();
    let mut chosen = Vec::with_capacity(n);
    let mut round = 0;
    while chosen.len() < n {
        let mut any = false;
        for stratum in &order {
            if let Some(&i) = stratum.get(round) {
                any = true;
                if chosen.len() < n {
                    chosen.push(i);
                }
            }
        }
        if !any {
            break;
        }
        round += 1;
    }
    chosen.sort_by_key(|&i| (sources[i], lengths[i], i));
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_sources_and_deciles_and_is_seeded() {
        // Source 0: 100 rows of lengths 0..100; source 1: 5 rows.
        let mut sources = vec![0u32; 100];
        sources.extend([1; 5]);
        let mut lengths: Vec<u32> = (0..100).collect();
        lengths.extend([7, 8, 9, 10, 11]);
        let a = choose(&sources, &lengths, 12, 3);
        assert_eq!(a, choose(&sources, &lengths, 12, 3));
        assert_eq!(a.len(), 12);
        // Both sources, and every decile of source 0 among its (at least 7) rows.
        let from_1 = a.iter().filter(|&&i| sources[i] == 1).count();
        assert!(from_1 >= 2, "{a:?}");
        let deciles: std::collections::BTreeSet<u32> = a
            .iter()
            .filter(|&&i| sources[i] == 0)
            .map(|&i| lengths[i] / 10)
            .collect();
        assert!(deciles.len() >= 7, "{deciles:?}");
        // Asking for more than there are gives all of them, once.
        let all = choose(&sources, &lengths, 1000, 3);
        assert_eq!(all.len(), 105);
        assert_ne!(choose(&sources, &lengths, 12, 4), a);
    }
}
