//! vdbfs: virtual PostgreSQL databases on a content-addressed, copy-on-write FUSE filesystem.
//!
//! Data path: `fs` (FUSE ops) -> `tree` (inodes, directories, file maps, checkpoints) ->
//! `store` (blocks, packs, redb index) -> `vdbfs_format` (the on-disk encoding).
//!
//! Control path: `cli` -> `api` (request and response types, error kinds) over the control
//! socket -> `daemon` (server, dispatch, supervision, TimeFlow view) -> the services
//! `source::SourceService` and `vdb::VdbService` -> their handles: `catalog` (the datasets of
//! `tree`), `mounts` (the FUSE mounts), `store::records` (typed record tables), `archive` (the WAL kept in the store,
//! in an internal dataset) and `pg` (one managed-postgres lifecycle, provisioning starts, SQL,
//! configuration, ports). `time` is at the bottom.
//!
//! Every arrow points down: no module imports from a module above it.

pub mod api;
pub mod archive;
pub mod auth;
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
