//! The clock policy code asks for the time: tag TTLs and the revalidation backoff
//! ([`crate::tags`]), and the time a blob was indexed.
//!
//! A [`Clock`] is the system's wall clock plus an offset that only a test moves. berth
//! builds one at start-up and hands it to the [`crate::Cache`]; reading it is the system
//! call `clock_gettime` (vDSO, no kernel entry) and one atomic load, never a file.
//!
//! The testing hook: with `BERTH_TEST_CLOCK_FILE=/path` in its environment, berth reads
//! the file (a number of milliseconds, the offset added to the system time) at start-up
//! and then polls it from a thread of its own every [`TEST_CLOCK_POLL`]; each new offset
//! it adopts is logged (`test clock moved`, with `offset_ms`), so a test that writes the
//! file can wait for that line instead of sleeping. Never set it in production.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The environment variable that names the test clock's offset file.
pub const TEST_CLOCK_ENV: &str = "BERTH_TEST_CLOCK_FILE";

/// How often the offset file of a test clock is read again.
pub const TEST_CLOCK_POLL: Duration = Duration::from_millis(50);

/// Wall-clock time in milliseconds since the Unix epoch, for policy code. Cloning shares
/// the offset: every clone reads the same time.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    /// `None` for the system clock; otherwise milliseconds added to it.
    offset_ms: Option<Arc<AtomicU64>>,
}

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Clock {
        Clock { offset_ms: None }
    }

    /// The system clock moved ahead by whatever `offset_ms` holds when it is read (for
    /// tests that move time themselves).
    pub fn with_offset(offset_ms: Arc<AtomicU64>) -> Clock {
        Clock {
            offset_ms: Some(offset_ms),
        }
    }

    /// Milliseconds since the Unix epoch (0 if the system clock is before it).
    pub fn now_ms(&self) -> u64 {
        let system = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        match &self.offset_ms {
            None => system,
            Some(o) => system.saturating_add(o.load(Ordering::Relaxed)),
        }
    }

    /// The clock berth runs with: the system clock, or, when [`TEST_CLOCK_ENV`] is set,
    /// a test clock driven by that file (see the module documentation). Logs a warning
    /// when the testing hook is on.
    pub fn from_env() -> Clock {
        match std::env::var_os(TEST_CLOCK_ENV) {
            Some(path) if !path.is_empty() => {
                let path = PathBuf::from(path);
                tracing::warn!(
                    file = %path.display(),
                    "{TEST_CLOCK_ENV} is set: time is moved by the offset in that file \
                     (a testing hook; never set it in production)"
                );
                Clock::following_file(path)
            }
            _ => Clock::system(),
        }
    }

    /// A test clock whose offset is the content of `path`, read now and then every
    /// [`TEST_CLOCK_POLL`] by a thread that runs for the life of the process.
    pub fn following_file(path: PathBuf) -> Clock {
        let offset = Arc::new(AtomicU64::new(0));
        let mut last = None;
        adopt(&path, &offset, &mut last);
        {
            let offset = offset.clone();
            let spawned = std::thread::Builder::new()
                .name("berth-test-clock".into())
                .spawn(move || loop {
                    std::thread::sleep(TEST_CLOCK_POLL);
                    adopt(&path, &offset, &mut last);
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start the test clock's thread");
            }
        }
        Clock::with_offset(offset)
    }
}

/// Reads the offset file and, if it holds a new valid offset, stores and logs it. A
/// missing file means offset 0; an unreadable or invalid one is reported once and the
/// offset kept.
fn adopt(path: &Path, offset: &AtomicU64, last: &mut Option<Result<u64, String>>) {
    let read = match std::fs::read_to_string(path) {
        Ok(text) => text
            .trim()
            .parse::<u64>()
            .map_err(|e| format!("{:?} is not a number of milliseconds: {e}", text.trim())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e.to_string()),
    };
    if last.as_ref() == Some(&read) {
        return;
    }
    match &read {
        Ok(ms) => {
            offset.store(*ms, Ordering::Relaxed);
            tracing::warn!(offset_ms = *ms, "test clock moved");
        }
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "test clock file ignored");
        }
    }
    *last = Some(read);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offset_moves_every_clone() {
        let offset = Arc::new(AtomicU64::new(0));
        let clock = Clock::with_offset(offset.clone());
        let copy = clock.clone();
        let before = Clock::system().now_ms();
        offset.store(3_600_000, Ordering::Relaxed);
        let moved = copy.now_ms();
        assert!(moved >= before + 3_600_000, "{moved} < {before} + 1h");
        assert!(clock.now_ms() >= moved);
    }

    #[test]
    fn the_file_is_followed_and_garbage_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offset");
        let offset = AtomicU64::new(0);
        let mut last = None;
        adopt(&path, &offset, &mut last);
        assert_eq!(offset.load(Ordering::Relaxed), 0, "no file: offset 0");
        std::fs::write(&path, "90000\n").unwrap();
        adopt(&path, &offset, &mut last);
        assert_eq!(offset.load(Ordering::Relaxed), 90_000);
        std::fs::write(&path, "soon").unwrap();
        adopt(&path, &offset, &mut last);
        assert_eq!(offset.load(Ordering::Relaxed), 90_000, "garbage keeps it");
        assert!(matches!(last, Some(Err(_))));
        std::fs::write(&path, "120000").unwrap();
        adopt(&path, &offset, &mut last);
        assert_eq!(offset.load(Ordering::Relaxed), 120_000);
    }
}
