//! State TTL: each group remembers the batch that last merged into it;
//! groups untouched for longer than the view's TTL are evicted (hop views
//! keep panes a neighbouring window still needs).

use datafusion::{arrow::datatypes::SchemaRef, common::Result};

use super::*;

impl GroupState {
    /// Tracks, per group, the batch that last touched it, so that idle
    /// groups can be evicted ([`Self::evict_touched_up_to`]). Plain,
    /// tumbling and hop window views (for hop views a group is a pane; a
    /// window row is idle when all its panes are); session windows keep
    /// bookkeeping across groups and are refused.
    pub fn enable_ttl(&mut self) -> Result<()> {
        if self.sessions.is_some() {
            return datafusion::common::plan_err!(
                "a state TTL is not supported on session() window views"
            );
        }
        self.touched = Some(vec![self.batch_no; self.num_groups()]);
        Ok(())
    }

    /// The TTL bookkeeping for a checkpoint (`None` without a TTL): per
    /// group the batch that last touched it, the batch counter and a hop
    /// view's floor.
    pub fn ttl_export(&self) -> Option<(&[u64], u64, Option<u64>)> {
        self.touched
            .as_deref()
            .map(|t| (t, self.batch_no, self.hop_floor))
    }

    /// Restores [`Self::ttl_export`] after [`Self::import`] (one stamp per
    /// group, in group order). Without a TTL (removed since the
    /// checkpoint) it is ignored.
    pub fn ttl_import(
        &mut self,
        touched: Vec<u64>,
        batch_no: u64,
        hop_floor: Option<u64>,
    ) -> Result<()> {
        if self.touched.is_none() {
            return Ok(());
        }
        if touched.len() != self.num_groups() {
            return datafusion::common::internal_err!(
                "{} TTL stamps for {} groups",
                touched.len(),
                self.num_groups()
            );
        }
        self.touched = Some(touched);
        self.batch_no = batch_no;
        if self.hop.is_some() {
            self.hop_floor = hop_floor;
        }
        Ok(())
    }

    /// Starts a new batch: the groups the next merges touch are stamped
    /// with the returned number.
    pub fn next_batch(&mut self) -> u64 {
        self.batch_no += 1;
        self.batch_no
    }

    /// Drops every group last touched in batch `upto` or before (with
    /// [`Self::enable_ttl`]); returns how many. The kept groups are
    /// exported, filtered and imported into a fresh state (the memory of
    /// the accumulators is released; the kept state is briefly held
    /// twice), and the next evaluation is a full one.
    pub fn evict_touched_up_to(&mut self, upto: u64, partial_schema: &SchemaRef) -> Result<usize> {
        use datafusion::arrow::{array::BooleanArray, compute::filter_record_batch};
        if self.hop.is_some() && self.touched.is_some() {
            // Windows go when all their panes are idle: from now on the
            // rows leave them out, whether or not their panes stay.
            self.hop_floor = Some(upto);
        }
        let Some(touched) = &self.touched else {
            return Ok(0);
        };
        let keep: Vec<bool> = match (self.hop, &self.converter) {
            (Some(hop), Some(conv)) => {
                let parser = conv.parser();
                let keys =
                    conv.convert_rows((0..self.num_groups()).map(|g| parser.parse(self.key(g))))?;
                hop_panes_to_keep(&keys, hop, touched, upto)?
            }
            _ => touched.iter().map(|t| *t > upto).collect(),
        };
        let evicted = keep.iter().filter(|k| !**k).count();
        if evicted == 0 {
            return Ok(0);
        }
        let kept_touched: Vec<u64> = touched
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(t, _)| *t)
            .collect();
        let all = self.export(partial_schema)?;
        let kept = filter_record_batch(&all, &BooleanArray::from(keep))?;
        drop(all);
        let mut fresh =
            GroupState::try_new(partial_schema, self.num_group_cols, self.aggs.clone())?;
        fresh.batch_no = self.batch_no;
        fresh.hop = self.hop;
        fresh.hop_floor = self.hop_floor;
        // Evicted groups leave no trace to write as a change: the view's
        // next checkpoint image is whole (`View::expire`).
        fresh.ckpt_gen = self.ckpt_gen;
        fresh.import(&kept)?;
        debug_assert_eq!(fresh.num_groups(), kept_touched.len());
        fresh.touched = Some(kept_touched);
        *self = fresh;
        Ok(evicted)
    }
}
