//! Fuzzes the event decoder: the first byte picks the stream, the rest is
//! split at newlines into records (as a file or a Kafka batch delivers
//! them). Every record must come out decoded or dead-lettered with a
//! reason; nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use storepulse_ingest::{EventDecoder, RawRecord, StreamKind};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let stream = StreamKind::ALL[pick as usize % StreamKind::ALL.len()];
    let records: Vec<RawRecord<'_>> = rest
        .split(|b| *b == b'\n')
        .enumerate()
        .map(|(i, bytes)| RawRecord {
            bytes,
            position: i as u64,
        })
        .collect();
    let out = EventDecoder::new(stream, "fuzz")
        .decode(&records)
        .expect("record contents never fail a chunk");
    assert_eq!(out.events + out.dead_letters.len(), records.len());
    assert!(out.dead_letters.iter().all(|d| !d.reason.is_empty()));
});
