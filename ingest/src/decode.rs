//! JSON → Arrow decoding of the event contract.
//!
//! The hot path hands a whole chunk of records to one `arrow_json` decoder
//! (vectorised, no per-record allocation beyond the tape). Only when that
//! chunk fails do we fall back to decoding record by record, so that a single
//! malformed record becomes a [`DeadLetter`] with a precise reason while every
//! good record of the chunk still goes through.
//!
//! After decoding, rows are validated against rules the JSON schema cannot
//! express (`stock_movements.kind` is one of [`MOVEMENT_KINDS`], a receipt
//! has at least one line) and receipts are flattened to one row per line.

use std::sync::Arc;

use arrow::{
    array::{Array, ArrayRef, AsArray, BooleanArray, Int32Builder, RecordBatch, UInt32Builder},
    compute::{concat_batches, filter_record_batch, take},
    error::ArrowError,
};
use arrow_json::reader::{Decoder, ReaderBuilder};

use crate::{
    dead_letter::DeadLetter,
    error::Result,
    schema::{StreamKind, MOVEMENT_KINDS},
};

/// Largest record accepted (bytes); larger ones are dead letters.
pub const MAX_RECORD_BYTES: usize = 1 << 20;
/// Deepest nesting of objects and arrays accepted (a receipt needs 3).
pub const MAX_DEPTH: usize = 32;
/// Longest string value or key accepted (bytes, as written).
pub const MAX_STRING_BYTES: usize = 64 << 10;

/// Event times at or after this (2200-01-01, epoch ms) are rejected.
pub const MAX_TS_MS: i64 = 7_258_118_400_000;

/// Hostile-input guard, run on every record before it is decoded: the
/// record's size, nesting depth and string lengths against the caps above,
/// and duplicate keys in the top-level object (which a JSON parser would
/// silently resolve to one of the values). One pass over the bytes, no
/// allocation; the reason names the cap.
pub fn check_limits(b: &[u8]) -> Option<String> {
    if b.len() > MAX_RECORD_BYTES {
        return Some(format!(
            "record exceeds the {MAX_RECORD_BYTES}-byte limit (at least {} bytes)",
            b.len()
        ));
    }
    const KEYS: usize = 32;
    let mut keys = [(0usize, 0usize); KEYS];
    let mut n_keys = 0;
    let mut depth = 0usize;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                let end = i.min(b.len());
                if end - start > MAX_STRING_BYTES {
                    return Some(format!(
                        "a string of {} bytes at byte {start}, over the {MAX_STRING_BYTES}-byte limit",
                        end - start
                    ));
                }
                if depth == 1 {
                    let mut j = i + 1;
                    while j < b.len() && b[j].is_ascii_whitespace() {
                        j += 1;
                    }
                    if j < b.len() && b[j] == b':' {
                        let key = &b[start..end];
                        if keys[..n_keys].iter().any(|&(s, e)| &b[s..e] == key) {
                            return Some(format!(
                                "duplicate key '{}' in the object",
                                String::from_utf8_lossy(key)
                            ));
                        }
                        if n_keys < KEYS {
                            keys[n_keys] = (start, end);
                            n_keys += 1;
                        }
                    }
                }
            }
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Some(format!("nesting deeper than {MAX_DEPTH} levels"));
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    None
}

/// One undecoded record and where it came from.
#[derive(Debug, Clone, Copy)]
pub struct RawRecord<'a> {
    /// The record's bytes: one JSON object.
    pub bytes: &'a [u8],
    /// Line number (files, 1-based), offset (Kafka) or sequence (generator).
    pub position: u64,
}

/// What decoding a chunk of records produced.
#[derive(Debug, Default)]
pub struct DecodeOutput {
    /// The good records as rows of the stream's flat schema (`None` if none).
    pub batch: Option<RecordBatch>,
    /// The bad records, each with its reason.
    pub dead_letters: Vec<DeadLetter>,
    /// Number of events (not rows: a receipt with 3 lines is one event) accepted.
    pub events: usize,
}

/// Decodes JSON events of one stream into Arrow.
pub struct EventDecoder {
    stream: StreamKind,
    source: Arc<str>,
}

impl std::fmt::Debug for EventDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventDecoder")
            .field("stream", &self.stream)
            .field("source", &self.source)
            .finish()
    }
}

impl EventDecoder {
    /// A decoder for `stream`; `source` names where records come from
    /// (a file path, a topic/partition) and is copied into dead letters.
    pub fn new(stream: StreamKind, source: impl Into<Arc<str>>) -> Self {
        Self {
            stream,
            source: source.into(),
        }
    }

    /// The stream this decoder decodes.
    pub fn stream(&self) -> StreamKind {
        self.stream
    }

