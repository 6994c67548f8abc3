//! Damage to the log before an acknowledged sync (found by recovery, `store::recovery`), and
//! the datasets it costs: they are refused until the user deletes them, puts them back on a
//! snapshot, or accepts the loss. See FORMAT.md, "Recovery".
//!
//! Which datasets a damage may affect:
//! - an unreadable journal record names its dataset (v2 record header): that dataset;
//! - a lost block (no other copy in the store): the datasets whose replayed journal still
//!   references it at the end of the replay (a block that later writes replaced costs nothing),
//!   and, for a block the last checkpoint indexed, the datasets whose committed tree reaches it;
//! - bytes whose header does not decode (or a v1 journal record, which names no dataset): every
//!   dataset with journal records in the log that recovery read, since any of them may have had
//!   a record there.
//!
//! Only the journal of an affected dataset up to the damage is replayed (for a lost block: up to
//! the first record that references one), so what it holds is the state of its last intact
//! fsync before the damage, a state postgres can recover from, never a mix. A dataset whose
//! committed tree the damage broke (or whose replay fails on damaged data) is not replayed or
//! checkpointed at all: it stays as committed, and the daemon starts. Invariant: a mark is
//! written in the same index transaction as the checkpoint that moves the replay start past the
//! damaged log, so the refusal survives restarts; it is removed only with the dataset, when the
//! dataset is reset to a snapshot, or by `accept_damage`.

use super::walk::{walk_root, Walk};
use super::{Datasets, NameError};
use crate::store::{Damage, Damaged, Error, Result, Store};
use std::collections::{HashMap, HashSet};
use vdbfs_format::index::{DamageKind, DamageMark, DatasetRecord, LogPos};
use vdbfs_format::journal::{JournalOp, JournalRecord};
use vdbfs_format::tree::Timestamp;
use vdbfs_format::BlockId;

/// A dataset refused because of damage (the message names the damage and what to do).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// One fsync's changes of one dataset, complete: its records from `first` to `last`.
pub(super) struct Group {
    pub first: LogPos,
    pub last: LogPos,
    pub dataset: u64,
    pub ops: Vec<JournalOp>,
}

/// The complete groups of the replayable journal records, in the order they complete, and the
/// number of groups whose last record never became durable. Records of deleted datasets, and
/// records before their dataset's `replay_from`, are not replayable.
pub(super) fn groups(
    journal: Vec<(LogPos, JournalRecord)>,
    records: &HashMap<u64, DatasetRecord>,
) -> (Vec<Group>, usize) {
    let mut out = Vec::new();
    let mut open: HashMap<u64, Group> = HashMap::new();
    for (pos, rec) in journal {
        let Some(r) = records.get(&rec.dataset) else {
            continue; // a deleted dataset
        };
        if pos < r.replay_from {
            continue;
        }
        let continued = matches!(rec.ops.last(), Some(JournalOp::Continued));
        let g = open.entry(rec.dataset).or_insert_with(|| Group {
            first: pos,
            last: pos,
            dataset: rec.dataset,
            ops: Vec::new(),
        });
        g.last = pos;
        g.ops.extend(rec.ops);
        if !continued {
            if let Some(g) = open.remove(&rec.dataset) {
                out.push(g);
            }
        }
    }
    (out, open.len())
}

