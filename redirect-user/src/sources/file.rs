//! The pods-file source (`redirectd run --pods FILE`): reads the file every `poll`, and
//! publishes a new desired set once its bytes changed **and settled**: a change is taken only
//! when two reads one poll apart give the same bytes, so a file caught half-written (a shell's
//! `>` truncates, then writes) is never taken for the pods it lists. An empty file is never a
//! desired set (`pods: []` is how to serve none). A file that is unusable as a whole
//! (unreadable, not UTF-8, not YAML, too large or deep) is reported while its last good
//! version keeps being served; entries that are invalid one by one are rejected by the parser.
//! Replacing the file by a rename is atomic and the surest way to edit it.

use std::{path::PathBuf, time::Duration};

use super::{Published, PublishedTx};
use crate::pods;

/// What the source knows between two reads.
#[derive(Default)]
struct FileState {
    /// The bytes last taken (published, or reported unusable), to tell a change.
    last_bytes: Option<Vec<u8>>,
    /// New bytes read once, waiting for the next read to confirm them.
    unsettled: Option<Vec<u8>>,
    published: Published,
}

impl FileState {
    /// Takes one read of the file; returns whether what is published changed.
    fn take(&mut self, path: &std::path::Path, read: std::io::Result<Vec<u8>>) -> bool {
        // Until a first good read, nothing the file says is complete (see Published).
        match read {
            Ok(bytes) if self.last_bytes.as_deref() == Some(bytes.as_slice()) => {
                self.unsettled = None;
                false
            }
            Ok(bytes) if self.unsettled.as_deref() != Some(bytes.as_slice()) => {
                // Changed since the last read: wait one poll for it to settle.
                self.unsettled = Some(bytes);
                false
            }
            Ok(bytes) => {
                self.unsettled = None;
                match pods::parse_file(&bytes) {
                    Ok(desired) => {
                        self.published = Published::new(desired);
                    }
                    Err(e) => {
                        self.fail(format!("pods file {}: {e}", path.display()));
                    }
                }
                self.last_bytes = Some(bytes);
                true
            }
            Err(e) => {
                self.last_bytes = None;
                self.unsettled = None;
                self.fail(format!("pods file {}: {e}", path.display()))
            }
        }
    }

    /// Records the file as unusable; logs a new reason once. Returns whether it is new.
    fn fail(&mut self, msg: String) -> bool {
        if self.published.source_error.as_deref() == Some(msg.as_str()) {
            return false;
        }
        log::error!("{msg}; still serving its last good version");
        self.published.source_error = Some(msg);
        true
    }
}

/// Reads the file, refusing one larger than the parser accepts before reading it whole.
fn read(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let max = crate::policy::limits::MAX_PODS_FILE_BYTES as u64;
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::other(format!(
            "larger than the limit of {max} bytes"
        )));
    }
    Ok(bytes)
}

/// Follows the file until the daemon exits. Reading and parsing run off the async workers
/// (a large file must not stall the metrics server or the CNI socket).
pub async fn run(path: PathBuf, poll: Duration, tx: PublishedTx) {
    let mut state = FileState::default();
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let p = path.clone();
        let Ok((s, changed)) = tokio::task::spawn_blocking(move || {
            let changed = state.take(&p, read(&p));
            (state, changed)
        })
        .await
        else {
            log::error!("reading the pods file panicked; the pods file source stopped");
            return;
        };
        state = s;
        // The first read is always published, whatever it gave, so the loop starts.
        if changed || tx.borrow().is_none() {
            tx.send_replace(Some(state.published.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &[u8] = b"pods:\n  - name: a\n    netns: /run/netns/a\n";

    #[test]
    fn unusable_from_the_start_is_not_a_desired_set() {
        let path = std::path::Path::new("/pods.yaml");
        let mut s = FileState::default();
        assert!(!s.take(path, Ok(b"pods: [".to_vec())), "not settled yet");
        assert!(s.take(path, Ok(b"pods: [".to_vec())));
        assert!(!s.published.complete, "an empty set would remove every pod");
        assert!(s.published.source_error.is_some());
        assert!(!s.take(path, Ok(GOOD.to_vec())));
        assert!(s.take(path, Ok(GOOD.to_vec())));
        assert!(s.published.complete);
    }

    /// Two reads of a file being rewritten with `>`: empty, then half of the new version.
    /// Neither is ever published; the whole new version is, once read twice.
    #[test]
    fn a_file_caught_half_written_is_not_taken() {
        let path = std::path::Path::new("/pods.yaml");
        let two =
            b"pods:\n  - name: a\n    netns: /run/netns/a\n  - name: b\n    netns: /run/netns/b\n";
        let mut s = FileState::default();
        s.take(path, Ok(two.to_vec()));
        assert!(s.take(path, Ok(two.to_vec())));
        assert_eq!(s.published.desired.pods.len(), 2);
        // Truncated, then the first entry written: each seen once only.
        assert!(!s.take(path, Ok(Vec::new())));
        assert!(!s.take(path, Ok(GOOD.to_vec())));
        assert!(!s.take(path, Ok(two.to_vec())), "back to what is served");
        assert_eq!(s.published.desired.pods.len(), 2);
        // An empty file that stays empty is reported, never taken for "no pods".
        assert!(!s.take(path, Ok(Vec::new())));
        assert!(s.take(path, Ok(Vec::new())));
        assert_eq!(s.published.desired.pods.len(), 2);
        let err = s.published.source_error.clone().unwrap_or_default();
        assert!(err.contains("pods: []"), "{err}");
        // `pods: []` read twice removes every pod.
        s.take(path, Ok(b"pods: []\n".to_vec()));
        assert!(s.take(path, Ok(b"pods: []\n".to_vec())));
        assert!(s.published.desired.pods.is_empty());
    }

    #[test]
    fn keeps_the_last_good_version_and_reports_once() {
        let path = std::path::Path::new("/pods.yaml");
        let mut s = FileState::default();
        s.take(path, Ok(GOOD.to_vec()));
        assert!(s.take(path, Ok(GOOD.to_vec())));
        assert_eq!(s.published.desired.pods.len(), 1);
        assert!(!s.take(path, Ok(GOOD.to_vec())), "same bytes, nothing new");

        s.take(path, Ok(b"pods: [".to_vec()));
        assert!(s.take(path, Ok(b"pods: [".to_vec())));
        assert_eq!(s.published.desired.pods.len(), 1, "last good version kept");
        let err = s.published.source_error.clone().unwrap();
        assert!(err.contains("/pods.yaml"), "{err}");

        let gone = || Err(std::io::Error::from(std::io::ErrorKind::NotFound));
        assert!(s.take(path, gone()));
        assert!(
            !s.take(path, gone()),
            "the same reason is not published again"
        );
        assert_eq!(s.published.desired.pods.len(), 1);

        s.take(path, Ok(GOOD.to_vec()));
        assert!(s.take(path, Ok(GOOD.to_vec())));
        assert!(s.published.source_error.is_none());
    }
}
