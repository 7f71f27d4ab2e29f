//! Support shared by the engine's integration tests.

use datafusion::arrow::{array::RecordBatch, datatypes::SchemaRef};
use storepulse_engine::{Engine, EngineCheckpoint};
use storepulse_ingest::gen::{Chain, ChainConfig};

/// A dimension table: name, schema, rows.
pub(crate) type Dimension = (String, SchemaRef, Vec<RecordBatch>);

/// The chain's stores, products and policies, loaded as `storepulse run`
/// loads dimension files.
#[allow(dead_code)] // not every test binary uses every helper
pub(crate) async fn dimensions(chain: &ChainConfig) -> Vec<Dimension> {
    let c = Chain::new(chain.clone());
    let dir = tempfile::tempdir().unwrap();
    let mut out = Vec::new();
    for (name, text) in [
        ("stores", c.stores_csv()),
        ("products", c.products_csv()),
        ("replenishment_policy", c.policy_csv()),
    ] {
        let path = dir.path().join(format!("{name}.csv"));
        std::fs::write(&path, text).unwrap();
        let (schema, batches) = storepulse_engine::DimensionSource {
            table: name.into(),
            location: path.display().to_string(),
        }
        .load()
        .await
        .unwrap();
        out.push((name.to_string(), schema, batches));
    }
    out
}

/// Takes a checkpoint of `engine` and reads it back through its file
/// encoding (what a restart restores).
#[allow(dead_code)] // not every test binary uses every helper
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
