//! The one error type of the data path. `crate::fs::errno` turns it into an errno, and
//! `crate::daemon` into a control-API message; nowhere else translates errors.

use std::io;
use vdbfs_format::{BlockId, FormatError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no space left on the filesystem that holds the store")]
    NoSpace,
    #[error("I/O error: {0}")]
    Io(io::Error),
    #[error("corrupt block {id} (pack {pack}, offset {offset}): {why}")]
    Corrupt {
        id: BlockId,
        pack: u32,
        offset: u64,
        why: String,
    },
    #[error("block {0} is referenced but not in the store")]
    MissingBlock(BlockId),
    /// A block fetched from the object store did not verify, or could not be fetched.
    #[error("block {id} from object {object}: {why}")]
    Remote {
        id: BlockId,
        object: String,
        why: String,
    },
    #[error("corrupt metadata: {0}")]
    CorruptMeta(String),
    #[error("index: {0}")]
    Index(String),
    #[error("the store hit a write error earlier and is read-only until the daemon restarts")]
    Poisoned,
    #[error("not found")]
    NotFound,
    #[error("already exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("name too long")]
    NameTooLong,
    #[error("read-only")]
    ReadOnly,
    #[error("operation not supported")]
    NotSupported,
    #[error("file too large")]
    TooBig,
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => Error::NoSpace,
            _ => Error::Io(e),
        }
    }
}

impl From<FormatError> for Error {
    fn from(e: FormatError) -> Self {
        Error::CorruptMeta(e.to_string())
    }
}

macro_rules! index_err {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Index(e.to_string())
            }
        }
    )*};
}
index_err!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub type Result<T, E = Error> = std::result::Result<T, E>;