/// What recovery's damage costs each dataset: where its replay must stop (groups ending at or
/// after it are not replayed) and the marks to record.
pub(super) fn assess(
    store: &Store,
    records: &HashMap<u64, DatasetRecord>,
    groups: &[Group],
    with_records: &HashSet<u64>,
    damage: &[Damage],
) -> Result<HashMap<u64, (LogPos, Vec<DamageMark>)>> {
    let found = super::dataset::now();
    let mut out: HashMap<u64, (LogPos, Vec<DamageMark>)> = HashMap::new();
    let mut mark = |ds: u64, cut: LogPos, d: &Damage, kind: DamageKind, block: Option<BlockId>| {
        let e = out.entry(ds).or_insert((cut, Vec::new()));
        e.0 = e.0.min(cut);
        e.1.push(DamageMark {
            at: pos_of(d),
            len: d.len,
            kind,
            block,
            found,
        });
    };
    // Lost blocks: no other copy anywhere in the store. A block the last checkpoint indexed
    // may be found in the index at the damaged record itself: lost too, and committed trees
    // may reference it.
    let mut lost: HashMap<BlockId, &Damage> = HashMap::new();
    let mut committed: HashMap<BlockId, &Damage> = HashMap::new();
    for d in damage {
        if let Damaged::Block(id) = &d.what {
            match store.locate(std::slice::from_ref(id))?[0] {
                Some(l)
                    if l.pack == d.pack && l.offset >= d.offset && l.offset < d.offset + d.len =>
                {
                    lost.insert(*id, d);
                    committed.insert(*id, d);
                }
                Some(_) => tracing::warn!(
                    "recovery: damaged block record {d} has an intact copy elsewhere: nothing lost"
                ),
                None => {
                    lost.insert(*id, d);
                }
            }
        }
    }
    // Committed trees that reach a lost block (rare: only damage in the log of the last
    // checkpoint can hold one): reads of it would fail; the dataset is refused as well.
    let mut used: HashSet<BlockId> = HashSet::new();
    if !committed.is_empty() {
        // Nothing of its journal is replayed: replay would read the broken tree.
        let never = LogPos::default();
        for r in records.values() {
            let mut w = Walk::default();
            let reached: Vec<BlockId> = match walk_root(store, r.root, &mut w) {
                Ok(()) => committed
                    .keys()
                    .filter(|id| w.blocks.contains(*id))
                    .copied()
                    .collect(),
                // A tree that cannot be walked any more reaches the damage.
                Err(_) => committed.keys().copied().collect(),
            };
            for id in reached {
                if let Some(d) = committed.get(&id) {
                    mark(r.id, never, d, DamageKind::Block, Some(id));
                    used.insert(id);
                }
            }
        }
    }
    if !lost.is_empty() {
        // Follow every file block that points at a lost block through the replay.
        let mut refs: HashMap<u64, HashMap<(u64, u64), BlockId>> = HashMap::new();
        let mut first_ref: HashMap<u64, LogPos> = HashMap::new();
        for g in groups {
            let r = refs.entry(g.dataset).or_default();
            for op in &g.ops {
                match op {
                    JournalOp::FileBlocks {
                        ino,
                        base_limit,
                        entries,
                    } => {
                        if *base_limit != u64::MAX {
                            r.retain(|(i, idx), _| !(i == ino && idx >= base_limit));
                        }
                        for (idx, id) in entries {
                            match id {
                                Some(id) if lost.contains_key(id) => {
                                    r.insert((*ino, *idx), *id);
                                    first_ref.entry(g.dataset).or_insert(g.first);
                                }
                                _ => {
                                    r.remove(&(*ino, *idx));
                                }
                            }
                        }
                    }
                    JournalOp::Remove { ino } => r.retain(|(i, _), _| i != ino),
                    _ => {}
                }
            }
        }
        for (ds, r) in &refs {
            let blocks: HashSet<BlockId> = r.values().copied().collect();
            let Some(cut) = first_ref.get(ds).copied() else {
                continue;
            };
            for id in blocks {
                if let Some(d) = lost.get(&id) {
                    mark(*ds, cut, d, DamageKind::Block, Some(id));
                    used.insert(id);
                }
            }
        }
        for (id, d) in &lost {
            if !used.contains(id) {
                tracing::warn!("recovery: lost block {d} is not referenced by any dataset any more: nothing lost");
            }
        }
    }
    for d in damage {
        let at = pos_of(d);
        match &d.what {
            Damaged::Block(_) => {}
            Damaged::Journal(Some(ds)) => match records.get(ds) {
                Some(r) if r.replay_from <= at => mark(*ds, at, d, DamageKind::Journal, None),
                Some(_) => tracing::warn!(
                    "recovery: damaged journal record {d} was already checkpointed: nothing lost"
                ),
                None => tracing::warn!(
                    "recovery: damaged journal record {d} is of a deleted dataset: nothing lost"
                ),
            },
            Damaged::Journal(None) | Damaged::Unknown => {
                let mut any = false;
                for ds in with_records {
                    if records.get(ds).is_some_and(|r| r.replay_from <= at) {
                        mark(*ds, at, d, DamageKind::Unknown, None);
                        any = true;
                    }
                }
                if !any {
                    tracing::warn!("recovery: damaged log bytes {d} come before every dataset's replay position: nothing lost");
                }
            }
        }
    }
    Ok(out)
}

/// Whether an error of replay means the data it read is damaged.
pub(super) fn is_data_error(e: &Error) -> bool {
    matches!(
        e,
        Error::Corrupt { .. } | Error::MissingBlock(_) | Error::CorruptMeta(_)
    )
}

/// Marks for a dataset that damage broke without saying which damage: every one of them.
pub(super) fn unattributed(damage: &[Damage]) -> Vec<DamageMark> {
    let found = super::dataset::now();
    damage
        .iter()
        .map(|d| DamageMark {
            at: pos_of(d),
            len: d.len,
            kind: DamageKind::Unknown,
            block: None,
            found,
        })
        .collect()
}

