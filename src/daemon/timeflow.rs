//! The TimeFlow view (`vdbfs timeflow`): datasets, their snapshots and bookmarks, and the
//! datasets and VDBs made from each snapshot, as a tree. It only reads: the catalog, the
//! source and VDB records, and each VDB's state.
//!
//! Invariant: a dataset hangs under the snapshot it was made from when that snapshot still
//! exists (a VDB's current parent, else a clone's origin); otherwise it is a root.

use super::Daemon;
use crate::api::{NodeKind, TimeflowNode};
use crate::source::{SourceRecord, SourceService};
use crate::tree::{NameError, SnapshotInfo};
use crate::vdb::VdbRecord;
use std::collections::{HashMap, HashSet};

impl Daemon {
    pub(super) fn timeflow(&self, only: Option<&str>) -> anyhow::Result<Vec<TimeflowNode>> {
        let datasets: Vec<_> = self
            .datasets
            .list()?
            .into_iter()
            .filter(|r| !crate::tree::is_internal(&r.name))
            .collect();
        if let Some(d) = only {
            if !datasets.iter().any(|r| r.name == d) {
                return Err(NameError::NotFound(d.to_string()).into());
            }
        }
        let sources: HashMap<String, SourceRecord> = self
            .sources
            .records()?
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect();
        let vdbs: HashMap<String, VdbRecord> = self
            .vdbs
            .records()?
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect();
        let mut snaps: HashMap<String, Vec<SnapshotInfo>> = HashMap::new();
        for s in self.datasets.snapshots(None)? {
            snaps.entry(s.dataset.clone()).or_default().push(s);
        }
        // Parent snapshot of each dataset: a VDB's current parent, else a clone's origin.
        let mut parent_of: HashMap<String, String> = HashMap::new();
        for r in &datasets {
            let p = match vdbs.get(&r.name) {
                Some(v) => Some(v.parent.clone()),
                None => self.datasets.origin(r.id)?,
            };
            if let Some(p) = p {
                parent_of.insert(r.name.clone(), p);
            }
        }
        let all_snaps: HashSet<String> = snaps.values().flatten().map(|s| s.full_name()).collect();
        let mut children_of: HashMap<String, Vec<String>> = HashMap::new();
        let mut roots = Vec::new();
        for r in &datasets {
            match parent_of.get(&r.name).filter(|p| all_snaps.contains(*p)) {
                Some(p) => children_of
                    .entry(p.clone())
                    .or_default()
                    .push(r.name.clone()),
                None => roots.push(r.name.clone()),
            }
        }
        let ctx = FlowCtx {
            daemon: self,
            sources: &sources,
            vdbs: &vdbs,
            snaps: &snaps,
            children_of: &children_of,
            parent_of: &parent_of,
        };
        Ok(match only {
            Some(d) => vec![ctx.node(d, 0)],
            None => roots.iter().map(|d| ctx.node(d, 0)).collect(),
        })
    }
}

struct FlowCtx<'a> {
    daemon: &'a Daemon,
    sources: &'a HashMap<String, SourceRecord>,
    vdbs: &'a HashMap<String, VdbRecord>,
    snaps: &'a HashMap<String, Vec<SnapshotInfo>>,
    children_of: &'a HashMap<String, Vec<String>>,
    parent_of: &'a HashMap<String, String>,
}

fn empty(kind: NodeKind, name: String) -> TimeflowNode {
    TimeflowNode {
        kind,
        name,
        lsn: None,
        timeline: None,
        created: None,
        state: None,
        port: None,
        note: None,
        marks: Default::default(),
        ranges: Vec::new(),
        children: Vec::new(),
    }
}

impl FlowCtx<'_> {
    fn node(&self, dataset: &str, depth: usize) -> TimeflowNode {
        let mut n = empty(NodeKind::Dataset, dataset.to_string());
        if let Some(s) = self.sources.get(dataset) {
            n.kind = NodeKind::Source;
            n.state = Some(SourceService::flow_state(s));
            n.note = Some(s.mode.as_str().into());
            n.created = Some(s.created.clone());
            if !s.linking {
                n.ranges = self.daemon.sources.ranges(dataset).unwrap_or_default();
            }
        } else if let Some(v) = self.vdbs.get(dataset) {
            n.kind = NodeKind::Vdb;
            n.port = Some(v.port);
            n.created = Some(v.created.clone());
            n.state = Some(self.daemon.vdbs.state_of(v).0.into());
            n.ranges = self.daemon.vdbs.history_of(v).into_iter().collect();
        } else if let Some(p) = self.parent_of.get(dataset) {
            n.note = Some(format!("clone of {p}"));
        }
        if depth > 64 {
            return n; // a cycle cannot happen (clones point at older snapshots); stay safe
        }
        let source = self.sources.get(dataset);
        let prepared = source
            .map(|_| self.daemon.sources.prepared_images(dataset))
            .unwrap_or_default();
        for s in self.snaps.get(dataset).into_iter().flatten() {
            let full = s.full_name();
            let mut sn = empty(NodeKind::Snapshot, full.clone());
            sn.created = Some(crate::time::rfc3339(s.rec.created.secs));
            if let Some(p) = crate::source::snapshot_props(s) {
                if let Some(src) = source {
                    sn.marks = crate::source::marks(&p, prepared.contains(&s.rec.name), src.verify);
                }
                sn.lsn = Some(p.lsn);
                sn.timeline = Some(p.timeline);
                sn.note = Some("validated sync".into());
            } else if let Some(p) = crate::vdb::snapshot_props(s) {
                sn.lsn = p.lsn;
                sn.timeline = p.timeline;
                match p.kind {
                    crate::api::SnapshotKind::Bookmark => sn.kind = NodeKind::Bookmark,
                    crate::api::SnapshotKind::Auto => sn.note = Some("automatic undo point".into()),
                    crate::api::SnapshotKind::Base => continue,
                    crate::api::SnapshotKind::Snapshot => {}
                }
            }
            for c in self.children_of.get(&full).into_iter().flatten() {
                sn.children.push(self.node(c, depth + 1));
            }
            n.children.push(sn);
        }
        n
    }
}
