//! Wall-clock time as the product shows it: RFC 3339 UTC timestamps, "now", and the intervals
//! users write (`30s`, `15m`, `2h`, `7d`). The calendar arithmetic is jiff's.
//!
//! Invariants: this module is at the bottom of the crate (it imports nothing from it), so any
//! layer may use it; what it accepts and prints is pinned by its tests, because records,
//! snapshot names and the CLI's JSON carry these strings.

use jiff::{Span, SpanRelativeTo, Timestamp};
use std::time::Duration;

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    Timestamp::now().as_second()
}

/// RFC 3339 UTC time with whole seconds from Unix seconds: `2026-11-26T08:52:05Z`.
pub fn rfc3339(secs: i64) -> String {
    match Timestamp::from_second(secs) {
        Ok(t) => t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        // Outside jiff's range (years -9999..=9999): no record ever holds such a time.
        Err(_) => format!("@{secs}"),
    }
}

/// The current time as [`rfc3339`] prints it.
pub fn rfc3339_now() -> String {
    rfc3339(now_unix())
}

/// Why an interval was refused; the text is what the CLI prints after `vdbfs: error: `.
/// A time in Unix microseconds as RFC 3339 with microseconds, UTC.
pub fn rfc3339_us(us: i64) -> String {
    match Timestamp::from_microsecond(us) {
        Ok(t) => t.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
        Err(_) => format!("@{us}"),
    }
}

/// Now, in Unix microseconds.
pub fn now_us() -> i64 {
    Timestamp::now().as_microsecond()
}

/// A moment the user wrote (`--at`): RFC 3339 or PostgreSQL's `2026-11-30 14:22:49.123+00`,
/// with its UTC offset; returns Unix microseconds.
pub fn parse_moment(s: &str, what: &str) -> Result<i64, MomentError> {
    let t = s.trim();
    // PostgreSQL prints offsets as +HH; RFC 3339 wants +HH:MM.
    let fixed = match t.rfind(['+', '-']) {
        Some(i)
            if i > 10
                && t[i + 1..].len() == 2
                && t[i + 1..].bytes().all(|b| b.is_ascii_digit()) =>
        {
            format!("{t}:00")
        }
        _ => t.to_string(),
    };
    fixed
        .replacen(' ', "T", 1)
        .parse::<Timestamp>()
        .map(|t| t.as_microsecond())
        .map_err(|_| {
            MomentError(format!(
                "{what} {s:?} is not a time with its UTC offset; write e.g. \
                 '2026-11-30 14:22:49+00' or 2026-11-30T14:22:49.5Z"
            ))
        })
}

/// A moment the user wrote that is not a time (see [`parse_moment`]).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct MomentError(pub String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IntervalError {
    #[error("{what} {input:?} is not a duration; write e.g. 30s, 15m, 2h or 7d")]
    NotANumber { what: String, input: String },
    #[error("{what} {input:?}: unknown unit {unit:?}; use s, m, h or d")]
    UnknownUnit {
        what: String,
        input: String,
        unit: String,
    },
    #[error("{what} must be more than zero")]
    Zero { what: String },
    #[error("{what} {input:?} is too long")]
    TooLong { what: String, input: String },
}

/// "30s", "15m", "2h", "7d" (or plain seconds); `what` names the option in errors. Only this
/// grammar (digits, then at most one of s, m, h, d) is accepted; jiff converts it (a day is 24
/// hours here: retention and snapshot intervals are elapsed time, not calendar days).
pub fn parse_interval(s: &str, what: &str) -> Result<Duration, IntervalError> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = num.parse().map_err(|_| IntervalError::NotANumber {
        what: what.to_string(),
        input: s.to_string(),
    })?;
    let unit = match unit {
        "" => "s",
        "s" | "m" | "h" | "d" => unit,
        _ => {
            return Err(IntervalError::UnknownUnit {
                what: what.to_string(),
                input: s.to_string(),
                unit: unit.to_string(),
            })
        }
    };
    if n == 0 {
        return Err(IntervalError::Zero {
            what: what.to_string(),
        });
    }
    let too_long = || IntervalError::TooLong {
        what: what.to_string(),
        input: s.to_string(),
    };
    let span: Span = format!("{n}{unit}").parse().map_err(|_| too_long())?;
    let d = span
        .to_duration(SpanRelativeTo::days_are_24_hours())
        .map_err(|_| too_long())?;
    Duration::try_from(d).map_err(|_| too_long())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_prints_utc_with_whole_seconds() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_683_125), "2026-11-26T08:52:05Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z", "a leap day");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339(221_845_392_000), "9000-01-01T00:00:00Z");
        // Beyond jiff's range (about year 9999): never a real record's time.
        assert_eq!(rfc3339(i64::MAX), format!("@{}", i64::MAX));
        let now = rfc3339_now();
        assert_eq!(now.len(), 20, "{now}");
        assert!(now.ends_with('Z') && now.as_bytes()[10] == b'T', "{now}");
    }

    #[test]
    fn moments_parse_with_their_offset_to_microseconds() {
        let us = |s: &str| parse_moment(s, "--at");
        let base = 1_795_683_125_000_000; // 2026-11-26T08:52:05Z
        assert_eq!(us("2026-11-26 08:52:05+00"), Ok(base));
        assert_eq!(us("2026-11-26T08:52:05Z"), Ok(base));
        assert_eq!(us("2026-11-26 09:52:05.25+01"), Ok(base + 250_000));
        assert_eq!(us("2026-11-26T08:52:05.000001+00:00"), Ok(base + 1));
        assert_eq!(rfc3339_us(base + 1), "2026-11-26T08:52:05.000001Z");
        assert_eq!(us(&rfc3339_us(base + 7)), Ok(base + 7));
        for bad in [
            "2026-11-26 08:52:05",
            "yesterday",
            "",
            "2026-13-01 00:00:00+00",
        ] {
            let e = us(bad).unwrap_err();
            assert!(e.0.contains("UTC offset"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn intervals_accept_exactly_digits_and_one_unit() {
        let ok = |s: &str| parse_interval(s, "--x").map(|d| d.as_secs());
        assert_eq!(ok("30"), Ok(30));
        assert_eq!(ok("30s"), Ok(30));
        assert_eq!(ok("15m"), Ok(900));
        assert_eq!(ok("2h"), Ok(7200));
        assert_eq!(ok("7d"), Ok(604_800));
        assert_eq!(ok(" 1d "), Ok(86_400), "surrounding blanks are ignored");
        for bad in [
            "", "m", "-5m", "1.5h", "1h30m", "2 hours", "1w", "15x", "15M",
        ] {
            assert!(ok(bad).is_err(), "{bad:?} must be refused");
        }
        assert_eq!(
            parse_interval("15x", "--keep-for").unwrap_err().to_string(),
            "--keep-for \"15x\": unknown unit \"x\"; use s, m, h or d"
        );
        assert_eq!(
            parse_interval("soon", "--keep-for")
                .unwrap_err()
                .to_string(),
            "--keep-for \"soon\" is not a duration; write e.g. 30s, 15m, 2h or 7d"
        );
        assert_eq!(
            parse_interval("0s", "--snapshot-every")
                .unwrap_err()
                .to_string(),
            "--snapshot-every must be more than zero"
        );
    }
}
