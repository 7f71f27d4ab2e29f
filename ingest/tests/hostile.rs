//! Hostile input (issue #8): any byte sequence is decoded or dead-lettered
//! with a reason — never a panic, never an unbounded allocation. A corpus
//! of nasty records, each checked for the right reason, and proptest over
//! arbitrary bytes and mutated valid records.

use proptest::prelude::*;
use storepulse_ingest::{
    dead_letter::MAX_RAW_BYTES,
    decode::{MAX_DEPTH, MAX_RECORD_BYTES, MAX_STRING_BYTES},
    EventDecoder, RawRecord, StreamKind,
};

const GOOD: &str = r#"{"event_id":"e1","ts":1767600000000,"store_id":"S1","device_id":"d1","metric":"fridge_temp_c","value":4.5}"#;

/// Decodes `records` as one chunk; asserts every record is accounted for
/// (a row or a dead letter) and returns the dead letters' reasons by
/// position.
fn decode(stream: StreamKind, records: &[Vec<u8>]) -> Vec<(u64, String)> {
    let raw: Vec<RawRecord<'_>> = records
        .iter()
        .enumerate()
        .map(|(i, b)| RawRecord {
            bytes: b,
            position: i as u64,
        })
        .collect();
    let out = EventDecoder::new(stream, "hostile")
        .decode(&raw)
        .expect("record contents never fail a chunk");
    assert_eq!(
        out.events + out.dead_letters.len(),
        records.len(),
        "every record decoded or dead-lettered"
    );
    for d in &out.dead_letters {
        assert!(!d.reason.is_empty());
        assert!(d.raw.len() <= MAX_RAW_BYTES + 64, "raw kept bounded");
    }
    out.dead_letters
        .into_iter()
        .map(|d| (d.position, d.reason))
        .collect()
}

fn with(field: &str, value: &str) -> Vec<u8> {
    let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(GOOD).unwrap();
    v.remove(field);
    let s = serde_json::to_string(&v).unwrap();
    format!("{},\"{field}\":{value}}}", &s[..s.len() - 1]).into_bytes()
}

#[test]
fn the_nasty_corpus_is_dead_lettered_with_the_right_reason() {
    let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "invalid UTF-8",
            {
                let mut b = with("device_id", "\"d\"");
                let i = b.iter().position(|c| *c == b'd').unwrap();
                b.splice(i..i, [0xff, 0xfe]);
                b
            },
            "invalid",
        ),
        (
            "10 MB string",
            with("device_id", &format!("\"{}\"", "x".repeat(10 << 20))),
            "limit",
        ),
        (
            "100 KB string",
            with("device_id", &format!("\"{}\"", "x".repeat(100 << 10))),
            "-byte limit",
        ),
        (
            "1000-deep nesting",
            with("value", &deep),
            "nesting deeper than",
        ),
        (
            "number out of range",
            with("value", "1e999"),
            "number out of range",
        ),
        (
            "integer out of range",
            with("ts", "99999999999999999999999"),
            "field 'ts'",
        ),
        ("negative time", with("ts", "-5"), "out of range"),
        ("NaN", with("value", "NaN"), "invalid JSON"),
        (
            "duplicate keys",
            format!("{},\"value\":5}}", &GOOD[..GOOD.len() - 1]).into_bytes(),
            "duplicate key 'value'",
        ),
        (
            "not an object",
            b"[1,2,3]".to_vec(),
            "expected a JSON object",
        ),
        ("truncated", GOOD.as_bytes()[..40].to_vec(), "invalid JSON"),
        ("empty", Vec::new(), ""),
        ("NUL bytes", vec![0u8; 64], "invalid JSON"),
        ("wrong type", with("value", "\"hot\""), "value"),
    ];
    let mut records: Vec<Vec<u8>> = vec![GOOD.as_bytes().to_vec()];
    records.extend(cases.iter().map(|(_, b, _)| b.clone()));
    records.push(GOOD.replace("e1", "e2").into_bytes());
    let dead = decode(StreamKind::IotReadings, &records);
    for (i, (name, _, want)) in cases.iter().enumerate() {
        let pos = i as u64 + 1;
        let reason = dead
            .iter()
            .find(|(p, _)| *p == pos)
            .map(|(_, r)| r.as_str())
            .unwrap_or_else(|| panic!("{name}: not dead-lettered: {dead:?}"));
        assert!(
            reason.contains(want),
            "{name}: reason {reason:?} lacks {want:?}"
        );
    }
    assert_eq!(dead.len(), cases.len(), "the good records pass: {dead:?}");
    // The reasons name the caps.
    let reason = |pos: u64| dead.iter().find(|(p, _)| *p == pos).unwrap().1.clone();
    assert!(reason(2).contains(&MAX_RECORD_BYTES.to_string()));
    assert!(reason(3).contains(&MAX_STRING_BYTES.to_string()));
    assert!(reason(4).contains(&MAX_DEPTH.to_string()));
}

#[test]
fn receipts_with_nasty_lines_are_dead_lettered() {
    let receipt = |lines: &str| {
        format!(
            r#"{{"event_id":"r","ts":1767600000000,"store_id":"S1","receipt_id":"r1","lines":{lines}}}"#
        )
        .into_bytes()
    };
    let records = vec![
        receipt(r#"[{"sku":"A","qty":1,"unit_price":2.5}]"#),
        receipt("[]"),
        receipt(r#"[{"sku":"A","qty":1e400,"unit_price":2.5}]"#),
        receipt(r#"[{"sku":"A","qty":1,"unit_price":2.5,"qty":2}]"#),
        receipt(&format!(
            "[{}]",
            vec![r#"{"sku":"A","qty":1,"unit_price":1}"#; 50_000].join(",")
        )),
    ];
    let dead = decode(StreamKind::Sales, &records);
    let positions: Vec<u64> = dead.iter().map(|(p, _)| *p).collect();
    assert!(!positions.contains(&0), "{dead:?}");
    assert!(
        positions.contains(&1) && positions.contains(&2) && positions.contains(&4),
        "{dead:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(records in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..20)) {
        for stream in StreamKind::ALL {
            decode(stream, &records);
        }
    }

    #[test]
    fn mutated_valid_records_never_panic(
        flips in prop::collection::vec((0usize..GOOD.len(), any::<u8>()), 1..8),
        cut in 0usize..GOOD.len() + 1,
    ) {
        let mut b = GOOD.as_bytes().to_vec();
        for (i, v) in flips {
            b[i] = v;
        }
        b.truncate(cut.max(1));
        decode(StreamKind::IotReadings, &[GOOD.as_bytes().to_vec(), b]);
    }
}
