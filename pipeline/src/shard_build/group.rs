//! Groups, batches and shards, planned from exact lengths only (before any pixel is decoded).
//!
//! Per modality: a seeded shuffle, cut into pools of `group_size × length_pool_groups` samples;
//! each pool sorted by length (descending, ties by pass-1 order) and cut into groups of
//! `group_size`, each group into batches of `batch_size` consecutive samples. Neighbouring
//! samples of a sorted pool have similar lengths, so batches pad little and the batches of one
//! group (which a trainer spreads over its ranks) carry similar token counts.

use serde::{Deserialize, Serialize};

use super::pass1::SampleMeta;
use super::BuildContext;
use llava_formats::constants::TILE_SIZE;
use llava_formats::rng::{shuffle, SplitMix64};
use llava_formats::tile_codec::TileEncoding;

/// One group: `len` consecutive entries of [`Plan::order`] from `start`, cut into batches of
/// `batch_size` (the last may be short).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub id: u32,
    pub is_image: bool,
    pub start: u32,
    pub len: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPlan {
    pub file: String,
    pub is_image: bool,
    /// Range of group ids.
    pub first_group: u32,
    pub groups: u32,
    /// Global id of the first batch of the shard.
    pub first_batch: u32,
}

/// The plan: 4 bytes per sample (`order`) plus 16 per group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Sample ordinals (indices into pass 1's `samples`), group after group.
    pub order: Vec<u32>,
    pub groups: Vec<Group>,
    pub shards: Vec<ShardPlan>,
    pub batch_size: usize,
}

impl Plan {
    /// The batches of `group`, each a slice of sample ordinals.
    pub fn batches(&self, group: &Group) -> std::slice::Chunks<'_, u32> {
        let start = group.start as usize;
        self.order[start..start + group.len as usize].chunks(self.batch_size)
    }

    /// Batches of `group`.
    pub fn batch_count(&self, group: &Group) -> usize {
        (group.len as usize).div_ceil(self.batch_size)
    }
}

/// Shard sizing only (the plan is made before any pixel exists), per stored tile:
/// `raw-plain`: the uncompressed bytes (3 × 336 × 336), as the version 2 layout did.
const RAW_PLAIN_TILE_BYTES: u64 = 3 * TILE_SIZE as u64 * TILE_SIZE as u64;
/// `raw` (predicted + zstd): conservative; the fixtures' photographs take 85–100 KB a tile.
const RAW_TILE_BYTES: u64 = 160_000;
/// A conservative estimate of a JPEG tile (q95).
const JPEG_TILE_BYTES: u64 = 40_000;

pub fn plan(ctx: &BuildContext, samples: &[SampleMeta]) -> Plan {
    let c = &ctx.config;
    let mut groups = Vec::new();
    let mut all: Vec<u32> = Vec::with_capacity(samples.len());
    for is_image in [true, false] {
        let first = all.len();
        all.extend(
            (0..samples.len() as u32).filter(|&i| samples[i as usize].is_image() == is_image),
        );
        let order = &mut all[first..];
        let purpose = if is_image {
            "group:image"
        } else {
            "group:text"
        };
        shuffle(order, &mut SplitMix64::for_purpose(c.seed, purpose));
        let mut at = first;
        for pool in order.chunks_mut(c.group_size * c.length_pool_groups) {
            pool.sort_by_key(|&i| (std::cmp::Reverse(samples[i as usize].length), i));
            for group in pool.chunks(c.group_size) {
                groups.push(Group {
                    id: groups.len() as u32,
                    is_image,
                    start: at as u32,
                    len: group.len() as u32,
                });
                at += group.len();
            }
        }
    }
    let mut plan = Plan {
        order: all,
        groups,
        shards: Vec::new(),
        batch_size: c.batch_size,
    };

    let tile_bytes = match c.tile_encoding {
        TileEncoding::Jpeg => JPEG_TILE_BYTES,
        TileEncoding::RawPlain => RAW_PLAIN_TILE_BYTES,
        TileEncoding::Raw => RAW_TILE_BYTES,
    };
    let target = c.shard_target_mb * 1024 * 1024;
    let mut shards: Vec<ShardPlan> = Vec::new();
    let mut bytes = 0u64;
    let mut batch_id = 0u32;
    for group in &plan.groups {
        let start = group.start as usize;
        let group_bytes: u64 = plan.order[start..start + group.len as usize]
            .iter()
            .map(|&i| {
                let s = &samples[i as usize];
                u64::from(s.num_tiles) * tile_bytes + u64::from(s.bytes)
            })
            .sum();
        let start_new = match shards.last() {
            None => true,
            Some(last) => last.is_image != group.is_image || bytes >= target,
        };
        if start_new {
            let modality = if group.is_image { "image" } else { "text" };
            let n = shards
                .iter()
                .filter(|s| s.is_image == group.is_image)
                .count();
            shards.push(ShardPlan {
                file: format!("{modality}-{n:05}.parquet"),
                is_image: group.is_image,
                first_group: group.id,
                groups: 0,
                first_batch: batch_id,
            });
            bytes = 0;
        }
        if let Some(last) = shards.last_mut() {
            last.groups += 1;
        }
        bytes += group_bytes;
        batch_id += plan.batch_count(group) as u32;
    }
    plan.shards = shards;
    plan
}
