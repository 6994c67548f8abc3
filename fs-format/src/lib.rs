//! The vdbfs on-disk format: pure encode/decode, no I/O. `FORMAT.md` beside this crate is the
//! specification; this code follows it byte for byte.
//!
//! Invariants:
//! - Every file kind starts with a magic and a format version; every record carries a kind tag and
//!   a codec tag, so a codec can be added without rewriting old data.
//! - Decoding never panics on hostile input: truncated or corrupt bytes give a [`FormatError`].
//! - A block's id is the blake3 hash of its *uncompressed* content; readers verify it.

pub mod cache;
pub mod codec;
pub mod index;
pub mod journal;
pub mod manifest;
pub mod pack;
pub mod tree;
mod wire;

pub use codec::Codec;
pub use wire::FormatError;

/// Size of a data block: one PostgreSQL page. See FORMAT.md, "Block size".
pub const BLOCK_SIZE: usize = 8192;

/// The content address of a block or tree object: blake3 of its uncompressed bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub [u8; 32]);

impl BlockId {
    pub fn of(content: &[u8]) -> BlockId {
        BlockId(*blake3::hash(content).as_bytes())
    }
    /// An id stored as 32 bytes (an index key); any other length is invalid.
    pub fn from_slice(b: &[u8]) -> Result<BlockId, FormatError> {
        b.try_into()
            .map(BlockId)
            .map_err(|_| FormatError::Invalid("block id length"))
    }
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Debug for BlockId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

impl std::fmt::Display for BlockId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}
