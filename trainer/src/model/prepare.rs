//! The host-side plan of a batch ([`Prepared`]): image token counts, the gather table that
//! builds the input embeddings, lengths after expansion and truncation, packed-row segments, and
//! the supervised positions. Pure host work on `input_ids` / `labels`: nothing waits for the
//! device.

use candle_core::DType;
use llava_formats::constants::{IGNORE_INDEX, IMAGE_TOKEN_INDEX};

use crate::model::batch::Batch;
use crate::model::llava_next::LlavaNext;
use crate::{Error, Result};

impl LlavaNext {
    /// An image placeholder: -200 (the reference's) or the config's `image_token_index`.
    pub(crate) fn is_placeholder(&self, id: i64) -> bool {
        id == IMAGE_TOKEN_INDEX as i64 || id == self.cfg.image_token_index
    }

    /// The host-side plan of a batch: image token counts from the config, the gather table of
    /// the input embeddings, lengths after expansion and truncation, and the supervised
    /// positions. Reads `input_ids` / `labels` as host data: keep them on the CPU (the training
    /// step does) so that nothing waits for the device.
    pub fn prepare(&self, batch: &Batch) -> Result<Prepared> {
        let ids = batch.input_ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        let b = ids.len();
        let l = ids.first().map_or(0, Vec::len);
        if batch.lengths.len() != b {
            return Err(Error::Batch(format!(
                "{} lengths for {b} rows",
                batch.lengths.len()
            )));
        }
        if let Some(segs) = &batch.segments {
            let ok = segs.len() == b
                && segs
                    .iter()
                    .zip(&batch.lengths)
                    .all(|(s, &n)| s.iter().sum::<usize>() == n);
            if !ok {
                return Err(Error::Batch(
                    "segments must give, per row, sample lengths summing to the row's length"
                        .into(),
                ));
            }
        }
        let labels = match &batch.labels {
            Some(t) => {
                let v = t.to_dtype(DType::I64)?.to_vec2::<i64>()?;
                if v.len() != b || v.iter().any(|r| r.len() != l) {
                    return Err(Error::Batch("labels and input_ids differ in shape".into()));
                }
                Some(v)
            }
            None => None,
        };
        let vocab = self.cfg.text_config.vocab_size as i64;
        let counts: Vec<usize> = batch
            .images
            .iter()
            .map(|m| self.cfg.image_token_count(m))
            .collect::<Result<_>>()?;
        let img_total: usize = counts.iter().sum();
        let mut img_offset = Vec::with_capacity(counts.len());
        let mut acc = 0;
        for c in &counts {
            img_offset.push(acc);
            acc += c;
        }
        // Rows of the gather table: [embeds of all B*L ids | all image tokens | one zero row].
        let text_rows = b * l;
        let zero_row = (text_rows + img_total) as u32;
        let mut safe_ids = Vec::with_capacity(text_rows);
        let mut rows_idx: Vec<Vec<u32>> = Vec::with_capacity(b);
        let mut rows_lab: Vec<Vec<i64>> = Vec::with_capacity(b);
        let mut rows_segs: Vec<Vec<usize>> = Vec::with_capacity(b);
        let mut next_image = 0usize;
        let mut n_placeholders = 0usize;
        for (bi, row) in ids.iter().enumerate() {
            let len = batch.lengths[bi];
            if len > l {
                return Err(Error::Batch(format!("row {bi}: length {len} > {l}")));
            }
            for (p, &id) in row.iter().enumerate() {
                let ok = (0..vocab).contains(&id);
                if p < len && !ok && !self.is_placeholder(id) {
                    return Err(Error::Batch(format!(
                        "row {bi}, position {p}: token id {id} outside the vocabulary of {vocab}"
                    )));
                }
                safe_ids.push(if ok { id as u32 } else { 0 });
            }
            let segs = match &batch.segments {
                Some(s) => s[bi].clone(),
                None => vec![len],
            };
            let mut idx = Vec::with_capacity(len);
            let mut lab = Vec::with_capacity(len);
            let mut seg_lens = Vec::with_capacity(segs.len());
            let mut p = 0;
            for seg_len in segs {
                // Each sample is expanded (and truncated, as the reference truncates each
                // sample) on its own.
                let end = p + seg_len;
                let seg_start = idx.len();
                while p < end {
                    let id = row[p];
                    if !self.is_placeholder(id) {
                        idx.push((bi * l + p) as u32);
                        lab.push(labels.as_ref().map_or(IGNORE_INDEX as i64, |v| v[bi][p]));
                        p += 1;
                        continue;
                    }
                    n_placeholders += 1;
                    let k = next_image;
                    next_image += 1;
                    let Some(&n) = counts.get(k) else {
                        p += 1;
                        continue; // counted; reported below
                    };
                    let run = row[p..end]
                        .iter()
                        .take_while(|&&x| self.is_placeholder(x))
                        .count();
                    p += if run >= n && n > 1 { n } else { 1 };
                    let off = (text_rows + img_offset[k]) as u32;
                    idx.extend(off..off + n as u32);
                    lab.extend(std::iter::repeat_n(IGNORE_INDEX as i64, n));
                }
                if let Some(max) = self.cfg.tokenizer_model_max_length {
                    idx.truncate(seg_start + max);
                    lab.truncate(seg_start + max);
                }
                // A packed sample's first token is no target of the sample before it (in an
                // unpacked row, position 0 is never a target anyway).
                if seg_start > 0 && lab.len() > seg_start {
                    lab[seg_start] = IGNORE_INDEX as i64;
                }
                seg_lens.push(idx.len() - seg_start);
            }
            rows_segs.push(seg_lens);
            rows_idx.push(idx);
            rows_lab.push(lab);
        }
        if n_placeholders != counts.len() {
            return Err(Error::Batch(format!(
                "image features and image tokens do not match: {} images, {n_placeholders} \
                 placeholders (a pre-expanded run counts as one)",
                counts.len()
            )));
        }
        let width = rows_idx.iter().map(Vec::len).max().unwrap_or(0);
        let lengths: Vec<usize> = rows_idx.iter().map(Vec::len).collect();
        let mut gather = Vec::with_capacity(b * width);
        let mut flat_lab = Vec::with_capacity(b * width);
        for (idx, lab) in rows_idx.iter().zip(&rows_lab) {
            gather.extend_from_slice(idx);
            gather.extend(std::iter::repeat_n(zero_row, width - idx.len()));
            flat_lab.extend_from_slice(lab);
            flat_lab.extend(std::iter::repeat_n(IGNORE_INDEX as i64, width - lab.len()));
        }
        // Position t predicts label t + 1 of the same row (packed boundaries are ignored labels).
        let (mut loss_positions, mut loss_targets) = (Vec::new(), Vec::new());
        if labels.is_some() {
            for bi in 0..b {
                let row = &flat_lab[bi * width..(bi + 1) * width];
                for t in 0..width.saturating_sub(1) {
                    let y = row[t + 1];
                    if y == IGNORE_INDEX as i64 {
                        continue;
                    }
                    if !(0..vocab).contains(&y) {
                        return Err(Error::Batch(format!(
                            "row {bi}: label {y} outside the vocabulary of {vocab}"
                        )));
                    }
                    loss_positions.push((bi * width + t) as u32);
                    loss_targets.push(y as u32);
                }
            }
        }
        Ok(Prepared {
            batch: b,
            width,
            text_ids: safe_ids,
            gather,
            image_counts: counts,
            lengths,
            labels: labels.map(|_| flat_lab),
            loss_positions,
            loss_targets,
            segments: batch.segments.as_ref().map(|_| rows_segs),
        })
    }
}

/// The host-side plan of one batch (see [`LlavaNext::prepare`]).
#[derive(Debug, Clone)]
pub struct Prepared {
    pub batch: usize,
    /// Row width after image expansion (`L'`).
    pub width: usize,
    /// `B * L` text ids (placeholders and padding as 0), embedded before the gather.
    pub text_ids: Vec<u32>,
    /// `B * L'` rows of `[text embeds | image tokens | zero row]` forming the input embeddings.
    pub gather: Vec<u32>,
    /// Feature tokens of each image (from the config and the image's geometry).
    pub image_counts: Vec<usize>,
    /// Real tokens per row after expansion and truncation.
    pub lengths: Vec<usize>,
    /// `B * L'` labels after expansion (-100 for image tokens, padding and the first token of each
    /// packed sample but a row's first); None without labels.
    pub labels: Option<Vec<i64>>,
    /// Flat `b * L' + t` positions whose next token is supervised, and those tokens.
    pub loss_positions: Vec<u32>,
    pub loss_targets: Vec<u32>,
    /// Packed rows: each row's samples' lengths after expansion and truncation.
    pub segments: Option<Vec<Vec<usize>>>,
}
