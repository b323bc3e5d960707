//! The settlement journal: settlements and refunds (also of admits whose outcome stayed unknown)
//! not yet recorded by the database are kept here while they are retried. Those still pending
//! when shutdown's grace period ends, or whose retries ran out, are written to
//! `<state dir>/settlements.journal` (one JSON object a line, written to a new file, fsynced,
//! renamed over the old one, the directory fsynced) and replayed at the next start. Replaying is
//! safe: settle and refund are idempotent by request id.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::openai::Usage;

const FILE: &str = "settlements.journal";

/// One settlement to record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub request_id: String,
    #[serde(flatten)]
    pub call: Call,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "call", rename_all = "snake_case")]
pub enum Call {
    Settle { usage: Usage },
    Refund { reason: String },
    /// An admit whose outcome stayed unknown (the client got 503): refunded if it committed.
    RefundIfAdmitted,
}

pub struct Journal {
    /// the journal file, when `--state-dir` is set
    path: Option<PathBuf>,
    pending: Mutex<HashMap<String, Call>>,
}

impl Journal {
    /// A journal in `state_dir` (created if missing), or one that keeps nothing past shutdown.
    pub fn open(state_dir: Option<&Path>) -> Result<Self, String> {
        let path = match state_dir {
            None => None,
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("--state-dir {}: cannot create it: {e}", dir.display()))?;
                Some(dir.join(FILE))
            }
        };
        Ok(Journal {
            path,
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// Whether pending settlements survive a restart.
    pub fn is_durable(&self) -> bool {
        self.path.is_some()
    }

    /// A settlement starts: it is pending until `done`.
    pub fn begin(&self, request_id: &str, call: Call) {
        self.lock().insert(request_id.to_string(), call);
    }

    /// The database recorded it (or refused it for good).
    pub fn done(&self, request_id: &str) {
        self.lock().remove(request_id);
    }

    pub fn pending(&self) -> usize {
        self.lock().len()
    }

    /// The entries written at the last shutdown (a torn last line is skipped, and said so).
    pub fn load(&self) -> Result<Vec<Entry>, String> {
        let Some(path) = &self.path else {
            return Ok(vec![]);
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(format!("{}: cannot read it: {e}", path.display())),
        };
        let mut entries = Vec::new();
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            match serde_json::from_str(line) {
                Ok(entry) => entries.push(entry),
                Err(e) => tracing::warn!(
                    line = n + 1,
                    error = %e,
                    journal = %path.display(),
                    "skipping an unreadable journal line"
                ),
            }
        }
        Ok(entries)
    }

    /// Writes every pending settlement to the journal file, durably, replacing what it held;
    /// with none pending the file is removed. Returns how many were written.
    pub fn write_pending(&self) -> std::io::Result<usize> {
        let Some(path) = &self.path else {
            return Ok(0);
        };
        let entries: Vec<Entry> = self
            .lock()
            .iter()
            .map(|(request_id, call)| Entry {
                request_id: request_id.clone(),
                call: call.clone(),
            })
            .collect();
        if entries.is_empty() {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        } else {
            let tmp = path.with_extension("journal.new");
            let mut file = std::fs::File::create(&tmp)?;
            for entry in &entries {
                serde_json::to_writer(&mut file, entry)?;
                file.write_all(b"\n")?;
            }
            file.sync_all()?;
            std::fs::rename(&tmp, path)?;
        }
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(entries.len())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Call>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_settlements_survive_in_the_file_and_done_ones_do_not() {
        let dir = std::env::temp_dir().join(format!("pgq-journal-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let j = Journal::open(Some(&dir)).unwrap();
        assert!(j.is_durable());
        let usage = Usage {
            input_tokens: 3,
            output_tokens: 4,
            cached_tokens: 1,
        };
        j.begin("req_a", Call::Settle { usage });
        j.begin(
            "req_b",
            Call::Refund {
                reason: "upstream_error".into(),
            },
        );
        j.begin("req_c", Call::Settle { usage });
        j.done("req_c");
        j.begin("req_e", Call::RefundIfAdmitted);
        assert_eq!(j.write_pending().unwrap(), 3);

        let again = Journal::open(Some(&dir)).unwrap();
        let mut entries = again.load().unwrap();
        entries.sort_by(|a, b| a.request_id.cmp(&b.request_id));
        assert_eq!(
            entries,
            [
                Entry {
                    request_id: "req_a".into(),
                    call: Call::Settle { usage }
                },
                Entry {
                    request_id: "req_b".into(),
                    call: Call::Refund {
                        reason: "upstream_error".into()
                    }
                },
                Entry {
                    request_id: "req_e".into(),
                    call: Call::RefundIfAdmitted
                }
            ]
        );
        // a torn last line is skipped, the rest read
        let file = dir.join(FILE);
        let mut text = std::fs::read_to_string(&file).unwrap();
        text.push_str("{\"request_id\":\"req_d\",\"ca");
        std::fs::write(&file, text).unwrap();
        assert_eq!(again.load().unwrap().len(), 3);
        // nothing pending: the file goes
        assert_eq!(again.write_pending().unwrap(), 0);
        assert!(!file.exists());
        assert!(again.load().unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(!Journal::open(None).unwrap().is_durable());
    }
}
