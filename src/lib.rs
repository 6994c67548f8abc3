//! vdbfs: virtual PostgreSQL databases on a content-addressed, copy-on-write FUSE filesystem.
//!
//! Data path: `fs` (FUSE ops) -> `tree` (inodes, directories, file maps, checkpoints) ->
//! `store` (blocks, packs, redb index). Control path: `cli` -> `daemon` (API, mounts, dSource supervision) ->
//! `source` (link, staging standby, validated-sync snapshots) and `vdb` (virtual databases:
//! provisioning, hooks) -> `pg` (PostgreSQL orchestration).

pub mod cli;
pub mod daemon;
pub mod fs;
pub mod pg;
pub mod source;
pub mod store;
pub mod tree;
pub mod vdb;
