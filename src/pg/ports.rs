//! The one port picker for the clusters vdbfs runs (staging standbys and VDBs).
//!
//! Invariant: a port is offered only when no record of this store claims it (`taken`) and
//! nothing on this host listens on it now (it can be bound on loopback); a program may still
//! bind it before postgres does, which a start reports as [`super::StartError::port_in_use`].

use std::ops::RangeInclusive;

/// Why no port was picked; the callers say what to do about it in their own words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error("port {0} is in use")]
    InUse(u16),
    #[error("no free port in {}-{}", .0.start(), .0.end())]
    NoneFree(RangeInclusive<u16>),
}

/// The port asked for if it is free, else the first free one of `pool`.
pub fn pick(
    asked: Option<u16>,
    pool: RangeInclusive<u16>,
    taken: &[u16],
) -> Result<u16, PortError> {
    let free = |p: u16| !taken.contains(&p) && super::port_free(p);
    match asked {
        Some(p) if free(p) => Ok(p),
        Some(p) => Err(PortError::InUse(p)),
        None => pool
            .clone()
            .find(|p| free(*p))
            .ok_or(PortError::NoneFree(pool)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_or_taken_port_is_never_picked() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = l.local_addr().unwrap().port();
        assert_eq!(pick(Some(busy), 1..=1, &[]), Err(PortError::InUse(busy)));
        assert_eq!(
            pick(None, busy..=busy, &[]),
            Err(PortError::NoneFree(busy..=busy))
        );
        let p = pick(None, busy..=busy.saturating_add(5), &[busy + 1]).unwrap();
        assert!(p != busy && p != busy + 1);
    }
}
