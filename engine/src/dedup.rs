//! De-duplication of `event_id`s within an event-time horizon.
//!
//! Stores that replay their offline buffer send some events twice. Ids are
//! kept as 128-bit XXH3 hashes (16 bytes, collision odds negligible) with the
//! event time of their first copy, and forgotten once that time falls more
//! than the horizon behind the watermark.

use hashbrown::HashMap;
use xxhash_rust::xxh3::xxh3_128;

/// Seen-set of event ids for one stream.
#[derive(Debug, Clone)]
pub struct Deduplicator {
    horizon_ms: i64,
    seen: HashMap<u128, i64>,
    last_evict_wm: i64,
}

impl Deduplicator {
    /// A de-duplicator keeping ids for `horizon_ms` of event time.
    pub fn new(horizon_ms: i64) -> Self {
        Self {
            horizon_ms,
            seen: HashMap::new(),
            last_evict_wm: i64::MIN,
        }
    }

    /// True if `event_id` was not seen before (and remembers it).
    pub fn first_time(&mut self, event_id: &str, ts: i64) -> bool {
        let h = xxh3_128(event_id.as_bytes());
        match self.seen.entry(h) {
            hashbrown::hash_map::Entry::Occupied(_) => false,
            hashbrown::hash_map::Entry::Vacant(v) => {
                v.insert(ts);
                true
            }
        }
    }

    /// Every remembered id hash (high and low 64 bits) with its event
    /// time, for a checkpoint.
    pub fn export(&self) -> (Vec<u64>, Vec<u64>, Vec<i64>) {
        let n = self.seen.len();
        let (mut hi, mut lo, mut ts) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for (h, t) in &self.seen {
            hi.push((h >> 64) as u64);
            lo.push(*h as u64);
            ts.push(*t);
        }
        (hi, lo, ts)
    }

    /// Adds ids exported by [`Self::export`].
    pub fn import(&mut self, hi: &[u64], lo: &[u64], ts: &[i64]) {
        self.seen.reserve(ts.len());
        for ((h, l), t) in hi.iter().zip(lo).zip(ts) {
            self.seen.insert(((*h as u128) << 64) | *l as u128, *t);
        }
    }

    /// Forgets ids older than `watermark - horizon`. Cheap to call often: it
    /// only sweeps when the watermark moved by a tenth of the horizon.
    pub fn evict(&mut self, watermark_ms: i64) {
        if watermark_ms.saturating_sub(self.last_evict_wm) < self.horizon_ms / 10 {
            return;
        }
        self.last_evict_wm = watermark_ms;
        let cutoff = watermark_ms.saturating_sub(self.horizon_ms);
        self.seen.retain(|_, ts| *ts >= cutoff);
    }

    /// Ids currently remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// True when no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Approximate memory held, in bytes.
    pub fn size(&self) -> usize {
        // An entry is 32 bytes, not 24: u128 is 16-byte aligned.
        self.seen.capacity() * (std::mem::size_of::<(u128, i64)>() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_caught_until_the_horizon_passes() {
        let mut d = Deduplicator::new(1_000);
        assert!(d.first_time("a", 100));
        assert!(!d.first_time("a", 100));
        d.evict(1_050);
        assert!(!d.first_time("a", 100), "still inside the horizon");
        d.evict(5_000);
        assert!(d.is_empty());
        assert!(d.first_time("a", 100));
    }
}
