//! vdbfs: virtual PostgreSQL databases on a content-addressed, copy-on-write FUSE filesystem.
//!
//! Data path: `fs` (FUSE ops) -> `tree` (inodes, directories, file maps, checkpoints) ->
//! `store` (blocks, packs, redb index) -> `vdbfs_format` (the on-disk encoding).
//!
//! Control path: `cli` -> `api` (request and response types, error kinds) over the control
//! socket -> `daemon` (server, dispatch, supervision, TimeFlow view) -> the services
//! `source::SourceService` and `vdb::VdbService` -> their handles: `catalog` (the datasets of
//! `tree`), `mounts` (the FUSE mounts), `store::records` (typed record tables) and `pg` (one
//! managed-postgres lifecycle, SQL, configuration, ports). `time` is at the bottom.
//!
//! Every arrow points down: no module imports from a module above it.

pub mod api;
pub mod catalog;
pub mod cli;
pub mod daemon;
pub mod fs;
pub mod logging;
pub mod mounts;
pub mod pg;
pub mod remote;
pub mod source;
pub mod store;
pub mod time;
pub mod tree;
pub mod vdb;
