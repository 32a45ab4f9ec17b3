//! Pass 1: select records (sampling), prepare each (tokens + header sizes + exact length) in
//! parallel, spill prepared samples to a work file and keep only a small summary in memory.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use llava_formats::config::Sampling;
use llava_formats::manifest::RejectEntry;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{io_err, BuildContext, BuildError, BuildOptions, WORK_DIR};
use crate::convert::{prepare, Prepared};
// Moved to crate::progress (merge and inspect --verify use them too).
pub use crate::progress::{finish_progress, progress_bar, set_progress_log_interval};
use crate::record::{entry_id, for_each_entry, parse_record, RawEntry};
use llava_formats::rng::{shuffle, SplitMix64};

/// What the plan needs of one sample (kept in memory for every sample: keep it small).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleMeta {
    pub source: u16,
    pub file: u16,
    pub index: u64,
    pub length: u32,
    pub is_image: bool,
    pub num_tiles: u32,
    /// Byte range of the prepared sample in the spill file.
    pub offset: u64,
    pub bytes: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceCounts {
    pub in_files: u64,
    pub read: u64,
}

pub struct Pass1 {
    pub samples: Vec<SampleMeta>,
    pub rejects: Vec<RejectEntry>,
    pub counts: Vec<SourceCounts>,
    pub spill_path: PathBuf,
}

/// Records are prepared this many at a time (parallel inside a chunk, ordered across chunks).
const CHUNK: usize = 1024;

pub fn run(ctx: &BuildContext, options: &BuildOptions) -> Result<Pass1, BuildError> {
    let work = ctx.output.join(WORK_DIR);
    std::fs::create_dir_all(&work).map_err(io_err(&work))?;
    let p = options.partition;
    let spill_path = work.join(format!("prepared-{}-of-{}.jsonl", p.index, p.count));
    let spill_file = File::create(&spill_path).map_err(io_err(&spill_path))?;
    let mut spill = Spill {
        writer: BufWriter::new(spill_file),
        offset: 0,
    };

    // Selection needs each source's record count (percentages, `end:`, `random:`).
    let mut counts = Vec::new();
    let mut selections = Vec::new();
    for (s, source) in ctx.config.sources.iter().enumerate() {
        let mut in_files = 0u64;
        for path in source.json.paths() {
            for_each_entry(&path, &mut |_| in_files += 1)?;
        }
        let selection = select(
            source.sampling,
            in_files as usize,
            ctx.config.seed,
            &source.name,
        );
        counts.push(SourceCounts {
            in_files,
            read: selection.count() as u64,
        });
        selections.push((s, selection));
    }
    let total: u64 = counts.iter().map(|c| c.read).sum();
    let bar = progress_bar(options.progress, total, "pass 1/2: tokenize + sizes");

    let mut samples = Vec::new();
    let mut rejects = Vec::new();
    for (s, selection) in selections {
        let source = &ctx.config.sources[s];
        let mut ordinal = 0usize; // position in the concatenation of the source's files
        for (f, path) in source.json.paths().iter().enumerate() {
            let mut chunk: Vec<RawEntry> = Vec::with_capacity(CHUNK);
            let mut failure = None;
            let mut flush = |chunk: &mut Vec<RawEntry>,
                             samples: &mut Vec<SampleMeta>,
                             rejects: &mut Vec<RejectEntry>|
             -> Result<(), BuildError> {
                let prepared: Vec<_> = chunk
                    .par_iter()
                    .map(|entry| {
                        parse_record(entry).and_then(|r| {
                            prepare(&r, ctx.image_folder(s), &ctx.convert[s], &ctx.tokenizer)
                        })
                    })
                    .collect();
                for (entry, result) in chunk.drain(..).zip(prepared) {
                    match result {
                        Ok(sample) => samples.push(spill.push(s, f, &sample)?),
                        Err(reason) => rejects.push(RejectEntry {
                            source: source.name.clone(),
                            json_file: source.json_as_written[f].clone(),
                            index: entry.index as u64,
                            line: entry.line.map(|l| l as u64),
                            id: entry_id(&entry),
                            kind: reason.kind().to_string(),
                            reason: reason.to_string(),
                        }),
                    }
                    bar.inc(1);
                }
                bar.set_message(format!("{} rejected", rejects.len()));
                Ok(())
            };
            for_each_entry(path, &mut |entry| {
                let selected = selection.contains(ordinal);
                ordinal += 1;
                if !selected || failure.is_some() {
                    return;
                }
                chunk.push(entry);
                if chunk.len() == CHUNK {
                    if let Err(e) = flush(&mut chunk, &mut samples, &mut rejects) {
                        failure = Some(e);
                    }
                }
            })?;
            if let Some(e) = failure {
                return Err(e);
            }
            flush(&mut chunk, &mut samples, &mut rejects)?;
        }
    }
    spill.writer.flush().map_err(io_err(&spill_path))?;
    finish_progress(&bar);
    Ok(Pass1 {
        samples,
        rejects,
        counts,
        spill_path,
    })
}

