//! What a query reads: the materialized views (through query-time views,
//! refreshed views and subqueries) and whether it reads live engine state
//! (`late_events`, `engine_clock`), so that a snapshot evaluates only those.

use std::collections::HashSet;

use datafusion::{
    common::tree_node::TreeNodeRecursion,
    datasource::{source_as_provider, view::ViewTable},
    logical_expr::LogicalPlan,
};

use crate::{
    refresh::RefreshedView,
    snapshot::{ClockTable, SnapshotRowsTable, ViewStateTable},
};

/// The engine state a plan reads.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reads {
    /// Materialized views, by name.
    pub views: HashSet<String>,
    /// `late_events` or `engine_clock`: the query needs a current snapshot
    /// even if it reads no view.
    pub engine_state: bool,
}

impl Reads {
    /// What `plan` reads.
    pub fn of(plan: &LogicalPlan) -> Reads {
        let mut r = Reads::default();
        r.add(plan);
        r
    }

    /// Adds what `plan` reads (queries that share one snapshot).
    pub fn add(&mut self, plan: &LogicalPlan) {
        let _ = plan.apply_with_subqueries(|p| {
            if let LogicalPlan::TableScan(scan) = p {
                if let Ok(provider) = source_as_provider(&scan.source) {
                    if let Some(v) = provider.downcast_ref::<ViewTable>() {
                        self.add(v.logical_plan());
                    } else if let Some(r) = provider.downcast_ref::<RefreshedView>() {
                        // A fresh result is read from memory: nothing to evaluate.
                        if r.is_stale() {
                            self.add(r.plan());
                        }
                    } else if let Some(t) = provider.downcast_ref::<ViewStateTable>() {
                        self.views.insert(t.view.clone());
                    } else if provider.downcast_ref::<SnapshotRowsTable>().is_some()
                        || provider.downcast_ref::<ClockTable>().is_some()
                    {
                        self.engine_state = true;
                    }
                }
            }
            Ok(TreeNodeRecursion::Continue)
        });
    }

    /// Reads nothing that changes with ingest (fresh refreshed views,
    /// dimensions, the lake, catalogs): the last published snapshot serves.
    pub fn is_static(&self) -> bool {
        self.views.is_empty() && !self.engine_state
    }
}
