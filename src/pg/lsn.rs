//! WAL positions (`X/Y` LSNs) and WAL segment file names (16 MiB segments, the default).

/// Parses "16/B374D848".
pub fn parse(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

pub fn format(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

pub const SEGMENT_SIZE: u64 = 16 << 20;

/// A WAL segment file name `TTTTTTTTLLLLLLLLSSSSSSSS` -> (timeline, segment number).
pub fn parse_segment(name: &str) -> Option<(u32, u64)> {
    parse_segment_sized(name, SEGMENT_SIZE)
}

/// [`parse_segment`] for a cluster made with another `--wal-segsize`.
pub fn parse_segment_sized(name: &str, seg_size: u64) -> Option<(u32, u64)> {
    if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let tli = u32::from_str_radix(&name[..8], 16).ok()?;
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..], 16).ok()?;
    Some((tli, log * (0x1_0000_0000 / seg_size) + seg))
}

pub fn segment_name(tli: u32, segno: u64) -> String {
    let per = 0x1_0000_0000 / SEGMENT_SIZE;
    format!("{tli:08X}{:08X}{:08X}", segno / per, segno % per)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_and_segment_round_trip() {
        assert_eq!(parse("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse("0/0"), Some(0));
        assert_eq!(parse("x"), None);
        let (t, s) = parse_segment("000000010000000A000000FF").unwrap();
        assert_eq!((t, s), (1, 0xA * 256 + 0xFF));
        assert_eq!(segment_name(1, s), "000000010000000A000000FF");
        assert_eq!(parse_segment("00000001.history"), None);
        // The segment holding an LSN.
        assert_eq!(parse("A/FF000028").unwrap() / SEGMENT_SIZE, s);
    }
}
