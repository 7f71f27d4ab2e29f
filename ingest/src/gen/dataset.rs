//! Writing a generated dataset to a directory (`storepulse gen`).

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufWriter, Write},
    path::Path,
};

use super::model::{Chain, ChainConfig, Simulator};
use crate::{
    error::{IngestError, Result},
    schema::StreamKind,
};

/// What [`write_dataset`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatasetSummary {
    /// Events written per stream.
    pub events: BTreeMap<StreamKind, u64>,
}

impl DatasetSummary {
    /// Events written in all streams.
    pub fn total(&self) -> u64 {
        self.events.values().sum()
    }
}

/// Simulates `days` of the chain and writes `<stream>.jsonl` for every stream
/// plus `stores.csv`, `products.csv`, `replenishment_policy.csv` and
/// `prices.csv` (with head office's changes over the `days`) into
/// `out`. `progress(done, total)` is called with simulated milliseconds.
pub fn write_dataset(
    cfg: ChainConfig,
    days: u32,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<DatasetSummary> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| IngestError::Io {
            path: path.clone(),
            source,
        }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let chain = Chain::new(cfg.clone());
    for (name, text) in [
        ("stores.csv", chain.stores_csv()),
        ("products.csv", chain.products_csv()),
        ("replenishment_policy.csv", chain.policy_csv()),
        (
            "prices.csv",
            chain.prices_csv(cfg.start_ms + days as i64 * 86_400_000),
        ),
    ] {
        let p = out.join(name);
        std::fs::write(&p, text).map_err(io(&p))?;
    }
    let mut files = Vec::new();
    for k in StreamKind::ALL {
        let p = out.join(format!("{}.jsonl", k.name()));
        files.push((
            BufWriter::with_capacity(1 << 20, File::create(&p).map_err(io(&p))?),
            p,
        ));
    }
    let mut summary = DatasetSummary::default();
    let mut error: Option<IngestError> = None;
    let mut emit = |e: super::GenEvent| {
        if error.is_some() {
            return;
        }
        let (f, p) = &mut files[e.stream as usize];
        if let Err(source) = f
            .write_all(e.json.as_bytes())
            .and_then(|_| f.write_all(b"\n"))
        {
            error = Some(IngestError::Io {
                path: p.clone(),
                source,
            });
        }
        *summary.events.entry(e.stream).or_default() += 1;
    };
    let mut sim = Simulator::new(chain);
    let start = cfg.start_ms;
    let total = days as i64 * 86_400_000;
    let mut t = start;
    while t < start + total {
        t = (t + 3_600_000).min(start + total);
        sim.advance(t, &mut emit);
        progress((t - start) as u64, total as u64);
    }
    sim.flush_offline(&mut emit);
    if let Some(e) = error {
        return Err(e);
    }
    for (mut f, p) in files {
        f.flush().map_err(io(&p))?;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_is_byte_for_byte_deterministic() {
        let cfg = ChainConfig {
            stores: 4,
            skus: 40,
            members: 50,
            ..Default::default()
        };
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let mut calls = 0;
        let sa = write_dataset(cfg.clone(), 1, a.path(), &mut |_, _| calls += 1).unwrap();
        let sb = write_dataset(cfg, 1, b.path(), &mut |_, _| {}).unwrap();
        assert_eq!(calls, 24);
        assert_eq!(sa, sb);
        assert!(sa.events[&StreamKind::Sales] > 100);
        for name in [
            "sales.jsonl",
            "stock_movements.jsonl",
            "stock_counts.jsonl",
            "iot_readings.jsonl",
            "member_links.jsonl",
            "purchase_orders.jsonl",
            "stores.csv",
            "products.csv",
            "replenishment_policy.csv",
            "prices.csv",
        ] {
            let x = std::fs::read(a.path().join(name)).unwrap();
            let y = std::fs::read(b.path().join(name)).unwrap();
            // The first day's deliveries come before the stock runs low:
            // no order is placed yet.
            assert!(
                !x.is_empty() || name == "purchase_orders.jsonl",
                "{name} is empty"
            );
            assert!(x == y, "{name} differs between runs");
        }
    }
}
