//! `vdbfs scrub`: every live block read back and verified; each bad block reported with the
//! datasets, snapshots and files that reference it; the last result in `vdbfs status`; and a
//! scheduled scrub (`serve --scrub-every`) that runs by itself.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use serde_json::Value;
use vdbfs_format::pack::{decode_record_header, RecordFormat, RecordKind, RECORD_HEADER_LEN};

use crate::util::{self, describe, Daemon};

const BLOCK: usize = 8192;

/// 32 bytes random data does not contain, at the start of a block, numbered.
fn marker(n: u8) -> [u8; 32] {
    let mut m = *b"<<vdbfs scrub test marker #0  >>";
    m[27] = b'0' + n;
    m
}

/// Random blocks; block `at` of each (block, n) pair starts with marker n.
fn content(seed: u64, blocks: usize, marks: &[(usize, u8)]) -> Vec<u8> {
    let mut v = vec![0u8; blocks * BLOCK];
    StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    for (b, n) in marks {
        v[b * BLOCK..b * BLOCK + 32].copy_from_slice(&marker(*n));
    }
    v
}

fn write_synced(path: &Path, data: &[u8]) {
    let mut f = fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn packs(store: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(store.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// Flips one byte in the payload of the block record whose payload starts with marker `n`;
/// returns (pack number, record offset).
fn flip(store: &Path, n: u8) -> (u32, u64) {
    let m = marker(n);
    let mut found = Vec::new();
    for p in packs(store) {
        let mut bytes = fs::read(&p).unwrap();
        let hits: Vec<usize> = bytes
            .windows(32)
            .enumerate()
            .filter(|(_, w)| *w == m)
            .map(|(i, _)| i)
            .collect();
        for pos in hits {
            let ok = pos >= RECORD_HEADER_LEN
                && decode_record_header(&bytes[pos - RECORD_HEADER_LEN..pos], RecordFormat::V2)
                    .is_ok_and(|h| h.kind == RecordKind::Block && h.raw_len as usize == BLOCK);
            if ok {
                bytes[pos + 500] ^= 0x10;
                fs::write(&p, &bytes).unwrap();
                let no: u32 = p.file_stem().unwrap().to_string_lossy().parse().unwrap();
                found.push((no, (pos - RECORD_HEADER_LEN) as u64));
                break;
            }
        }
    }
    assert_eq!(
        found.len(),
        1,
        "marker {n} should be in exactly one block record: {found:?}"
    );
    found[0]
}

fn scrub_json(d: &Daemon) -> (std::process::Output, Value) {
    let out = d.vdbfs(&["scrub", "--json", "--rate", "0"]);
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("scrub --json printed no JSON ({e})\n{}", describe(&out)));
    (out, v)
}

/// (roots, what, path, file_offset) of every reference of a bad block report, sorted.
fn refs(b: &Value) -> Vec<(Vec<String>, String, String, u64)> {
    let mut v: Vec<_> = b["references"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["roots"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_str().unwrap().to_string())
                    .collect::<Vec<_>>(),
                r["what"].as_str().unwrap().to_string(),
                r["path"].as_str().unwrap_or("").to_string(),
                r["file_offset"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    v.sort();
    v
}

// Bytes flipped in three stored blocks (two of a file the dataset and its snapshot share, one of
// a file only the snapshot still holds): `vdbfs scrub` reports exactly those three, each with
// its pack and offset and the dataset, snapshot, file path and file offset that reference it,
// and exits 1; `vdbfs status` shows the result as a fault. Before the damage a scrub finds
// nothing and exits 0.
#[test]
fn scrub_finds_exactly_the_flipped_blocks_and_who_holds_them() {
    let mut d = Daemon::start();
    let m = d.create_and_mount("s");
    let mp = m.path.clone();
    fs::create_dir(m.join("dir")).unwrap();
    write_synced(&m.join("dir/a.bin"), &content(1, 64, &[(3, 1), (40, 2)]));
    write_synced(&m.join("b.bin"), &content(2, 16, &[(7, 3)]));
    d.ok(&["snapshot", "create", "s", "--name", "one"]);
    fs::remove_file(m.join("b.bin")).unwrap();
    write_synced(&m.join("c.bin"), &content(3, 8, &[]));

    let (out, v) = scrub_json(&d);
    assert!(out.status.success(), "a clean store\n{}", describe(&out));
    assert_eq!(v["bad_blocks"].as_array().unwrap().len(), 0, "{v}");
    assert!(v["blocks_checked"].as_u64().unwrap() >= 88, "{v}");

    m.umount();
    d.terminate();
    let bad: Vec<(u32, u64)> = [1u8, 2, 3].iter().map(|n| flip(d.store(), *n)).collect();
    d.start_again();
    let _m = d.mount("s", &mp);

    let (out, v) = scrub_json(&d);
    assert_eq!(
        out.status.code(),
        Some(1),
        "bad blocks must fail the command\n{}",
        describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("scrub found 3 bad block(s)"),
        "{}",
        describe(&out)
    );
    let blocks = v["bad_blocks"].as_array().unwrap();
    let mut at: Vec<(u32, u64)> = blocks
        .iter()
        .map(|b| {
            (
                b["pack"].as_u64().unwrap() as u32,
                b["offset"].as_u64().unwrap(),
            )
        })
        .collect();
    at.sort();
    let mut want = bad.clone();
    want.sort();
    assert_eq!(at, want, "exactly the flipped records: {v}");
    let by_place = |p: (u32, u64)| {
        blocks
            .iter()
            .find(|b| {
                (
                    b["pack"].as_u64().unwrap() as u32,
                    b["offset"].as_u64().unwrap(),
                ) == p
            })
            .unwrap()
    };
    let s = |x: &str| x.to_string();
    assert_eq!(
        refs(by_place(bad[0])),
        vec![
            (vec![s("s")], s("data"), s("/dir/a.bin"), 3 * BLOCK as u64),
            (
                vec![s("s@one")],
                s("data"),
                s("/dir/a.bin"),
                3 * BLOCK as u64
            ),
        ]
    );
    assert_eq!(
        refs(by_place(bad[1])),
        vec![
            (vec![s("s")], s("data"), s("/dir/a.bin"), 40 * BLOCK as u64),
            (
                vec![s("s@one")],
                s("data"),
                s("/dir/a.bin"),
                40 * BLOCK as u64
            ),
        ]
    );
    assert_eq!(
        refs(by_place(bad[2])),
        vec![(vec![s("s@one")], s("data"), s("/b.bin"), 7 * BLOCK as u64)],
        "only the snapshot holds b.bin"
    );

    let st = d.status_json();
    assert_eq!(
        st["scrub"]["bad_blocks"].as_array().map(|a| a.len()),
        Some(3),
        "{st}"
    );
    assert!(
        st["faults"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f.as_str().unwrap().contains("3 bad block(s)")),
        "{st}"
    );
    let text = d.ok(&["status"]);
    assert!(
        text.contains("last scrub") && text.contains("3 bad"),
        "{text}"
    );
    // The daemon logged each with its references.
    assert!(d.log().contains("scrub: bad block"), "{}", d.log_tail(30));
}

// `serve --scrub-every` (here VDBFS_SCRUB_EVERY=1s) runs a scrub by itself; `vdbfs status`
// shows when it ran, that it was the schedule's, and when the next one is due; a daemon
// restart keeps the last result.
#[test]
fn scheduled_scrub_runs_by_itself_and_its_result_survives_a_restart() {
    let mut d = Daemon::start();
    let m = d.create_and_mount("t");
    write_synced(&m.join("x.bin"), &content(5, 32, &[]));
    drop(m);
    d.set_serve_env("VDBFS_SCRUB_EVERY", "1s");
    d.restart();
    let ok = util::wait_until(Duration::from_secs(90), || {
        let st = d.status_json();
        st["scrub"]["trigger"] == "schedule" && st["scrub"]["running"] == false
    });
    let st = d.status_json();
    assert!(
        ok,
        "no scheduled scrub within 90 s: {st}\n{}",
        d.log_tail(30)
    );
    assert!(st["next_scrub"].is_string(), "{st}");
    assert!(
        st["scrub"]["blocks_checked"].as_u64().unwrap() >= 32,
        "{st}"
    );
    assert_eq!(st["scrub"]["bad_blocks"].as_array().unwrap().len(), 0);
    d.set_serve_env("VDBFS_SCRUB_EVERY", "off");
    d.restart();
    let st = d.status_json();
    assert_eq!(
        st["scrub"]["trigger"], "schedule",
        "kept across a restart: {st}"
    );
    assert!(st["next_scrub"].is_null(), "{st}");
}
