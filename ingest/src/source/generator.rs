//! [`GeneratorSource`]: the synthetic chain in real time (event time is
//! wall-clock time), for `demo` and load tests.

use std::{sync::Arc, time::Duration};

use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};

use super::{Position, Source, SourceBatch, SourceContext, SourceError, SourceMessage};
use crate::{
    dead_letter::{record_dead_letters, DeadLetterSink},
    decode::{EventDecoder, RawRecord},
    error::Result,
    gen::{Chain, ChainConfig, GenEvent, Simulator},
    schema::StreamKind,
};

/// The synthetic chain in real time: event time is wall-clock time.
#[derive(Debug, Clone)]
pub struct GeneratorSource {
    /// The chain to simulate (its `start_ms` is replaced by "now").
    pub chain: ChainConfig,
    /// Target events per second; `None` keeps the chain's natural rate.
    pub rate: Option<f64>,
    /// How often to emit a batch.
    pub tick: Duration,
}

impl GeneratorSource {
    /// Runs until `shutdown` turns true or the channel closes.
    pub async fn run(
        self,
        tx: mpsc::Sender<SourceMessage>,
        dead_letters: Arc<dyn DeadLetterSink>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<()> {
        let now = chrono::Utc::now().timestamp_millis();
        let mut cfg = self.chain.clone();
        cfg.start_ms = now;
        // A live chain restocks by its replenishment policy (a healthy demo).
        cfg.restock_to_policy = true;
        let chain = Chain::new(cfg);
        // Receipts carry ~1.1 events (member links); IoT is a small fixed rate.
        let intensity_for = |chain: &Chain, t: i64| {
            self.rate
                .map(|r| r / (chain.receipts_per_sec_at(t) * 1.1).max(1e-9))
        };
        let mut sim = Simulator::new(chain.clone());
        let partition: Arc<str> = "generator".into();
        let mut decoders: Vec<EventDecoder> = StreamKind::ALL
            .iter()
            .map(|k| EventDecoder::new(*k, partition.clone()))
            .collect();
        let mut seq = 0u64;
        let mut pending: Vec<Vec<GenEvent>> = vec![Vec::new(); StreamKind::ALL.len()];
        let mut interval = tokio::time::interval(self.tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                return Ok(());
            }
            let now = chrono::Utc::now().timestamp_millis();
            if let Some(i) = intensity_for(&chain, now) {
                sim.set_intensity(i);
            }
            sim.advance(now, &mut |e| pending[e.stream as usize].push(e));
            for (k, events) in pending.iter_mut().enumerate() {
                if events.is_empty() {
                    continue;
                }
                let records: Vec<RawRecord<'_>> = events
                    .iter()
                    .map(|e| {
                        seq += 1;
                        RawRecord {
                            bytes: e.json.as_bytes(),
                            position: seq,
                        }
                    })
                    .collect();
                let bytes = records.iter().map(|r| r.bytes.len()).sum();
                let out = decoders[k].decode(&records)?;
                record_dead_letters(&*dead_letters, &out.dead_letters)?;
                events.clear();
                if let Some(batch) = out.batch {
                    let msg = SourceMessage::Batch(SourceBatch {
                        stream: StreamKind::ALL[k],
                        batch,
                        events: out.events,
                        bytes,
                        position: Position {
                            partition: partition.clone(),
                            next_offset: seq + 1,
                        },
                    });
                    if tx.send(msg).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }
}

impl Source for GeneratorSource {
    fn describe(&self) -> String {
        "generator source".to_string()
    }

    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            GeneratorSource::run(*self, ctx.tx, ctx.dead_letters, ctx.shutdown)
                .await
                .map_err(SourceError::from)
        })
    }
}