fn pos_of(d: &Damage) -> LogPos {
    LogPos {
        pack: d.pack,
        offset: d.offset,
    }
}

fn when(t: Timestamp) -> String {
    crate::time::rfc3339(t.secs)
}

/// One mark, for people: where, what, when.
pub fn describe(m: &DamageMark) -> String {
    let what = match (m.kind, m.block) {
        (DamageKind::Block, Some(id)) => format!(
            "block record {id} is lost and the dataset's fsynced changes reference that block"
        ),
        (DamageKind::Block, None) => "a block record the dataset references is lost".to_string(),
        (DamageKind::Journal, _) => {
            "a journal record of the dataset (changes an fsync had made durable) is unreadable"
                .to_string()
        }
        (DamageKind::Unknown, _) => {
            "an unreadable record (it may have held changes of the dataset an fsync had made \
             durable)"
                .to_string()
        }
    };
    format!(
        "pack {:08} offset {} ({} bytes): {what}; found {}",
        m.at.pack,
        m.at.offset,
        m.len,
        when(m.found)
    )
}

/// The refusal of a damaged dataset: what happened and what to do.
pub fn refusal_text(name: &str, marks: &[DamageMark]) -> String {
    let what: Vec<String> = marks.iter().map(describe).collect();
    format!(
        "dataset {name} is damaged: the store lost data it had acknowledged with fsync ({}). It \
         holds what recovery could keep (its state at its last intact fsync before the damage; \
         a block its tree still needs reads as EIO) and is refused until you choose: \
         delete it ('vdbfs dataset delete {name}'; for a VDB 'vdbfs vdb delete {name}'; for a \
         source 'vdbfs source unlink {name} --delete-snapshots', then link it again), put a VDB \
         back on a snapshot ('vdbfs vdb rewind {name} --to SNAPSHOT' or 'vdbfs vdb refresh \
         {name}'), or accept the loss and use it as it is ('vdbfs dataset accept-damage {name}')",
        what.join("; ")
    )
}

impl Datasets {
    /// The damage marks of a dataset (empty when it is not damaged).
    pub fn damage_of(&self, name: &str) -> Result<Vec<DamageMark>> {
        let Some(rec) = self.record(name)? else {
            return Ok(Vec::new());
        };
        Ok(self
            .damaged
            .lock()
            .get(&rec.id)
            .cloned()
            .unwrap_or_default())
    }

    /// The fault a damaged dataset shows in `source status` and `vdb status`, if it is damaged.
    pub fn damage_fault(&self, name: &str) -> Option<String> {
        let marks = self.damage_of(name).ok()?;
        (!marks.is_empty()).then(|| refusal_text(name, &marks))
    }

    /// Every damaged dataset with its refusal text, by name.
    pub fn damaged(&self) -> Result<Vec<(String, String)>> {
        let marks = self.damaged.lock().clone();
        let mut out = Vec::new();
        for r in self.list()? {
            if let Some(m) = marks.get(&r.id) {
                out.push((r.name.clone(), refusal_text(&r.name, m)));
            }
        }
        Ok(out)
    }

    /// Refuses the use of a damaged dataset (mount, snapshot).
    pub fn refuse_if_damaged(&self, name: &str) -> anyhow::Result<()> {
        let marks = self.damage_of(name)?;
        if marks.is_empty() {
            return Ok(());
        }
        Err(Refused(refusal_text(name, &marks)).into())
    }

    pub(super) fn refuse_id_if_damaged(&self, id: u64, name: &str) -> anyhow::Result<()> {
        let marks = self.damaged.lock().get(&id).cloned().unwrap_or_default();
        if marks.is_empty() {
            return Ok(());
        }
        Err(Refused(refusal_text(name, &marks)).into())
    }

    /// Accepts the loss: the dataset is used as it is (its state of its last intact fsync
    /// before the damage). Returns the marks removed.
    pub fn accept_damage(&self, name: &str) -> anyhow::Result<Vec<DamageMark>> {
        let _g = self.checkpoint_lock.lock();
        let rec = self
            .record(name)?
            .ok_or_else(|| NameError::NotFound(name.to_string()))?;
        let marks = self
            .damaged
            .lock()
            .get(&rec.id)
            .cloned()
            .unwrap_or_default();
        if marks.is_empty() {
            return Ok(marks);
        }
        self.store.catalog_write(|c| c.clear_damage(rec.id))?;
        self.damaged.lock().remove(&rec.id);
        tracing::warn!(
            dataset = name,
            "the loss of fsynced data was accepted: the dataset is used as it is"
        );
        Ok(marks)
    }
}
