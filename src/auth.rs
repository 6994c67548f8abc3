//! API tokens and what each role may do, for the HTTP API (`vdbfs serve --http`).
//!
//! A token is `vdbfs_` and 64 hex digits from the kernel's random source, shown once by `vdbfs
//! token create`; the store keeps only its BLAKE3 hash (a token is 256 random bits, so a fast
//! hash is as good as a slow one here) with its name, role and expiry, in the `tokens` record
//! table. The rules are pure functions of the role, the request and the VDBs' owners, so they
//! are tested without a daemon.
//!
//! Invariants: a token never appears in a record, a log line or a reply other than its
//! creation's; a developer never reaches an operation that runs code as root or postgres
//! (hooks, `--set`, `--mount`) nor a VDB another token owns.

use crate::api::{ErrorKind, Refusal, Request, Role};
use crate::store::records::{Record, RecordTable};
use std::io::Read;

/// A token as stored: never the token, only its hash.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TokenRecord {
    pub v: u32,
    pub name: String,
    pub role: Role,
    /// BLAKE3 of the token, hex.
    pub hash: String,
    /// Unix seconds.
    pub created: i64,
    /// Unix seconds after which it no longer works; None: never.
    pub expires: Option<i64>,
}

impl Record for TokenRecord {
    const TABLE: RecordTable = RecordTable::Tokens;
    const WHAT: &'static str = "API token";
    fn key(&self) -> &str {
        &self.name
    }
}

impl TokenRecord {
    pub fn expired(&self, now: i64) -> bool {
        self.expires.is_some_and(|e| now >= e)
    }
}

/// Who sent a request: a token's name and role, or the root user on the control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name (what the logs show), or "socket".
    pub name: String,
    pub role: Role,
}

impl Caller {
    /// Whoever may open the control socket (mode 0600, the daemon's user).
    pub fn socket() -> Caller {
        Caller {
            name: "socket".into(),
            role: Role::Admin,
        }
    }
}

/// The hash a token is stored and looked up by.
pub fn hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

/// A new token: `vdbfs_` and 32 random bytes in hex.
pub fn new_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("vdbfs_{hex}"))
}

