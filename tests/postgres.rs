//! PostgreSQL 15 on a vdbfs dataset: a cluster with data checksums runs pgbench, passes
//! pg_amcheck, and finds exactly the same data after a clean stop, a daemon restart (which
//! re-establishes the mount by itself) and an explicit umount/mount.

use std::fs;
use std::time::Duration;

use crate::util::{require_root_fuse_postgres, Daemon, Postgres};

/// What must not change across stops, restarts and remounts.
#[derive(Debug, PartialEq, Eq)]
struct Fingerprint {
    accounts_abalance_sum: String,
    history_count: String,
    accounts_md5: String,
    history_md5: String,
    tellers_md5: String,
}

fn fingerprint(pg: &Postgres) -> Fingerprint {
    Fingerprint {
        accounts_abalance_sum: pg.psql("SELECT sum(abalance) FROM pgbench_accounts"),
        history_count: pg.psql("SELECT count(*) FROM pgbench_history"),
        accounts_md5: pg.psql(
            "SELECT md5(string_agg(aid::text || ':' || bid || ':' || abalance, ',' ORDER BY aid)) \
             FROM pgbench_accounts",
        ),
        history_md5: pg.psql(
            "SELECT md5(coalesce(string_agg(h::text, ',' ORDER BY h::text), '')) \
             FROM pgbench_history h",
        ),
        tellers_md5: pg
            .psql("SELECT md5(string_agg(t::text, ',' ORDER BY tid)) FROM pgbench_tellers t"),
    }
}

// A user runs postgres on a dataset like on a local disk: initdb -k, pgbench, amcheck clean; after
// a clean stop, a daemon restart (the mount comes back without a `vdbfs mount`), and an
// umount/mount, postgres starts and every row is as it was.
#[test]
fn pgbench_data_survives_daemon_restart_and_remount() {
    require_root_fuse_postgres();
    let mut d = Daemon::start();
    let m = d.create_and_mount("pg");
    let mp = m.path.clone();
    let data = m.join("pgdata");
    let mut pg = Postgres::initdb(&data);
    pg.start();
    assert_eq!(pg.psql("SHOW data_checksums"), "on");

    pg.pgbench(&["-i", "-s", "10", "-q"]);
    let out = pg.pgbench(&["-c", "4", "-j", "2", "-T", "20", "-n"]);
    eprintln!("pgbench on vdbfs:\n{out}");
    assert!(
        out.contains("number of failed transactions: 0"),
        "pgbench had failed transactions:\n{out}"
    );
    pg.amcheck();
    let before = fingerprint(&pg);
    assert_ne!(before.history_count, "0", "pgbench wrote no history");
    pg.stop();

    // Daemon restart: SIGTERM unmounts, the next serve re-establishes the recorded mount.
    d.restart();
    d.wait_mounted(&mp, Duration::from_secs(15));
    let st = d.status_json();
    assert!(
        st["mounts"]
            .as_array()
            .is_some_and(|a| a
                .iter()
                .any(|e| e["mountpoint"].as_str() == Some(mp.to_str().unwrap())
                    && e["dataset"] == "pg")),
        "status after restart does not list the re-established mount: {st}"
    );
    pg.start();
    assert_eq!(
        fingerprint(&pg),
        before,
        "data changed across a daemon restart"
    );
    pg.amcheck();
    // Postgres keeps working on the re-established mount.
    pg.pgbench(&["-c", "2", "-T", "5", "-n"]);
    let after_more = fingerprint(&pg);
    pg.stop();

    // Explicit umount and mount at the same place.
    m.umount();
    let m = d.mount("pg", &mp);
    assert!(m.join("pgdata/PG_VERSION").exists());
    assert_eq!(
        fs::read_to_string(m.join("pgdata/PG_VERSION"))
            .unwrap()
            .trim(),
        "15"
    );
    pg.start();
    assert_eq!(
        fingerprint(&pg),
        after_more,
        "data changed across umount/mount"
    );
    pg.amcheck();
    pg.stop();
}
