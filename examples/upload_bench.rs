//! Upload throughput of one pack-sized file to an S3-compatible bucket by method: a single PUT
//! against multipart uploads (vdbfs's own `remote::upload`), for `scripts/bench` section
//! `remote`. Credentials from the environment, as for the daemon.
//!
//! upload_bench ENDPOINT BUCKET PREFIX REGION DIR SIZES_MIB RUNS
//!
//! For each size (a file of random bytes in DIR) and method, RUNS uploads (methods alternating
//! within a round); prints one line per run and, per size and method, a summary line
//! `summary METHOD SIZE_MIB MEDIAN_MIBS MIN_MIBS MAX_MIBS`.

use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt};
use std::sync::Arc;
use std::time::Instant;
use vdbfs::remote::upload::{upload_file, Method};

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let [endpoint, bucket, prefix, region, dir, sizes, runs] = a.as_slice() else {
        anyhow::bail!("usage: upload_bench ENDPOINT BUCKET PREFIX REGION DIR SIZES_MIB RUNS");
    };
    let runs: usize = runs.parse()?;
    let os: Arc<dyn ObjectStore> = Arc::new(
        AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_region(region)
            .with_endpoint(endpoint)
            .with_allow_http(endpoint.starts_with("http://"))
            .build()?,
    );
    let methods = [
        Method::Put,
        Method::Multipart {
            part: 8 << 20,
            in_flight: 1,
        },
        Method::Multipart {
            part: 8 << 20,
            in_flight: 4,
        },
        Method::Multipart {
            part: 16 << 20,
            in_flight: 4,
        },
    ];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    for size in sizes.split_whitespace() {
        let mib: u64 = size.parse()?;
        let path = std::path::Path::new(dir).join(format!("upload-{mib}.bin"));
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&path)?;
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ mib;
            let mut buf = vec![0u8; 1 << 20];
            for _ in 0..mib {
                for c in buf.chunks_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    c.copy_from_slice(&x.to_le_bytes());
                }
                f.write_all(&buf)?;
            }
            f.sync_all()?;
        }
        let mut got: Vec<Vec<f64>> = vec![Vec::new(); methods.len()];
        for run in 0..runs {
            for (i, m) in methods.iter().enumerate() {
                let key = ObjPath::from(format!("{prefix}/upload-bench/{mib}-{i}-{run}"));
                let t = Instant::now();
                let n = rt
                    .block_on(upload_file(
                        os.clone(),
                        key.clone(),
                        path.clone(),
                        *m,
                        None,
                        "bench".into(),
                    ))?
                    .ok_or_else(|| anyhow::anyhow!("{} vanished", path.display()))?;
                let s = t.elapsed().as_secs_f64();
                let size = rt.block_on(os.head(&key))?.size;
                anyhow::ensure!(size == n, "object of {size} bytes, file of {n}");
                let mibs = n as f64 / 1048576.0 / s;
                println!("run {m} {mib} MiB: {s:.3} s, {mibs:.0} MiB/s");
                got[i].push(mibs);
                rt.block_on(os.delete(&key))?;
            }
        }
        for (m, v) in methods.iter().zip(&mut got) {
            v.sort_by(|a, b| a.total_cmp(b));
            println!(
                "summary {} {mib} {:.0} {:.0} {:.0}",
                m.to_string().replace(' ', ""),
                v[v.len() / 2],
                v[0],
                v[v.len() - 1]
            );
        }
        std::fs::remove_file(&path)?;
    }
    Ok(())
}
