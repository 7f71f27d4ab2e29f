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
//! has at least one line, money fits `Decimal(18, 6)` exactly) and receipts
//! are flattened to one row per line.
//!
//! Size: ~570 lines of code and ~170 of tests.

use std::sync::Arc;

use arrow::{
    array::{
        Array, ArrayRef, AsArray, BooleanArray, Decimal128Array, Int32Builder, RecordBatch,
        StructArray, UInt32Builder,
    },
    compute::{concat_batches, filter_record_batch, take},
    datatypes::{Decimal128Type, Int64Type},
    error::ArrowError,
};
use arrow_json::reader::{Decoder, ReaderBuilder};

use crate::{
    dead_letter::DeadLetter,
    error::Result,
    schema::{StreamKind, LINE_MONEY_FIELDS, MONEY, MONEY_SCALE, MOVEMENT_KINDS, ORDER_STATUSES},
};

/// JSON money is read at this scale, kept at [`MONEY_SCALE`].
const JSON_SCALE: u32 = 18;
/// 10^(JSON_SCALE − MONEY_SCALE): a read value must be a multiple of it.
const RESCALE: i128 = 10i128.pow(JSON_SCALE - MONEY_SCALE as u32);
/// Largest money magnitude kept (Decimal128(18, 6)), at the JSON scale.
const MONEY_MAX: i128 = (10i128.pow(18) - 1) * RESCALE;
/// A line's `amount` may differ from qty × unit_price − discount by this
/// much (one cent, at [`MONEY_SCALE`]) before it is counted as a mismatch.
const AMOUNT_TOLERANCE: i128 = 10_000;

/// Why a money value read at the JSON scale (18 decimals) cannot be kept
/// exactly as `Decimal(18, 6)`, if it cannot.
pub fn money_problem(v: i128) -> Option<String> {
    let why = if v % RESCALE != 0 {
        format!("has more than {MONEY_SCALE} decimal places")
    } else if v.abs() > MONEY_MAX {
        "is beyond 12 integer digits".to_string()
    } else {
        return None;
    };
    Some(format!(
        "{} {why}: money is kept exactly as Decimal(18, {MONEY_SCALE}) and never rounded",
        money_text(v)
    ))
}

/// A money column read at the JSON scale, checked and rescaled to
/// [`MONEY`]; the first value that does not fit is `Err((row, reason))`.
pub fn rescale_money(a: &Decimal128Array) -> std::result::Result<Decimal128Array, (usize, String)> {
    for (i, v) in a.iter().enumerate() {
        if let Some(why) = v.and_then(money_problem) {
            return Err((i, why));
        }
    }
    Ok(rescaled(a))
}

/// A money column read at the JSON scale, at [`MONEY`] (its values were
/// checked to be exact by [`money_problem`]).
pub fn rescaled(a: &Decimal128Array) -> Decimal128Array {
    a.unary::<_, Decimal128Type>(|v| v / RESCALE)
        .with_data_type(MONEY)
}

/// A JSON-scale decimal as written (trailing zeros dropped).
fn money_text(v: i128) -> String {
    let scale = 10i128.pow(JSON_SCALE);
    let (sign, a) = if v < 0 { ("-", -v) } else { ("", v) };
    let frac = format!("{:018}", a % scale);
    let frac = frac.trim_end_matches('0');
    if frac.is_empty() {
        format!("{sign}{}", a / scale)
    } else {
        format!("{sign}{}.{frac}", a / scale)
    }
}

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
                // To the closing quote, stepping over escapes (a byte loop:
                // memchr2 was twice as slow on these short strings).
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

