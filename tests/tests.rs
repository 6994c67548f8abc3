//! The single integration-test binary (`autotests = false`). Each module pins one area of the
//! product's user-visible contract; helpers live in `util`.
//!
//! Most tests need root, /dev/fuse and PostgreSQL 15: they fail loudly when those are missing.
//! Run them one at a time: `cargo test --release --test tests -- --test-threads=1`.

// Test helpers outside #[test] functions unwrap too: a panic there fails the test that called
// them, with its location (clippy.toml allows it inside the tests themselves).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

mod anytime;
mod cli;
mod corruption;
mod crash;
mod enospc;
mod http;
mod interrupt;
mod json;
mod leftovers;
mod libpq;
mod model;
mod mounts;
mod posix;
mod postgres;
mod remote;
mod scrub;
mod snapshots;
mod sources;
mod vdb_crash;
mod vdbs;
mod writeback;
