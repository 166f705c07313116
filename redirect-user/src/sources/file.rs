//! The pods-file source (`redirectd run --pods FILE`): reads the file every `poll`, and
//! publishes a new desired set whenever its bytes change. A file that is unusable as a whole
//! (unreadable, not UTF-8, not YAML, being rewritten) is reported while its last good version
//! keeps being served; entries that are invalid one by one are rejected by the parser.

use std::{path::PathBuf, time::Duration};

use super::{Published, Publisher};
use crate::pods;

/// What the source knows between two reads.
#[derive(Default)]
struct FileState {
    /// The bytes last read, to tell a change.
    last_bytes: Option<Vec<u8>>,
    published: Published,
}

impl FileState {
    /// Takes one read of the file; returns whether what is published changed.
    fn take(&mut self, path: &std::path::Path, read: std::io::Result<Vec<u8>>) -> bool {
        // Until a first good read, nothing the file says is complete (see Published).
        match read {
            Ok(bytes) if self.last_bytes.as_deref() == Some(bytes.as_slice()) => false,
            Ok(bytes) => {
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

/// Follows the file until the daemon exits.
pub async fn run(path: PathBuf, poll: Duration, tx: Publisher) {
    let mut state = FileState::default();
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let read = tokio::fs::read(&path).await;
        // The first read is always published, whatever it gave, so the loop starts.
        if state.take(&path, read) || tx.borrow().is_none() {
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
        assert!(s.take(path, Ok(b"pods: [".to_vec())));
        assert!(!s.published.complete, "an empty set would remove every pod");
        assert!(s.published.source_error.is_some());
        assert!(s.take(path, Ok(GOOD.to_vec())));
        assert!(s.published.complete);
    }

    #[test]
    fn keeps_the_last_good_version_and_reports_once() {
        let path = std::path::Path::new("/pods.yaml");
        let mut s = FileState::default();
        assert!(s.take(path, Ok(GOOD.to_vec())));
        assert_eq!(s.published.desired.pods.len(), 1);
        assert!(!s.take(path, Ok(GOOD.to_vec())), "same bytes, nothing new");

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

        assert!(s.take(path, Ok(GOOD.to_vec())));
        assert!(s.published.source_error.is_none());
    }
}
