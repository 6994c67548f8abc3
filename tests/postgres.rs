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

// The tools that read and write whole data directories work on vdbfs: pg_basebackup streams a
// running cluster into a dataset (how sources are linked), pg_verifybackup checks every file
// against the backup manifest, postgres starts on the backup, and after a clean stop
// pg_checksums verifies every page's checksum there.
#[test]
fn pg_basebackup_into_a_dataset_verifies_and_passes_pg_checksums() {
    use crate::util::{as_postgres, chown_postgres, pg, run_timeout, tempdir};
    require_root_fuse_postgres();
    let native = tempdir("vdbfs-native-");
    let mut src = Postgres::initdb(&native.path().join("pg"));
    src.start();
    src.pgbench(&["-i", "-s", "2"]);
    let d = Daemon::start();
    let m = d.create_and_mount("bb");
    chown_postgres(&m.path);
    let target = m.join("pgdata");
    let port = src.port().to_string();
    let sock = src.socket_dir().to_str().unwrap().to_string();
    let out = run_timeout(
        as_postgres(&pg("pg_basebackup")).args([
            "-h",
            &sock,
            "-p",
            &port,
            "-U",
            "postgres",
            "-D",
            target.to_str().unwrap(),
            "-X",
            "stream",
            "-c",
            "fast",
        ]),
        Duration::from_secs(300),
    );
    assert!(
        out.status.success(),
        "pg_basebackup into the dataset failed\n{}\ndaemon log:\n{}",
        crate::util::describe(&out),
        d.log_tail(20)
    );
    let out = run_timeout(
        as_postgres(&pg("pg_verifybackup")).arg(target.to_str().unwrap()),
        Duration::from_secs(300),
    );
    assert!(
        out.status.success(),
        "pg_verifybackup found differences\n{}",
        crate::util::describe(&out)
    );
    // The backup starts as a cluster of its own (recovery from backup_label) and has the data.
    let mut copy = Postgres::on(&target);
    copy.start();
    assert_eq!(
        copy.psql("SELECT count(*) FROM pgbench_accounts"),
        src.psql("SELECT count(*) FROM pgbench_accounts")
    );
    copy.stop();
    // pg_checksums wants a cleanly shut down cluster: now it is one.
    let out = run_timeout(
        as_postgres(&pg("pg_checksums")).args(["--check", "-D", target.to_str().unwrap()]),
        Duration::from_secs(300),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("Bad checksums:  0"),
        "pg_checksums --check failed on the dataset\n{}",
        crate::util::describe(&out)
    );
    src.stop();
}
