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
        ("prices", c.prices_csv(chain.start_ms + 30 * 86_400_000)),
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
    EngineCheckpoint::decode(&files, &Default::default()).unwrap()
}

/// Incremental checkpoints kept in memory the way the checkpoint store
/// keeps them: every file of every checkpoint, and each view's chain (its
/// whole image, then the deltas since).
#[allow(dead_code)] // not every test binary uses every helper
#[derive(Default)]
pub(crate) struct MemoryChains {
    files: std::collections::HashMap<String, bytes::Bytes>,
    chains: std::collections::HashMap<String, Vec<String>>,
    taken: usize,
    /// Views written as deltas so far.
    pub(crate) deltas: usize,
}

#[allow(dead_code)] // not every test binary uses every helper
impl MemoryChains {
    /// Takes an incremental checkpoint of `engine`, keeps it (the engine's
    /// chains advance) and returns it read back through its files, each
    /// delta view through its chain (what a restart restores).
    pub(crate) fn checkpoint(&mut self, engine: &mut Engine) -> EngineCheckpoint {
        use storepulse_engine::checkpoint::view_file;
        self.taken += 1;
        let dir = format!("c{}", self.taken);
        let cp = engine.checkpoint_incremental().unwrap();
        let mut own = std::collections::HashMap::new();
        for (name, b) in cp.encode().unwrap() {
            let b = bytes::Bytes::from(b);
            self.files.insert(format!("{dir}/{name}"), b.clone());
            own.insert(name, b);
        }
        let mut delta_chains = std::collections::HashMap::new();
        for v in &cp.meta.views {
            let file = format!("{dir}/{}", view_file(&v.name, v.delta));
            if v.delta {
                self.deltas += 1;
                let chain = self.chains.get_mut(&v.name).expect("a delta has a base");
                chain.push(file);
                for f in chain.iter() {
                    own.insert(f.clone(), self.files[f].clone());
                }
                delta_chains.insert(v.name.clone(), chain.clone());
            } else {
                self.chains.insert(v.name.clone(), vec![file]);
            }
        }
        engine.checkpoint_stored(&cp);
        EngineCheckpoint::decode(&own, &delta_chains).unwrap()
    }
}
