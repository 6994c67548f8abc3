//! A filter of the block ids the store may hold, in front of the index for writers' dedup
//! checks. Nearly every block written is new (WAL pages, changed relation pages), and asking the
//! index about a block it does not hold costs a B-tree descent per write; the filter answers
//! "certainly new" for most of them from memory.
//!
//! Invariants:
//! - Once [`Seen::ready`], every id in the index or waiting in `recent` has its bits set: no
//!   false "new". Ids are added when they are appended (before anyone can look them up), and
//!   the background fill adds every id the index held when it started; whatever was indexed
//!   after that was appended by this process, so it was added on append.
//! - Until it is ready the filter answers "maybe" for everything: writers ask the index as
//!   before. A wrong "maybe" only costs that lookup; ids the collector removed keep their bits
//!   (a Bloom filter cannot forget), which only costs lookups too.
//! - A wrong "new" would write a second copy of a block (wasted space, never wrong data: the
//!   index then points at the newer copy and the collector reclaims the older), so correctness
//!   does not depend on the filter; only the space does.
//!
//! Sizing: 16 bits per block indexed at open (at least 1 MiB, at most 128 MiB: 2 MiB per
//! million blocks, about 10 GiB of data), 4 probes taken from the id itself (ids are blake3
//! hashes, so their words are uniform): 0.24 % false "maybe" at the size the store had at open,
//! 2.4 % at twice that (8 bits per block, which is also what the cap leaves at 1 TiB of data).
//! A false "maybe" costs a lookup, never correctness.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use vdbfs_format::BlockId;

pub struct Seen {
    words: Vec<AtomicU64>,
    /// Bit index mask (the number of bits is a power of two).
    mask: u64,
    ready: AtomicBool,
}

const PROBES: usize = 4;

impl Seen {
    /// A filter sized for `blocks` ids (16 bits each, at least 1 MiB, at most 128 MiB).
    pub fn with_capacity(blocks: u64) -> Seen {
        let bits = (blocks.saturating_mul(16))
            .clamp(8 << 20, 1 << 30)
            .next_power_of_two();
        Seen {
            words: (0..bits / 64).map(|_| AtomicU64::new(0)).collect(),
            mask: bits - 1,
            ready: AtomicBool::new(false),
        }
    }

    fn probes(&self, id: &BlockId) -> [u64; PROBES] {
        let mut out = [0u64; PROBES];
        for (i, o) in out.iter_mut().enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&id.0[i * 8..i * 8 + 8]);
            *o = u64::from_le_bytes(w) & self.mask;
        }
        out
    }

    pub fn add(&self, id: &BlockId) {
        for b in self.probes(id) {
            self.words[(b / 64) as usize].fetch_or(1 << (b % 64), Ordering::Relaxed);
        }
    }

    /// Whether `id` is certainly not in the store (only once the filter is ready).
    pub fn certainly_new(&self, id: &BlockId) -> bool {
        if !self.ready.load(Ordering::Acquire) {
            return false;
        }
        self.probes(id)
            .iter()
            .any(|b| self.words[(b / 64) as usize].load(Ordering::Relaxed) & (1 << (b % 64)) == 0)
    }

    /// Marks the filter complete: the caller added every id the index held.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_ids_are_never_new_and_most_others_are() {
        let s = Seen::with_capacity(10_000);
        let ids: Vec<BlockId> = (0..10_000u32)
            .map(|i| BlockId::of(&i.to_le_bytes()))
            .collect();
        for id in &ids {
            s.add(id);
        }
        // Not ready: nothing is certainly new.
        assert!(!s.certainly_new(&BlockId::of(b"other")));
        s.set_ready();
        assert!(ids.iter().all(|id| !s.certainly_new(id)));
        let others = (10_000..20_000u32)
            .filter(|i| s.certainly_new(&BlockId::of(&i.to_le_bytes())))
            .count();
        assert!(
            others > 9_900,
            "only {others} of 10000 new ids were known new"
        );
    }
}