/// The caller a presented token stands for: the record whose hash it has, unexpired. Every
/// other case is `unauthenticated` with the same message, so a guess learns nothing.
pub fn authenticate(
    tokens: &[TokenRecord],
    presented: Option<&str>,
    now: i64,
) -> Result<Caller, Refusal> {
    let missing = || {
        Refusal::new(
            ErrorKind::Unauthenticated,
            "no valid API token: send 'Authorization: Bearer TOKEN' with a token from 'vdbfs \
             token create' that is not revoked or expired",
        )
    };
    let presented = presented.ok_or_else(missing)?;
    let h = hash(presented);
    tokens
        .iter()
        .find(|t| constant_time_eq(t.hash.as_bytes(), h.as_bytes()))
        .filter(|t| !t.expired(now))
        .map(|t| Caller {
            name: t.name.clone(),
            role: t.role,
        })
        .ok_or_else(missing)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a request needs beyond a valid token.
#[derive(Debug, PartialEq, Eq)]
pub enum Need {
    /// Any role.
    Anyone,
    /// An admin token.
    Admin,
    /// An admin, or the developer who owns this VDB.
    Owner(String),
    /// `vdb create`: any role; a developer's VDB is theirs, and what it is made from must be a
    /// source or their own VDB.
    Create,
}

/// What `req` needs.
pub fn need(req: &Request) -> Need {
    use Request as R;
    match req {
        R::SourceList
        | R::SourceStatus { .. }
        | R::SnapshotList { .. }
        | R::VdbList
        | R::Timeflow { .. } => Need::Anyone,
        R::VdbCreate(_) => Need::Create,
        R::VdbStatus { name }
        | R::VdbStart { name }
        | R::VdbStop { name }
        | R::VdbSnapshot { name, .. }
        | R::VdbRewind { name, .. }
        | R::VdbRefresh { name, .. }
        | R::VdbDelete { name }
        | R::VdbExtend { name, .. } => Need::Owner(name.clone()),
        _ => Need::Admin,
    }
}

/// Whether `caller` may send `req`; `owner_of` gives a VDB's owner (None: no such VDB, or
/// nobody's). A developer's `vdb create` is made theirs here. Refusals are `forbidden`.
pub fn authorize(
    caller: &Caller,
    req: &mut Request,
    owner_of: impl Fn(&str) -> Option<Option<String>>,
) -> Result<(), Refusal> {
    let forbidden = |what: String| {
        Refusal::new(
            ErrorKind::Forbidden,
            format!(
                "token {} (role {}) may not {what}",
                caller.name, caller.role
            ),
        )
    };
    let op = req.op().replace('_', " ");
    if let Request::VdbCreate(spec) = req {
        if caller.role == Role::Admin {
            if spec.owner.is_none() {
                spec.owner = Some(caller.name.clone());
            }
            return Ok(());
        }
        spec.owner = Some(caller.name.clone());
        if spec.hooks.is_some() || spec.mount.is_some() || !spec.settings.is_empty() {
            return Err(forbidden(
                "give a VDB hooks, a mount point or --set values (they run code or touch files \
                 on the server); an admin can"
                    .into(),
            ));
        }
        let from = spec.from.split('@').next().unwrap_or_default();
        if let Some(owner) = owner_of(from) {
            if owner.as_deref() != Some(caller.name.as_str()) {
                return Err(forbidden(format!(
                    "make a VDB from VDB {from}, which belongs to {}",
                    owner.as_deref().unwrap_or("nobody")
                )));
            }
        }
        return Ok(());
    }
    match need(req) {
        Need::Anyone | Need::Create => Ok(()),
        _ if caller.role == Role::Admin => Ok(()),
        Need::Admin => Err(forbidden(format!("{op} (admins only)"))),
        Need::Owner(vdb) => match owner_of(&vdb) {
            // No such VDB: the operation says so (404), as for an admin.
            None => Ok(()),
            Some(Some(o)) if o == caller.name => Ok(()),
            Some(o) => Err(forbidden(format!(
                "{op} VDB {vdb}: it belongs to {}",
                o.as_deref().unwrap_or("nobody (made over the socket)")
            ))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::VdbSpec;

    fn rec(name: &str, role: Role, token: &str, expires: Option<i64>) -> TokenRecord {
        TokenRecord {
            v: 1,
            name: name.into(),
            role,
            hash: hash(token),
            created: 0,
            expires,
        }
    }

    #[test]
    fn a_token_is_found_by_its_hash_until_it_expires() {
        let t = new_token().unwrap();
        assert!(t.starts_with("vdbfs_") && t.len() == 6 + 64, "{t}");
        assert_ne!(t, new_token().unwrap());
        let recs = [rec("ci", Role::Developer, &t, Some(100))];
        let c = authenticate(&recs, Some(&t), 99).unwrap();
        assert_eq!((c.name.as_str(), c.role), ("ci", Role::Developer));
        let kind = |r: Result<Caller, Refusal>| r.unwrap_err().kind;
        assert_eq!(
            kind(authenticate(&recs, Some(&t), 100)),
            ErrorKind::Unauthenticated
        );
        assert_eq!(
            kind(authenticate(&recs, Some("vdbfs_x"), 0)),
            ErrorKind::Unauthenticated
        );
        assert_eq!(
            kind(authenticate(&recs, None, 0)),
            ErrorKind::Unauthenticated
        );
        assert!(!serde_json::to_string(&recs[0]).unwrap().contains(&t));
    }

    #[test]
    fn a_developer_touches_only_their_own_vdbs() {
        let alice = Caller {
            name: "alice".into(),
            role: Role::Developer,
        };
        let owners = |v: &str| match v {
            "a1" => Some(Some("alice".to_string())),
            "b1" => Some(Some("bob".to_string())),
            "root1" => Some(None),
            _ => None,
        };
        let check = |mut r: Request| authorize(&alice, &mut r, owners).map_err(|e| e.kind);
        let stop = |n: &str| Request::VdbStop { name: n.into() };
        assert_eq!(check(stop("a1")), Ok(()));
        assert_eq!(check(stop("b1")), Err(ErrorKind::Forbidden));
        assert_eq!(check(stop("root1")), Err(ErrorKind::Forbidden));
        assert_eq!(check(stop("none")), Ok(()), "404 from the operation");
        assert_eq!(check(Request::VdbList), Ok(()));
        assert_eq!(check(Request::Gc), Err(ErrorKind::Forbidden));
        assert_eq!(check(Request::TokenList), Err(ErrorKind::Forbidden));
        let create = |from: &str, settings: Vec<String>| {
            Request::VdbCreate(Box::new(VdbSpec {
                name: "n".into(),
                from: from.into(),
                settings,
                owner: Some("bob".into()),
                ..VdbSpec::default()
            }))
        };
        let mut r = create("prod", vec![]);
        assert!(authorize(&alice, &mut r, owners).is_ok());
        let Request::VdbCreate(spec) = r else {
            unreachable!()
        };
        assert_eq!(
            spec.owner.as_deref(),
            Some("alice"),
            "a developer's VDB is theirs"
        );
        assert_eq!(check(create("b1@s", vec![])), Err(ErrorKind::Forbidden));
        assert_eq!(check(create("a1@s", vec![])), Ok(()));
        assert_eq!(
            check(create("prod", vec!["shared_preload_libraries=x".into()])),
            Err(ErrorKind::Forbidden)
        );
        let admin = Caller {
            name: "ops".into(),
            role: Role::Admin,
        };
        assert!(authorize(&admin, &mut stop("b1"), owners).is_ok());
        assert!(authorize(&admin, &mut Request::Gc, owners).is_ok());
    }
}