/// The reason a timestamp `field` of `t` ms is refused, if it is outside
/// 1970-01-01 to 2200-01-01 (an overflowing number parses to a saturated
/// one, which would move the watermark to the end of time).
fn time_out_of_range(field: &str, t: i64) -> Option<String> {
    (!(0..MAX_TS_MS).contains(&t))
        .then(|| format!("field '{field}': {t} ms is out of range (1970-01-01 to 2200-01-01)"))
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
    /// The fast path's arrow-json decoder and the records it was built
    /// for, kept from chunk to chunk: its tape and column buffers keep
    /// their capacity, so a steady stream of chunks decodes without growing
    /// (and copying) them again. Dropped after any failure.
    reused: Option<(Decoder, usize)>,
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
            reused: None,
        }
    }

    /// The stream this decoder decodes.
    pub fn stream(&self) -> StreamKind {
        self.stream
    }

    /// An arrow-json decoder for up to `rows` records, with room for one
    /// row more: a record holding two objects shows as a row count that
    /// does not match.
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
    fn decode_chunk(&mut self, records: &[RawRecord<'_>]) -> Result<Option<RecordBatch>> {
        if records.iter().any(|r| check_limits(r.bytes).is_some()) {
            return Ok(None);
        }
        let (mut decoder, capacity) = match self.reused.take() {
            Some((d, capacity)) if capacity >= records.len() => (d, capacity),
            _ => (self.new_decoder(records.len())?, records.len()),
        };
        for r in records {
            match decoder.decode(r.bytes) {
                Ok(n) if n == r.bytes.len() => {}
                _ => return Ok(None),
            }
            if decoder.decode(b"\n").is_err() {
                return Ok(None);
            }
        }
        match decoder.flush() {
            Ok(Some(b)) if b.num_rows() == records.len() => {
                self.reused = Some((decoder, capacity));
                Ok(Some(b))
            }
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
        if let Some(ts) = batch.column_by_name("ts") {
            if let Some(ts) = ts.as_primitive_opt::<arrow::datatypes::TimestampMillisecondType>() {
                for (row, t) in ts.iter().enumerate() {
                    if let Some(why) = t.and_then(|t| time_out_of_range("ts", t)) {
                        bad.push((row, why));
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
                let expires = batch
                    .column_by_name("expires_at")
                    .expect("schema has expires_at")
                    .as_primitive::<arrow::datatypes::TimestampMillisecondType>();
                for (row, k) in kinds.iter().enumerate() {
                    let k = k.unwrap_or_default();
                    if let Some(why) = expires
                        .is_valid(row)
                        .then(|| time_out_of_range("expires_at", expires.value(row)))
                        .flatten()
                    {
                        bad.push((row, why));
                    } else if !MOVEMENT_KINDS.contains(&k) {
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
            StreamKind::PurchaseOrders => {
                let col = |name| batch.column_by_name(name).expect("purchase order schema");
                let status = col("status").as_string::<i32>();
                let qty = col("qty").as_primitive::<arrow::datatypes::Int64Type>();
                let expected =
                    col("expected_at").as_primitive::<arrow::datatypes::TimestampMillisecondType>();
                for row in 0..batch.num_rows() {
                    let s = status.value(row);
                    if !ORDER_STATUSES.contains(&s) {
                        bad.push((
                            row,
                            format!(
                                "field 'status': unknown order status '{s}' (expected one of: {})",
                                ORDER_STATUSES.join(", ")
                            ),
                        ));
                    } else if s != "cancelled" && qty.is_null(row) {
                        bad.push((row, format!("field 'qty': required when status is '{s}'")));
                    } else if qty.is_valid(row) && qty.value(row) < 0 {
                        bad.push((
                            row,
                            format!(
                                "field 'qty': an ordered quantity cannot be negative ({})",
                                qty.value(row)
                            ),
                        ));
                    } else if s == "placed" && expected.is_null(row) {
                        bad.push((
                            row,
                            "field 'expected_at': required when status is 'placed'".into(),
                        ));
                    } else if let Some(why) = expected
                        .is_valid(row)
                        .then(|| time_out_of_range("expected_at", expected.value(row)))
                        .flatten()
                    {
                        bad.push((row, why));
                    }
                }
            }
            StreamKind::Sales => {
                let lines = batch
                    .column_by_name("lines")
                    .expect("schema has lines")
                    .as_list::<i32>();
                let items = lines.values().as_struct();
                let offsets = lines.value_offsets();
                for row in 0..lines.len() {
                    if lines.value_length(row) == 0 {
                        bad.push((
                            row,
                            "field 'lines': a receipt needs at least one line".into(),
                        ));
                    }
                    // Money is exact or refused: more than six decimals, or
                    // more than twelve integer digits, is not representable.
                    let first = offsets[row] as usize;
                    for j in first..offsets[row + 1] as usize {
                        for field in LINE_MONEY_FIELDS {
                            let col = items
                                .column_by_name(field)
                                .expect("line has money")
                                .as_primitive::<Decimal128Type>();
                            if col.is_null(j) {
                                continue;
                            }
                            if let Some(why) = money_problem(col.value(j)) {
                                bad.push((
                                    row,
                                    format!("field 'lines[{}].{field}': {why}", j - first),
                                ));
                            }
                        }
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
    columns.extend(line_columns(&items)?);
    Ok(RecordBatch::try_new(StreamKind::Sales.schema(), columns)?)
}

/// The line struct's columns as the flat schema has them: money rescaled
/// from the JSON scale (exact: [`EventDecoder`] refused anything else), and
/// lines whose `amount` disagrees with qty × unit_price − discount by more
/// than a cent counted in `storepulse_ingest_line_amount_mismatches_total`.
fn line_columns(items: &StructArray) -> Result<Vec<ArrayRef>> {
    let mut out = Vec::with_capacity(items.num_columns());
    let mut money: Vec<Decimal128Array> = Vec::with_capacity(3);
    for (f, col) in items.fields().iter().zip(items.columns()) {
        if LINE_MONEY_FIELDS.contains(&f.name().as_str()) {
            let scaled = rescaled(col.as_primitive());
            money.push(scaled.clone());
            out.push(Arc::new(scaled) as ArrayRef);
        } else {
            out.push(col.clone());
        }
    }
    let qty = items
        .column_by_name("qty")
        .expect("line has qty")
        .as_primitive::<Int64Type>();
    let mismatches = amount_mismatches(qty, &money[0], &money[1], &money[2]);
    if mismatches > 0 {
        metrics::counter!(crate::metric_names::INGEST_LINE_AMOUNT_MISMATCHES_TOTAL)
            .increment(mismatches as u64);
    }
    Ok(out)
}

/// Lines whose `amount` differs from qty × unit_price − discount by more
/// than a cent (all at [`MONEY_SCALE`]).
fn amount_mismatches(
    qty: &arrow::array::Int64Array,
    price: &Decimal128Array,
    discount: &Decimal128Array,
    amount: &Decimal128Array,
) -> usize {
    if amount.null_count() == amount.len() {
        return 0;
    }
    (0..amount.len())
        .filter(|&i| amount.is_valid(i) && qty.is_valid(i) && price.is_valid(i))
        .filter(|&i| {
            let d = if discount.is_valid(i) {
                discount.value(i)
            } else {
                0
            };
            let net = (qty.value(i) as i128)
                .saturating_mul(price.value(i))
                .saturating_sub(d);
            (net - amount.value(i)).abs() > AMOUNT_TOLERANCE
        })
        .count()
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

    #[test]
    fn purchase_order_lines_are_checked_by_status() {
        let po = |extra: &str| {
            format!(
                r#"{{"event_id":"p","ts":1,"store_id":"S1","order_id":"O1","sku":"A",{extra}}}"#
            )
        };
        let lines = [
            po(r#""status":"placed","qty":5,"expected_at":"2026-03-02T10:00:00Z""#),
            po(r#""status":"amended","qty":7"#),
            po(r#""status":"cancelled""#),
            po(r#""status":"shipped","qty":5"#),
            po(r#""status":"amended""#),
            po(r#""status":"placed","qty":-1,"expected_at":1"#),
            po(r#""status":"placed","qty":5"#),
            po(r#""status":"placed","qty":5,"expected_at":99999999999999"#),
        ];
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let out = decode(StreamKind::PurchaseOrders, &refs);
        assert_eq!(out.events, 3);
        let reasons: Vec<(u64, &str)> = out
            .dead_letters
            .iter()
            .map(|d| (d.position, d.reason.as_str()))
            .collect();
        assert_eq!(
            reasons,
            vec![
                (4, "field 'status': unknown order status 'shipped' (expected one of: placed, amended, cancelled)"),
                (5, "field 'qty': required when status is 'amended'"),
                (6, "field 'qty': an ordered quantity cannot be negative (-1)"),
                (7, "field 'expected_at': required when status is 'placed'"),
                (8, "field 'expected_at': 99999999999999 ms is out of range (1970-01-01 to 2200-01-01)"),
            ]
        );
    }

    #[test]
    fn the_guard_steps_over_escaped_quotes_and_backslashes() {
        // An escaped quote does not end the string, so "b" inside it is no key.
        assert_eq!(check_limits(br#"{"a":"x\"b\":1","b":2}"#), None);
        // An escaped backslash does end it right before the quote.
        assert_eq!(check_limits(br#"{"a":"x\\","b":1}"#), None);
        assert_eq!(
            check_limits(br#"{"a":"x\\","a":1}"#).as_deref(),
            Some("duplicate key 'a' in the object")
        );
        assert_eq!(
            check_limits(br#"{"k\"":1,"k\"":2}"#).as_deref(),
            Some("duplicate key 'k\\\"' in the object")
        );
        // Unterminated strings and a trailing backslash are left to the parser.
        assert_eq!(check_limits(br#"{"a":"xyz"#), None);
        assert_eq!(check_limits(br#"{"a":"xyz\"#), None);
        let long = format!(r#"{{"a":"{}\"{}"}}"#, "x".repeat(MAX_STRING_BYTES), "y");
        assert!(check_limits(long.as_bytes()).unwrap().contains(&format!(
            "a string of {} bytes at byte 6",
            MAX_STRING_BYTES + 3
        )));
    }

    #[test]
    fn one_decoder_decodes_chunk_after_chunk_and_recovers_from_a_bad_one() {
        let mut dec = EventDecoder::new(StreamKind::Sales, "test.jsonl");
        let rec = |s: &'static str, p| RawRecord {
            bytes: s.as_bytes(),
            position: p,
        };
        let two_objects = r#"{"event_id":"x","ts":1,"store_id":"S1","receipt_id":"x","lines":[]}{"event_id":"y","ts":1,"store_id":"S1","receipt_id":"y","lines":[]}"#;
        let chunks: [Vec<RawRecord<'_>>; 4] = [
            vec![rec(SALE, 1), rec(SALE, 2), rec(SALE, 3)],
            vec![rec(SALE, 4), rec("{not json", 5)],
            vec![rec(two_objects, 6), rec(SALE, 7)],
            vec![rec(SALE, 8); 5],
        ];
        let mut rows = Vec::new();
        let mut dead = Vec::new();
        for c in &chunks {
            let out = dec.decode(c).unwrap();
            rows.push(out.batch.map_or(0, |b| b.num_rows()));
            dead.extend(out.dead_letters.iter().map(|d| d.position));
        }
        // Two lines per receipt; a larger chunk after smaller ones works too.
        assert_eq!(rows, vec![6, 2, 2, 10]);
        assert_eq!(dead, vec![5, 6]);
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
        assert!(text.contains("| e1       | 2026-01-05T10:00:00Z | S1       | r1         | m1        |         | 0       | A   | 2   | 1.500000   |          |        |"), "{text}");
        assert!(
            text.contains("| 1       | B   | -1  | 3.250000   | 0.250000 |        |"),
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

    #[test]
    fn money_is_exact_to_six_decimals_or_refused() {
        let sale = |id: &str, price: &str| {
            format!(
                r#"{{"event_id":"{id}","ts":"2026-01-05T10:00:00Z","store_id":"S1","receipt_id":"{id}","lines":[{{"sku":"A","qty":1,"unit_price":1}},{{"sku":"W","qty":250,"unit_price":{price}}}]}}"#
            )
        };
        let lines = [
            sale("g", "0.012990"),
            sale("h", "\"0.01299\""),
            sale("x", "0.0129999"),
            sale("y", "1234567890123.5"),
        ];
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let out = decode(StreamKind::Sales, &refs);
        assert_eq!(out.events, 2, "{:?}", out.dead_letters);
        let b = out.batch.unwrap();
        let price = b
            .column_by_name("unit_price")
            .unwrap()
            .as_primitive::<Decimal128Type>();
        // 12.99 per kg is 0.01299 per gram, exactly: 250 g = 3.2475.
        assert_eq!(price.value(1), 12_990);
        assert_eq!(price.value(3), 12_990);
        assert_eq!(b.column_by_name("unit_price").unwrap().data_type(), &MONEY);
        let reasons: Vec<&str> = out.dead_letters.iter().map(|d| d.reason.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "field 'lines[1].unit_price': 0.0129999 has more than 6 decimal places: money is kept exactly as Decimal(18, 6) and never rounded",
                "field 'lines[1].unit_price': 1234567890123.5 is beyond 12 integer digits: money is kept exactly as Decimal(18, 6) and never rounded",
            ]
        );
    }

    #[test]
    fn line_amount_is_optional_and_kept() {
        let out = decode(
            StreamKind::Sales,
            &[
                r#"{"event_id":"a","ts":"2026-01-05T10:00:00Z","store_id":"S1","receipt_id":"r","lines":[{"sku":"A","qty":3,"unit_price":0.333333,"amount":1.00},{"sku":"B","qty":1,"unit_price":2}]}"#,
            ],
        );
        let b = out.batch.unwrap();
        let amount = b
            .column_by_name("amount")
            .unwrap()
            .as_primitive::<Decimal128Type>();
        assert_eq!(amount.value(0), 1_000_000);
        assert!(amount.is_null(1), "v1 lines have no amount");
        // 3 × 0.333333 = 0.999999: within a cent of 1.00. 2.50 is not.
        let qty = arrow::array::Int64Array::from(vec![3, 1, 1]);
        let price =
            Decimal128Array::from(vec![333_333, 2_000_000, 1_000_000]).with_data_type(MONEY);
        let discount = Decimal128Array::from(vec![None, None, Some(100_000)]).with_data_type(MONEY);
        let amount = Decimal128Array::from(vec![Some(1_000_000), Some(2_500_000), Some(900_000)])
            .with_data_type(MONEY);
        assert_eq!(amount_mismatches(&qty, &price, &discount, &amount), 1);
    }
}