    fn new_decoder(&self, rows: usize) -> Result<Decoder> {
        Ok(ReaderBuilder::new(self.stream.json_schema())
            .with_batch_size(rows.max(1) + 1)
            .build_decoder()?)
    }

    /// Decodes a chunk of records. Never fails because of record contents:
    /// bad records are returned as dead letters.
    pub fn decode(&mut self, records: &[RawRecord<'_>]) -> Result<DecodeOutput> {
        if records.is_empty() {
            return Ok(DecodeOutput::default());
        }
        let (json_batch, rows_to_records, mut dead) = match self.decode_chunk(records)? {
            Some(batch) => (batch, None, Vec::new()),
            None => self.decode_one_by_one(records)?,
        };
        // Row i of `json_batch` is record `rows_to_records[i]` (identity when
        // the fast path succeeded).
        let record_of = |row: usize| match &rows_to_records {
            Some(map) => map[row],
            None => row,
        };
        let invalid = self.validate(&json_batch)?;
        let json_batch = if invalid.is_empty() {
            json_batch
        } else {
            let mut keep = vec![true; json_batch.num_rows()];
            for (row, reason) in invalid {
                keep[row] = false;
                dead.push(self.dead_letter(&records[record_of(row)], reason));
            }
            filter_record_batch(&json_batch, &BooleanArray::from(keep))?
        };
        dead.sort_by_key(|d| d.position);
        let events = json_batch.num_rows();
        let batch = if events == 0 {
            None
        } else if self.stream == StreamKind::Sales {
            Some(flatten_sales(&json_batch)?)
        } else {
            Some(json_batch)
        };
        Ok(DecodeOutput {
            batch,
            dead_letters: dead,
            events,
        })
    }

    /// Fast path: the whole chunk through one decoder. `None` if any record
    /// is bad (the caller then isolates it).
    fn decode_chunk(&self, records: &[RawRecord<'_>]) -> Result<Option<RecordBatch>> {
        if records.iter().any(|r| check_limits(r.bytes).is_some()) {
            return Ok(None);
        }
        let mut decoder = self.new_decoder(records.len())?;
        for r in records {
            if decoder.decode(r.bytes).is_err() || decoder.decode(b"\n").is_err() {
                return Ok(None);
            }
        }
        match decoder.flush() {
            Ok(Some(b)) if b.num_rows() == records.len() => Ok(Some(b)),
            _ => Ok(None),
        }
    }

    fn decode_one_by_one(
        &self,
        records: &[RawRecord<'_>],
    ) -> Result<(RecordBatch, Option<Vec<usize>>, Vec<DeadLetter>)> {
        let mut good = Vec::new();
        let mut map = Vec::new();
        let mut dead = Vec::new();
        for (i, r) in records.iter().enumerate() {
            match self.decode_single(r.bytes) {
                Ok(b) => {
                    good.push(b);
                    map.push(i);
                }
                Err(reason) => dead.push(self.dead_letter(r, reason)),
            }
        }
        let batch = concat_batches(&self.stream.json_schema(), &good)?;
        Ok((batch, Some(map), dead))
    }

    fn decode_single(&self, bytes: &[u8]) -> std::result::Result<RecordBatch, String> {
        if let Some(reason) = check_limits(bytes) {
            return Err(reason);
        }
        // Diagnose with serde_json first: its messages name line and column,
        // and we can name missing fields ourselves.
        if let Some(reason) = diagnose(self.stream, bytes) {
            return Err(reason);
        }
        let mut decoder = self.new_decoder(1).map_err(|e| e.to_string())?;
        decoder.decode(bytes).map_err(clean_arrow_error)?;
        match decoder.flush().map_err(clean_arrow_error)? {
            Some(b) if b.num_rows() == 1 => Ok(b),
            Some(b) => Err(format!(
                "expected exactly one JSON object per record, found {}",
                b.num_rows()
            )),
            None => Err("empty record".to_string()),
        }
    }

    /// Row-level rules the JSON schema cannot express.
    fn validate(&self, batch: &RecordBatch) -> Result<Vec<(usize, String)>> {
        let mut bad = Vec::new();
        // An event time out of range (an overflowing number parses to a
        // saturated one) would move the watermark to the end of time.
        if let Some(ts) = batch.column_by_name("ts") {
            if let Some(ts) = ts.as_primitive_opt::<arrow::datatypes::TimestampMillisecondType>() {
                for (row, t) in ts.iter().enumerate() {
                    if let Some(t) = t.filter(|t| !(0..MAX_TS_MS).contains(t)) {
                        bad.push((
                            row,
                            format!(
                                "field 'ts': {t} ms is out of range (1970-01-01 to 2200-01-01)"
                            ),
                        ));
                    }
                }
            }
        }
        match self.stream {
            StreamKind::StockMovements => {
                let kinds = batch
                    .column_by_name("kind")
                    .expect("schema has kind")
                    .as_string::<i32>();
                for (row, k) in kinds.iter().enumerate() {
                    let k = k.unwrap_or_default();
                    if !MOVEMENT_KINDS.contains(&k) {
                        bad.push((
                            row,
                            format!(
                                "field 'kind': unknown movement kind '{k}' (expected one of: {})",
                                MOVEMENT_KINDS.join(", ")
                            ),
                        ));
                    }
                }
            }
            StreamKind::Sales => {
                let lines = batch
                    .column_by_name("lines")
                    .expect("schema has lines")
                    .as_list::<i32>();
                for row in 0..lines.len() {
                    if lines.value_length(row) == 0 {
                        bad.push((
                            row,
                            "field 'lines': a receipt needs at least one line".into(),
                        ));
                    }
                }
            }
            _ => {}
        }
        // One reason per record (the first found).
        bad.sort_by_key(|(row, _)| *row);
        bad.dedup_by_key(|(row, _)| *row);
        Ok(bad)
    }

    fn dead_letter(&self, r: &RawRecord<'_>, reason: String) -> DeadLetter {
        DeadLetter::new(
            self.stream.name(),
            self.source.clone(),
            r.position,
            reason,
            r.bytes,
        )
    }
}

/// Explains why a record does not fit the contract, or `None` if it looks
/// fine to serde_json (type errors are then left to arrow's message).
fn diagnose(stream: StreamKind, bytes: &[u8]) -> Option<String> {
    let value: serde_json::Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => return Some(format!("invalid JSON: {e}")),
    };
    let Some(obj) = value.as_object() else {
        return Some(format!(
            "expected a JSON object, found {}",
            json_kind(&value)
        ));
    };
    for f in stream.required_fields() {
        match obj.get(*f) {
            None => return Some(format!("missing required field '{f}'")),
            Some(serde_json::Value::Null) => return Some(format!("required field '{f}' is null")),
            _ => {}
        }
    }
    if stream == StreamKind::Sales {
        let Some(lines) = obj.get("lines").and_then(|l| l.as_array()) else {
            return Some(format!(
                "field 'lines': expected an array, found {}",
                json_kind(&obj["lines"])
            ));
        };
        for (i, line) in lines.iter().enumerate() {
            let Some(line) = line.as_object() else {
                return Some(format!("field 'lines[{i}]': expected an object"));
            };
            for f in StreamKind::SALES_LINE_REQUIRED {
                match line.get(*f) {
                    None | Some(serde_json::Value::Null) => {
                        return Some(format!("missing required field 'lines[{i}].{f}'"))
                    }
                    _ => {}
                }
            }
        }
    }
    None
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn clean_arrow_error(e: ArrowError) -> String {
    match e {
        ArrowError::JsonError(m) | ArrowError::ParseError(m) | ArrowError::CastError(m) => m,
        ArrowError::InvalidArgumentError(m) => m,
        other => other.to_string(),
    }
}

/// Flattens decoded receipts (one row per receipt, `lines` a list) into one
/// row per line, numbering lines from 0 in `line_no`.
pub fn flatten_sales(batch: &RecordBatch) -> Result<RecordBatch> {
    let lines_idx = batch.schema().index_of("lines")?;
    let lines = batch.column(lines_idx).as_list::<i32>();
    let offsets = lines.value_offsets();
    let first = offsets[0] as usize;
    let total = (offsets[offsets.len() - 1] as usize) - first;
    let mut parent = UInt32Builder::with_capacity(total);
    let mut line_no = Int32Builder::with_capacity(total);
    for row in 0..batch.num_rows() {
        let n = offsets[row + 1] - offsets[row];
        for j in 0..n {
            parent.append_value(row as u32);
            line_no.append_value(j);
        }
    }
    let parent = parent.finish();
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(11);
    for (i, col) in batch.columns().iter().enumerate() {
        if i != lines_idx {
            columns.push(take(col.as_ref(), &parent, None)?);
        }
    }
    columns.push(Arc::new(line_no.finish()));
    let items = lines.values().as_struct().slice(first, total);
    columns.extend(items.columns().iter().cloned());
    Ok(RecordBatch::try_new(StreamKind::Sales.schema(), columns)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::util::pretty::pretty_format_batches;

    fn decode(stream: StreamKind, lines: &[&str]) -> DecodeOutput {
        let recs: Vec<_> = lines
            .iter()
            .enumerate()
            .map(|(i, l)| RawRecord {
                bytes: l.as_bytes(),
                position: i as u64 + 1,
            })
            .collect();
        EventDecoder::new(stream, "test.jsonl")
            .decode(&recs)
            .unwrap()
    }

    const SALE: &str = r#"{"event_id":"e1","ts":"2026-01-05T10:00:00Z","store_id":"S1","receipt_id":"r1","member_id":"m1","lines":[{"sku":"A","qty":2,"unit_price":"1.50"},{"sku":"B","qty":-1,"unit_price":3.25,"discount":0.25}]}"#;

    #[test]
    fn receipts_are_flattened_one_row_per_line() {
        let out = decode(StreamKind::Sales, &[SALE]);
        assert!(out.dead_letters.is_empty(), "{:?}", out.dead_letters);
        assert_eq!(out.events, 1);
        let text = pretty_format_batches(&[out.batch.unwrap()])
            .unwrap()
            .to_string();
        assert!(text.contains("| e1       | 2026-01-05T10:00:00Z | S1       | r1         | m1        |         | 0       | A   | 2   | 1.5000     |          |"), "{text}");
        assert!(
            text.contains("| 1       | B   | -1  | 3.2500     | 0.2500   |"),
            "{text}"
        );
    }

    #[test]
    fn epoch_millis_and_rfc3339_are_both_event_time() {
        let out = decode(
            StreamKind::IotReadings,
            &[
                r#"{"event_id":"a","ts":1767607200000,"store_id":"S1","device_id":"f1","metric":"temp_c","value":4.5}"#,
                r#"{"event_id":"b","ts":"2026-01-05T10:00:00+00:00","store_id":"S1","device_id":"f1","metric":"temp_c","value":5}"#,
            ],
        );
        let b = out.batch.unwrap();
        let ts = b
            .column(1)
            .as_primitive::<arrow::datatypes::TimestampMillisecondType>();
        assert_eq!(ts.value(0), 1_767_607_200_000);
        assert_eq!(ts.value(1), 1_767_607_200_000);
    }

    #[test]
    fn bad_records_become_dead_letters_with_reasons_and_the_rest_goes_on() {
        let good = r#"{"event_id":"g","ts":"2026-01-05T10:00:00Z","store_id":"S1","sku":"A","kind":"receipt","qty":5}"#;
        let lines = [
            good,
            r#"{"event_id":"x1","ts":"2026-01-05T10:00:00Z","store_id":"S1","sku":"A","kind":"receipt""#,
            r#"{"event_id":"x2","ts":"yesterday","store_id":"S1","sku":"A","kind":"receipt","qty":5}"#,
            r#"{"event_id":"x3","ts":"2026-01-05T10:00:00Z","store_id":"S1","sku":"A","kind":"receipt","qty":"five"}"#,
            r#"{"event_id":"x4","ts":"2026-01-05T10:00:00Z","sku":"A","kind":"receipt","qty":5}"#,
            r#"{"event_id":"x5","ts":"2026-01-05T10:00:00Z","store_id":"S1","sku":"A","kind":"stolen","qty":5}"#,
            r#"[1,2,3]"#,
            good,
        ];
        let out = decode(StreamKind::StockMovements, &lines);
        assert_eq!(out.events, 2);
        assert_eq!(out.batch.unwrap().num_rows(), 2);
        let reasons: Vec<_> = out
            .dead_letters
            .iter()
            .map(|d| (d.position, d.reason.as_str()))
            .collect();
        assert_eq!(reasons.len(), 6, "{reasons:?}");
        assert_eq!(reasons[0].0, 2);
        assert!(
            reasons[0].1.starts_with("invalid JSON: EOF while parsing"),
            "{reasons:?}"
        );
        assert!(
            reasons[1].1.contains("ts") && reasons[1].1.contains("yesterday"),
            "{reasons:?}"
        );
        assert!(reasons[2].1.contains("five"), "{reasons:?}");
        assert_eq!(reasons[3].1, "missing required field 'store_id'");
        assert!(reasons[4]
            .1
            .starts_with("field 'kind': unknown movement kind 'stolen'"));
        assert_eq!(reasons[5].1, "expected a JSON object, found an array");
        assert_eq!(out.dead_letters[0].raw, lines[1]);
        assert_eq!(&*out.dead_letters[0].source, "test.jsonl");
    }

    #[test]
    fn receipt_line_problems_name_the_line() {
        let out = decode(
            StreamKind::Sales,
            &[
                r#"{"event_id":"e","ts":"2026-01-05T10:00:00Z","store_id":"S1","receipt_id":"r","lines":[{"sku":"A","qty":1,"unit_price":1},{"sku":"B","qty":1}]}"#,
                r#"{"event_id":"e2","ts":"2026-01-05T10:00:00Z","store_id":"S1","receipt_id":"r2","lines":[]}"#,
            ],
        );
        assert!(out.batch.is_none());
        assert_eq!(
            out.dead_letters[0].reason,
            "missing required field 'lines[1].unit_price'"
        );
        assert_eq!(
            out.dead_letters[1].reason,
            "field 'lines': a receipt needs at least one line"
        );
    }
}
