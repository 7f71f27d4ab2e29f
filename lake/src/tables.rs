//! `history.<stream>` and `snapshots.<view>`: the lake as SQL tables in the
//! serving session.
//!
//! * `history.<stream>` is a `ListingTable` over `events/<stream>/date=/`
//!   with `date` as partition column: `WHERE date >= '2026-11-01'` lists
//!   and reads only those directories, and a range on `ts` skips row
//!   groups by their statistics. Files of the earlier hourly layout
//!   (`date=/hour=/`) are still read (the `hour=` directory is ignored). The columns are the stream's (receipts one row per line,
//!   as the `sales` stream), so a view's SQL runs unchanged over history.
//!   `history.late_events` has the `late_events` columns.
//! * `snapshots.<view>` is the view's columns + `snapshot_ts` + `date`, over
//!   `views/<view>/date=/`, restricted to snapshots whose manifest exists.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::{
    arrow::datatypes::{DataType, SchemaRef},
    catalog::{MemorySchemaProvider, Session},
    common::{DFSchema, ScalarValue},
    datasource::{
        file_format::parquet::ParquetFormat,
        listing::{ListingOptions, ListingTable, ListingTableConfig},
        TableProvider, TableType,
    },
    error::Result as DfResult,
    logical_expr::{col, lit, Expr, TableProviderFilterPushDown},
    physical_plan::{
        empty::EmptyExec, filter::FilterExec, projection::ProjectionExec, ExecutionPlan,
    },
    prelude::SessionContext,
};

use crate::{
    error::{LakeError, Result},
    snapshot::{committed_ids, SNAPSHOT_TS},
    store::Lake,
};

fn listing(
    lake: &Lake,
    dir: &str,
    schema: SchemaRef,
    partitions: &[&str],
) -> Result<Arc<ListingTable>> {
    let opts = ListingOptions::new(Arc::new(ParquetFormat::default()))
        .with_file_extension(".parquet")
        .with_table_partition_cols(
            partitions
                .iter()
                .map(|p| (p.to_string(), DataType::Utf8))
                .collect(),
        );
    let cfg = ListingTableConfig::new(lake.table_url(dir)?)
        .with_listing_options(opts)
        .with_schema(schema);
    Ok(Arc::new(ListingTable::try_new(cfg)?))
}

/// Registers the lake's store and the `history` and `snapshots` schemas.
/// `streams` are (name, schema) of archived streams; `views` are the
/// snapshotted views with their file schemas.
pub fn register_lake_tables(
    lake: &Lake,
    ctx: &SessionContext,
    streams: &[(String, SchemaRef)],
    views: &[(String, SchemaRef)],
) -> Result<()> {
    lake.register(ctx);
    let catalog = ctx
        .catalog("datafusion")
        .ok_or_else(|| LakeError::Config("no datafusion catalog".into()))?;
    let history = Arc::new(MemorySchemaProvider::new());
    for (name, schema) in streams {
        let t = listing(lake, &format!("events/{name}"), schema.clone(), &["date"])?;
        datafusion::catalog::SchemaProvider::register_table(history.as_ref(), name.clone(), t)?;
    }
    catalog.register_schema("history", history)?;
    let snapshots = Arc::new(MemorySchemaProvider::new());
    for (name, schema) in views {
        let inner = listing(lake, &format!("views/{name}"), schema.clone(), &["date"])?;
        let t = Arc::new(CommittedSnapshots {
            inner,
            lake: lake.clone(),
        });
        datafusion::catalog::SchemaProvider::register_table(snapshots.as_ref(), name.clone(), t)?;
    }
    catalog.register_schema("snapshots", snapshots)?;
    Ok(())
}

/// A view's snapshot files, filtered to committed snapshots.
#[derive(Debug)]
struct CommittedSnapshots {
    inner: Arc<ListingTable>,
    lake: Lake,
}

#[async_trait]
impl TableProvider for CommittedSnapshots {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        self.inner.supports_filters_pushdown(filters)
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let schema = self.inner.schema();
        let ts_idx = schema.index_of(SNAPSHOT_TS)?;
        let wanted: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..schema.fields().len()).collect(),
        };
        let committed = committed_ids(&self.lake)
            .await
            .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
        if committed.is_empty() {
            return Ok(Arc::new(EmptyExec::new(Arc::new(schema.project(&wanted)?))));
        }
        // Scan with snapshot_ts included, keep committed snapshots only, then
        // project to what was asked.
        let mut inner_proj = wanted.clone();
        if !inner_proj.contains(&ts_idx) {
            inner_proj.push(ts_idx);
        }
        let plan = self
            .inner
            .scan(state, Some(&inner_proj), filters, None)
            .await?;
        let scanned = plan.schema();
        let df_schema = DFSchema::try_from(scanned.as_ref().clone())?;
        let list: Vec<Expr> = committed
            .iter()
            .map(|ts| {
                lit(ScalarValue::TimestampMillisecond(
                    Some(*ts),
                    Some("UTC".into()),
                ))
            })
            .collect();
        let predicate =
            state.create_physical_expr(col(SNAPSHOT_TS).in_list(list, false), &df_schema)?;
        let filtered: Arc<dyn ExecutionPlan> = Arc::new(FilterExec::try_new(predicate, plan)?);
        if inner_proj.len() == wanted.len() {
            return Ok(filtered);
        }
        let exprs = (0..wanted.len())
            .map(|i| {
                let f = scanned.field(i);
                (
                    Arc::new(datafusion::physical_expr::expressions::Column::new(
                        f.name(),
                        i,
                    )) as Arc<dyn datafusion::physical_expr::PhysicalExpr>,
                    f.name().clone(),
                )
            })
            .collect::<Vec<_>>();
        Ok(Arc::new(ProjectionExec::try_new(exprs, filtered)?))
    }
}
