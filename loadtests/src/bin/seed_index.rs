//! `berth-seed-index STORE_DIR COUNT`: writes COUNT blob index records (for made-up
//! digests) into the metadata of a berth store, so that `loadtests/compare.sh` can measure
//! how long berth takes to serve again after a restart with a large index.

use std::path::PathBuf;
use std::process::ExitCode;

use berth_oci::Digest;
use berth_store::MetaStore;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (dir, count) = match args.as_slice() {
        [dir, count] => match count.parse::<u64>() {
            Ok(n) => (PathBuf::from(dir), n),
            Err(_) => return usage(),
        },
        _ => return usage(),
    };
    let meta = match MetaStore::open(&dir.join("meta")) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("berth-seed-index: {}: {e}", dir.display());
            return ExitCode::from(2);
        }
    };
    for i in 0..count {
        let digest = Digest::sha256_of(&i.to_le_bytes());
        if let Err(e) = meta.record_blob(&digest, 1024 + i % 4096, "docker.io/library/seeded", i) {
            eprintln!("berth-seed-index: record {i}: {e}");
            return ExitCode::from(1);
        }
    }
    println!("{count} blob records in {}", dir.display());
    ExitCode::SUCCESS
}

fn usage() -> ExitCode {
    eprintln!("usage: berth-seed-index STORE_DIR COUNT");
    ExitCode::from(2)
}