struct Spill {
    writer: BufWriter<File>,
    offset: u64,
}

impl Spill {
    fn push(
        &mut self,
        source: usize,
        file: usize,
        sample: &Prepared,
    ) -> Result<SampleMeta, BuildError> {
        let mut line = serde_json::to_vec(sample).map_err(|e| BuildError::Plan(e.to_string()))?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(|e| BuildError::Io {
            path: PathBuf::from("(spill)"),
            source: e,
        })?;
        let meta = SampleMeta {
            source: source as u16,
            file: file as u16,
            index: sample.index as u64,
            length: sample.length as u32,
            is_image: !sample.images.is_empty(),
            num_tiles: sample.num_tiles() as u32,
            offset: self.offset,
            bytes: line.len() as u32,
        };
        self.offset += line.len() as u64;
        Ok(meta)
    }
}

/// Which positions of a source (over the concatenation of its files) are used.
pub enum Selection {
    Range(std::ops::Range<usize>),
    /// Sorted positions.
    Set(Vec<usize>),
}

impl Selection {
    pub fn count(&self) -> usize {
        match self {
            Selection::Range(r) => r.len(),
            Selection::Set(s) => s.len(),
        }
    }
    pub fn contains(&self, i: usize) -> bool {
        match self {
            Selection::Range(r) => r.contains(&i),
            Selection::Set(s) => s.binary_search(&i).is_ok(),
        }
    }
}

/// Applies a sampling rule to `len` records; `random:` is seeded per source name, and keeps the
/// chosen records in file order (the order inside an epoch is the trainer's business).
pub fn select(sampling: Sampling, len: usize, seed: u64, source: &str) -> Selection {
    match sampling {
        Sampling::All => Selection::Range(0..len),
        Sampling::First(c) => Selection::Range(0..c.resolve(len)),
        Sampling::End(c) => Selection::Range(len - c.resolve(len)..len),
        Sampling::Random(c) => {
            let mut all: Vec<usize> = (0..len).collect();
            shuffle(
                &mut all,
                &mut SplitMix64::for_purpose(seed, &format!("sampling:{source}")),
            );
            all.truncate(c.resolve(len));
            all.sort_unstable();
            Selection::Set(all)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llava_formats::config::Count;

    #[test]
    fn sampling_rules() {
        assert_eq!(select(Sampling::All, 5, 0, "a").count(), 5);
        let s = select(Sampling::End(Count::Records(2)), 5, 0, "a");
        assert!(s.contains(3) && s.contains(4) && !s.contains(2));
        let r1 = select(Sampling::Random(Count::Percent(50.0)), 9, 7, "a");
        let r2 = select(Sampling::Random(Count::Percent(50.0)), 9, 7, "a");
        assert_eq!(r1.count(), 5);
        assert!((0..9).all(|i| r1.contains(i) == r2.contains(i)));
    }
}
