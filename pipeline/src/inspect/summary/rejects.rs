//! Rejected records: per source from the manifest, per kind from `rejects.jsonl`.

use std::collections::BTreeMap;

use super::report::{KindCount, RejectSummary, SourceRejects};
use crate::inspect::{BuildDir, InspectError};

pub(super) fn reject_summary(build: &BuildDir) -> Result<RejectSummary, InspectError> {
    let m = &build.manifest;
    let mut kinds: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for r in build.rejects()? {
        let e = kinds.entry(r.kind.clone()).or_insert((0, r.reason.clone()));
        e.0 += 1;
    }
    let mut by_kind: Vec<KindCount> = kinds
        .into_iter()
        .map(|(kind, (count, example))| KindCount {
            kind,
            count,
            example,
        })
        .collect();
    by_kind.sort_by(|a, b| b.count.cmp(&a.count).then(a.kind.cmp(&b.kind)));
    Ok(RejectSummary {
        total: m.totals.rejected,
        by_source: m
            .sources
            .iter()
            .map(|s| SourceRejects {
                source: s.name.clone(),
                read: s.read,
                written: s.written,
                rejected: s.rejected,
            })
            .collect(),
        by_kind,
    })
}
