//! `berth-seed-index STORE_DIR COUNT [--recent] [--files N --file-size BYTES]`: writes
//! COUNT blob index records (for made-up digests) into the metadata of a berth store, so
//! that `loadtests/compare.sh` can measure how long berth takes to serve again after a
//! restart with a large index, and `loadtests/evict.sh` how long eviction takes with one.
//!
//! - `--recent`: the records were used now (eviction must read past them), not at the
//!   epoch;
//! - `--with-files`: each record gets its blob file (8 bytes, written without syncing),
//!   so that berth's start-up reconciliation keeps it;
//! - `--files N --file-size BYTES`: also N real blobs of BYTES each, cached a day ago
//!   (the ones eviction then removes).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use berth_oci::Digest;
use berth_store::{MetaStore, Store};

struct Args {
    dir: PathBuf,
    count: u64,
    recent: bool,
    with_files: bool,
    files: u64,
    file_size: usize,
}

fn parse() -> Option<Args> {
    let mut it = std::env::args().skip(1);
    let dir = PathBuf::from(it.next()?);
    let count = it.next()?.parse().ok()?;
    let mut args = Args {
        dir,
        count,
        recent: false,
        with_files: false,
        files: 0,
        file_size: 0,
    };
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--recent" => args.recent = true,
            "--with-files" => args.with_files = true,
            "--files" => args.files = it.next()?.parse().ok()?,
            "--file-size" => args.file_size = it.next()?.parse().ok()?,
            _ => return None,
        }
    }
    Some(args)
}

fn main() -> ExitCode {
    let Some(args) = parse() else {
        eprintln!(
            "usage: berth-seed-index STORE_DIR COUNT [--recent] [--with-files] [--files N --file-size BYTES]"
        );
        return ExitCode::from(2);
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    if args.files > 0 {
        let store = match Store::open(&args.dir) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("berth-seed-index: {}: {e}", args.dir.display());
                return ExitCode::from(2);
            }
        };
        let day_ago = now.saturating_sub(86_400_000);
        for i in 0..args.files {
            let mut bytes = vec![0u8; args.file_size];
            bytes[..8].copy_from_slice(&i.to_le_bytes());
            bytes[8..16].copy_from_slice(&now.to_le_bytes());
            let digest = Digest::sha256_of(&bytes);
            let written = store.blobs.writer(&digest).and_then(|mut w| {
                w.write(&bytes)?;
                w.commit(None)
            });
            let indexed = written.and_then(|size| {
                store
                    .meta
                    .record_blob(&digest, size, "docker.io/library/old", day_ago + i)
            });
            if let Err(e) = indexed {
                eprintln!("berth-seed-index: blob {i}: {e}");
                return ExitCode::from(1);
            }
        }
        println!(
            "{} blobs of {} bytes in {}",
            args.files,
            args.file_size,
            args.dir.display()
        );
    }
    let meta = match MetaStore::open(&args.dir.join("meta")) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("berth-seed-index: {}: {e}", args.dir.display());
            return ExitCode::from(2);
        }
    };
    for i in 0..args.count {
        let content = i.to_le_bytes();
        let digest = Digest::sha256_of(&content);
        let used = if args.recent { now } else { i };
        let mut size = 1024 + i % 4096;
        if args.with_files {
            let hex = digest.hex();
            let shard = args.dir.join("blobs/sha256").join(&hex[..2]);
            let written = std::fs::create_dir_all(&shard)
                .and_then(|()| std::fs::write(shard.join(hex), content));
            if let Err(e) = written {
                eprintln!("berth-seed-index: file {i}: {e}");
                return ExitCode::from(1);
            }
            size = content.len() as u64;
        }
        if let Err(e) = meta.record_blob(&digest, size, "docker.io/library/seeded", used) {
            eprintln!("berth-seed-index: record {i}: {e}");
            return ExitCode::from(1);
        }
    }
    println!("{} blob records in {}", args.count, args.dir.display());
    ExitCode::SUCCESS
}
