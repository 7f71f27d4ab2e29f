//! Support shared by the engine's integration tests.

use storepulse_engine::{Engine, EngineCheckpoint};

/// Takes a checkpoint of `engine` and reads it back through its file
/// encoding (what a restart restores).
pub(crate) fn checkpoint_round_trip(engine: &mut Engine) -> EngineCheckpoint {
    let files: std::collections::HashMap<String, bytes::Bytes> = engine
        .checkpoint()
        .unwrap()
        .encode()
        .unwrap()
        .into_iter()
        .map(|(name, b)| (name, bytes::Bytes::from(b)))
        .collect();
    EngineCheckpoint::decode(&files).unwrap()
}
