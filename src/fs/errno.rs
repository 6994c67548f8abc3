//! The one place where data-path errors become errno values answered to the kernel.

use crate::store::Error;
use fuser::Errno;

pub fn errno(e: &Error) -> Errno {
    match e {
        Error::NoSpace => Errno::ENOSPC,
        Error::NotFound => Errno::ENOENT,
        Error::Exists => Errno::EEXIST,
        Error::NotDir => Errno::ENOTDIR,
        Error::IsDir => Errno::EISDIR,
        Error::NotEmpty => Errno::ENOTEMPTY,
        Error::Invalid(_) => Errno::EINVAL,
        Error::NameTooLong => Errno::ENAMETOOLONG,
        Error::ReadOnly => Errno::EROFS,
        Error::NotSupported => Errno::from_i32(libc::EOPNOTSUPP),
        Error::TooBig => Errno::EFBIG,
        // Corruption, missing data, a poisoned store, index or device errors: never wrong bytes.
        Error::Io(_)
        | Error::Corrupt { .. }
        | Error::MissingBlock(_)
        | Error::Remote { .. }
        | Error::CorruptMeta(_)
        | Error::Index(_)
        | Error::Poisoned => Errno::EIO,
    }
}

/// Whether the error deserves an error log line when it reaches the kernel (user mistakes such
/// as ENOENT or EEXIST do not).
pub fn is_fault(e: &Error) -> bool {
    errno(e) == Errno::EIO
}
