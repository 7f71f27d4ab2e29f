//! The one registry of storepulse's kernel aggregates: each is listed once
//! here, and the list gives both the UDAFs a session registers
//! ([`aggregate_functions`]) and the in-place readers the engine keeps its
//! state with ([`readable_groups_accumulator`]). The framework (`agg`)
//! names no kernel; the kernels (`ledger`, `velocity`) and `distinct` name
//! only the framework.

use datafusion::{
    common::Result,
    logical_expr::{function::AccumulatorArgs, AggregateUDF},
    physical_expr::aggregate::AggregateFunctionExpr,
};

use crate::{
    agg::{readable, KernelUdaf, ReadableGroups},
    distinct,
    ledger::LedgerFactory,
    velocity::{DecayedSumFactory, DistinctDaysFactory, HourlyUnitsFactory},
};

/// Defines [`aggregate_functions`] and [`readable_groups_accumulator`] from
/// one list of `factory type = factory value`.
macro_rules! kernel_registry {
    ($($factory:ty = $make:expr),* $(,)?) => {
        /// storepulse's aggregate functions.
        pub fn aggregate_functions() -> Vec<AggregateUDF> {
            vec![$(AggregateUDF::from(KernelUdaf($make))),*]
        }

        /// The readable accumulator of `expr` if it is one of storepulse's
        /// kernel aggregates or a `count(DISTINCT x)` (`None` for
        /// DataFusion's other aggregates).
        pub fn readable_groups_accumulator(
            expr: &AggregateFunctionExpr,
        ) -> Option<Result<Box<dyn ReadableGroups>>> {
            let schema = datafusion::arrow::datatypes::Schema::empty();
            let exprs = expr.expressions();
            let args = AccumulatorArgs {
                return_field: expr.field(),
                schema: &schema,
                expr_fields: &[],
                ignore_nulls: expr.ignore_nulls(),
                order_bys: &[],
                is_reversed: expr.is_reversed(),
                name: expr.name(),
                is_distinct: expr.is_distinct(),
                exprs: &exprs,
            };
            let udaf = expr.fun().inner().as_ref();
            None$(.or_else(|| readable::<$factory>(udaf, &args)))*
                .or_else(|| distinct::for_expr(expr))
        }
    };
}

kernel_registry! {
    LedgerFactory = LedgerFactory::new(false),
    LedgerFactory = LedgerFactory::new(true),
    DecayedSumFactory = DecayedSumFactory::new(),
    HourlyUnitsFactory = HourlyUnitsFactory::new(),
    DistinctDaysFactory = DistinctDaysFactory::new(),
}
