//! Dead letters: records that do not fit the event contract.
//!
//! Nothing is dropped silently: every bad record is handed to a
//! [`DeadLetterSink`] together with the stream, the source, its position and
//! the reason, and counted in `storepulse_ingest_dead_letters_total`.

use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use serde::Serialize;

use crate::error::{IngestError, Result};

/// One record that could not be decoded or validated.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeadLetter {
    /// Stream the record was meant for.
    pub stream: String,
    /// Where it came from (file path, topic/partition, generator).
    pub source: Arc<str>,
    /// Line number (files, 1-based) or offset.
    pub position: u64,
    /// Why it was rejected, naming the field where possible.
    pub reason: String,
    /// The original record (lossy UTF-8).
    pub raw: String,
    /// Wall-clock time it was rejected, epoch milliseconds.
    pub received_at_ms: i64,
}

/// Longest raw record kept in a dead letter (bytes).
pub const MAX_RAW_BYTES: usize = 16 << 10;

impl DeadLetter {
    /// Builds a dead letter stamped with the current time. The raw record
    /// is kept up to [`MAX_RAW_BYTES`] (a hostile giant record does not
    /// fill the dead-letter store); longer ones end with a note of their
    /// size.
    pub fn new(stream: &str, source: Arc<str>, position: u64, reason: String, raw: &[u8]) -> Self {
        let raw = if raw.len() > MAX_RAW_BYTES {
            format!(
                "{}... [truncated: {} bytes]",
                String::from_utf8_lossy(&raw[..MAX_RAW_BYTES]),
                raw.len()
            )
        } else {
            String::from_utf8_lossy(raw).into_owned()
        };
        Self {
            stream: stream.to_string(),
            source,
            position,
            reason,
            raw,
            received_at_ms: chrono::Utc::now().timestamp_millis(),
        }
    }
}

/// Where dead letters go. Implementations must be durable before `write`
/// returns `Ok`: a source only advances past a bad record once it is stored.
pub trait DeadLetterSink: Send + Sync + std::fmt::Debug {
    /// Stores the dead letters (all or nothing from the caller's view).
    fn write(&self, letters: &[DeadLetter]) -> Result<()>;
}

/// Records each dead letter in the metrics, then hands them to `sink`.
pub fn record_dead_letters(sink: &dyn DeadLetterSink, letters: &[DeadLetter]) -> Result<()> {
    if letters.is_empty() {
        return Ok(());
    }
    sink.write(letters)?;
    for l in letters {
        metrics::counter!(crate::metric_names::INGEST_DEAD_LETTERS_TOTAL, "stream" => l.stream.clone())
            .increment(1);
        tracing::warn!(
            stream = %l.stream, source = %l.source, position = l.position,
            reason = %l.reason, "record sent to dead letters"
        );
    }
    Ok(())
}

/// Appends dead letters as JSON lines to a file (under the data dir).
#[derive(Debug)]
pub struct JsonlDeadLetterSink {
    path: PathBuf,
    file: Mutex<BufWriter<File>>,
}

impl JsonlDeadLetterSink {
    /// Opens (creating if needed) `path` for appending.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| IngestError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| IngestError::Io {
                path: path.clone(),
                source,
            })?;
        Ok(Self {
            path,
            file: Mutex::new(BufWriter::new(file)),
        })
    }

    /// The file dead letters are appended to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl DeadLetterSink for JsonlDeadLetterSink {
    fn write(&self, letters: &[DeadLetter]) -> Result<()> {
        let mut f = self.file.lock().expect("dead-letter lock poisoned");
        let fail =
            |e: std::io::Error| IngestError::DeadLetter(format!("{}: {e}", self.path.display()));
        for l in letters {
            serde_json::to_writer(&mut *f, l).map_err(|e| fail(e.into()))?;
            f.write_all(b"\n").map_err(fail)?;
        }
        f.flush().map_err(fail)
    }
}

/// Keeps dead letters in memory (tests, embedded use).
#[derive(Debug, Default, Clone)]
pub struct MemoryDeadLetterSink {
    letters: Arc<Mutex<Vec<DeadLetter>>>,
}

impl MemoryDeadLetterSink {
    /// Everything written so far.
    pub fn letters(&self) -> Vec<DeadLetter> {
        self.letters.lock().expect("lock").clone()
    }
}

impl DeadLetterSink for MemoryDeadLetterSink {
    fn write(&self, letters: &[DeadLetter]) -> Result<()> {
        self.letters
            .lock()
            .expect("lock")
            .extend_from_slice(letters);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_sink_appends_one_line_per_letter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dlq/dead_letters.jsonl");
        let sink = JsonlDeadLetterSink::open(&path).unwrap();
        let l = DeadLetter::new("sales", "f.jsonl".into(), 7, "bad".into(), b"{oops");
        record_dead_letters(&sink, &[l.clone(), l]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["raw"], "{oops");
        assert_eq!(lines[0]["position"], 7);
        assert_eq!(lines[0]["reason"], "bad");
    }
}
