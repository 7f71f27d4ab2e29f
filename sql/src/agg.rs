//! A small framework for storepulse's aggregate functions.
//!
//! Each aggregate is a [`Kernel`]: a per-group state type, how rows update
//! it, how two states merge, how a state is encoded (one `Binary` value, the
//! aggregate's only state column) and how states become the output array.
//! [`KernelUdaf`] turns a kernel into a DataFusion `AggregateUDF` with both a
//! `GroupsAccumulator` (one `Vec` of states for every group, used by
//! `GROUP BY` and by the engine's keyed state) and a plain `Accumulator`.
//!
//! Every kernel here is order independent: merging the same rows in any
//! order, split into any partial states, gives the same output. That is what
//! makes the streaming views equal to the batch oracle.

use std::{fmt::Debug, sync::Arc};

use datafusion::{
    arrow::{
        array::{
            Array, ArrayRef, AsArray, BinaryBuilder, BooleanArray, Int64Array, ListBuilder,
            StructBuilder,
        },
        compute::cast,
        datatypes::{DataType, Field, FieldRef, Fields, TimeUnit},
    },
    common::{exec_err, internal_err, plan_err, Result, ScalarValue},
    logical_expr::{
        function::{AccumulatorArgs, StateFieldsArgs},
        Accumulator, AggregateUDFImpl, EmitTo, GroupsAccumulator, Signature,
    },
    physical_expr::expressions::Literal,
};

/// One aggregate function's behaviour, state and output.
pub(crate) trait Kernel: Debug + Send + Sync + 'static {
    /// Per-group state.
    type State: Default + Clone + Debug + Send + Sync + 'static;
    /// Folds rows `0..groups.len()` of `args` into `states[groups[i]]`,
    /// skipping rows whose `filter` is false or null.
    fn update(
        &self,
        states: &mut [Self::State],
        args: &[ArrayRef],
        groups: &[usize],
        filter: Option<&BooleanArray>,
    ) -> Result<()>;
    /// Merges `other` into `state`.
    fn merge(&self, state: &mut Self::State, other: Self::State) -> Result<()>;
    /// Appends the state's encoding to `out`.
    fn encode(&self, state: &Self::State, out: &mut Vec<u8>);
    /// Decodes a state written by [`Kernel::encode`].
    fn decode(&self, bytes: &[u8]) -> Result<Self::State>;
    /// The output values, one per state.
    fn evaluate(&self, states: Vec<Self::State>) -> Result<ArrayRef>;
    /// Heap bytes held by one state (beyond `size_of::<State>()`).
    fn heap_size(&self, state: &Self::State) -> usize;
}

/// Builds a kernel from the aggregate's arguments (constants are read from
/// the physical argument expressions).
pub(crate) trait KernelFactory: Debug + Send + Sync + 'static {
    /// The kernel type.
    type K: Kernel;
    /// SQL name.
    fn name(&self) -> &str;
    /// Argument signature.
    fn signature(&self) -> &Signature;
    /// Output type for the given argument types (checks them).
    fn return_type(&self, args: &[DataType]) -> Result<DataType>;
    /// The kernel for one call site.
    fn kernel(&self, args: &AccumulatorArgs) -> Result<Self::K>;
}

/// Adapts a [`KernelFactory`] to DataFusion's `AggregateUDFImpl`.
#[derive(Debug)]
pub(crate) struct KernelUdaf<F>(pub(crate) F);

impl<F: KernelFactory> PartialEq for KernelUdaf<F> {
    fn eq(&self, other: &Self) -> bool {
        self.0.name() == other.0.name()
    }
}
impl<F: KernelFactory> Eq for KernelUdaf<F> {}
impl<F: KernelFactory> std::hash::Hash for KernelUdaf<F> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.name().hash(state)
    }
}

impl<F: KernelFactory> AggregateUDFImpl for KernelUdaf<F> {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn signature(&self) -> &Signature {
        self.0.signature()
    }
    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.0.return_type(arg_types)
    }
    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(Single {
            kernel: self.0.kernel(&args)?,
            state: Default::default(),
        }))
    }
    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format!("{}[state]", args.name),
            DataType::Binary,
            true,
        ))])
    }
    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        true
    }
    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(Groups {
            kernel: self.0.kernel(&args)?,
            states: Vec::new(),
            heap: 0,
        }))
    }
}

/// A keyed accumulator whose current values can be read without draining
/// it (DataFusion's `evaluate` and `state` consume the groups they emit).
/// The engine reads its kept state through this.
pub trait ReadableGroups: GroupsAccumulator {
    /// The current output of `groups` (indices into the accumulator); the
    /// state is left as it is.
    fn evaluate_groups(&self, groups: &[usize]) -> Result<ArrayRef>;
    /// The partial state of `groups` (the columns [`GroupsAccumulator::state`]
    /// would emit for them, in that order), the state left as it is: a
    /// checkpoint encodes what it writes without draining and decoding the
    /// rest back.
    fn state_groups(&self, groups: &[usize]) -> Result<Vec<ArrayRef>>;
}

/// The readable accumulator of kernel aggregate `F` if `udaf` is one
/// (see [`crate::kernels`], which tries every registered kernel).
pub(crate) fn readable<F: KernelFactory>(
    udaf: &dyn AggregateUDFImpl,
    args: &AccumulatorArgs,
) -> Option<Result<Box<dyn ReadableGroups>>> {
    let f = udaf.downcast_ref::<KernelUdaf<F>>()?;
    Some(f.0.kernel(args).map(|kernel| {
        Box::new(Groups {
            kernel,
            states: Vec::new(),
            heap: 0,
        }) as Box<dyn ReadableGroups>
    }))
}

impl<K: Kernel> ReadableGroups for Groups<K> {
    fn evaluate_groups(&self, groups: &[usize]) -> Result<ArrayRef> {
        let states = groups
            .iter()
            .map(|&g| self.states.get(g).cloned().unwrap_or_default())
            .collect();
        self.kernel.evaluate(states)
    }

    fn state_groups(&self, groups: &[usize]) -> Result<Vec<ArrayRef>> {
        let empty = K::State::default();
        Ok(vec![encode_all(
            &self.kernel,
            groups.iter().map(|&g| self.states.get(g).unwrap_or(&empty)),
        )])
    }
}

struct Groups<K: Kernel> {
    kernel: K,
    states: Vec<K::State>,
    /// Heap bytes of `states` (exact: see `merge_batch`).
    heap: usize,
}

impl<K: Kernel> Groups<K> {
    fn heap_of_all(&self) -> usize {
        self.states.iter().map(|s| self.kernel.heap_size(s)).sum()
    }
}

fn encode_all<'a, K: Kernel>(
    kernel: &K,
    states: impl ExactSizeIterator<Item = &'a K::State>,
) -> ArrayRef {
    let mut b = BinaryBuilder::with_capacity(states.len(), states.len() * 16);
    let mut buf = Vec::new();
    for s in states {
        buf.clear();
        kernel.encode(s, &mut buf);
        b.append_value(&buf);
    }
    Arc::new(b.finish())
}

/// Merges encoded states into `states[groups[i]]`; with `heap`, keeps it
/// the exact heap total of `states` (each merged state's size before is
/// taken off and its size after added).
fn merge_encoded<K: Kernel>(
    kernel: &K,
    states: &mut [K::State],
    values: &[ArrayRef],
    groups: &[usize],
    filter: Option<&BooleanArray>,
    mut heap: Option<&mut usize>,
) -> Result<()> {
    let Some(col) = values.first() else {
        return internal_err!("aggregate state: no state column");
    };
    let Some(bin) = col.as_binary_opt::<i32>() else {
        return internal_err!("aggregate state: expected Binary, got {}", col.data_type());
    };
    for (row, &g) in groups.iter().enumerate() {
        if bin.is_null(row) || filter.is_some_and(|f| !f.is_valid(row) || !f.value(row)) {
            continue;
        }
        let other = kernel.decode(bin.value(row))?;
        let state = &mut states[g];
        match heap.as_deref_mut() {
            Some(h) => {
                let before = kernel.heap_size(state);
                kernel.merge(state, other)?;
                *h = (*h + kernel.heap_size(state)).saturating_sub(before);
            }
            None => kernel.merge(state, other)?,
        }
    }
    Ok(())
}

impl<K: Kernel> GroupsAccumulator for Groups<K> {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.states.resize_with(total_num_groups, Default::default);
        self.kernel
            .update(&mut self.states, values, group_indices, opt_filter)?;
        // Partial (per-batch) states: not held for long, summed once.
        self.heap = self.heap_of_all();
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let states = emit_to.take_needed(&mut self.states);
        self.heap = self.heap_of_all();
        self.kernel.evaluate(states)
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        let states = emit_to.take_needed(&mut self.states);
        self.heap = self.heap_of_all();
        Ok(vec![encode_all(&self.kernel, states.iter())])
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.states.resize_with(total_num_groups, Default::default);
        // The heap total is kept exact as states merge (a sample of the
        // states misjudged a chain's skewed ledgers by half).
        merge_encoded(
            &self.kernel,
            &mut self.states,
            values,
            group_indices,
            None,
            Some(&mut self.heap),
        )
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let rows = values.first().map_or(0, |v| v.len());
        let mut states = vec![K::State::default(); rows];
        let groups: Vec<usize> = (0..rows).collect();
        self.kernel
            .update(&mut states, values, &groups, opt_filter)?;
        Ok(vec![encode_all(&self.kernel, states.iter())])
    }

    fn size(&self) -> usize {
        self.states.capacity() * std::mem::size_of::<K::State>() + self.heap
    }
}

#[derive(Debug)]
struct Single<K: Kernel> {
    kernel: K,
    state: K::State,
}

impl<K: Kernel> Accumulator for Single<K> {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let rows = values.first().map_or(0, |v| v.len());
        let groups = vec![0usize; rows];
        self.kernel
            .update(std::slice::from_mut(&mut self.state), values, &groups, None)
    }
    fn evaluate(&mut self) -> Result<ScalarValue> {
        let out = self.kernel.evaluate(vec![self.state.clone()])?;
        ScalarValue::try_from_array(&out, 0)
    }
    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.kernel.heap_size(&self.state)
    }
    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let mut buf = Vec::new();
        self.kernel.encode(&self.state, &mut buf);
        Ok(vec![ScalarValue::Binary(Some(buf))])
    }
    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let rows = states.first().map_or(0, |v| v.len());
        let groups = vec![0usize; rows];
        merge_encoded(
            &self.kernel,
            std::slice::from_mut(&mut self.state),
            states,
            &groups,
            None,
            None,
        )
    }
}

/// The type of every event-time value these functions produce.
pub(crate) fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// `List<Struct<fields>>`, the type of the list-valued functions.
pub(crate) fn struct_list_type(fields: Fields) -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Struct(fields), true)))
}

/// A builder for [`struct_list_type`] values: fill with
/// `values().field_builder::<B>(i)` per field, `values().append(true)` per
/// element, `append(true)` per list.
pub(crate) fn struct_list_builder(fields: Fields) -> ListBuilder<StructBuilder> {
    ListBuilder::new(StructBuilder::from_fields(fields.clone(), 0))
        .with_field(Arc::new(Field::new("item", DataType::Struct(fields), true)))
}

/// Event time in epoch milliseconds (any timestamp unit, or Int64 ms).
pub(crate) fn ts_millis(a: &ArrayRef, fname: &str) -> Result<Int64Array> {
    let ms = match a.data_type() {
        DataType::Timestamp(TimeUnit::Millisecond, _) | DataType::Int64 => {
            cast(a, &DataType::Int64)?
        }
        DataType::Timestamp(_, tz) => cast(
            &cast(a, &DataType::Timestamp(TimeUnit::Millisecond, tz.clone()))?,
            &DataType::Int64,
        )?,
        DataType::Null => cast(a, &DataType::Int64)?,
        other => return exec_err!("{fname}: expected a timestamp, got {other}"),
    };
    Ok(ms
        .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
        .clone())
}

/// A numeric argument as Int64 (rounding floats).
pub(crate) fn as_i64(a: &ArrayRef) -> Result<Int64Array> {
    let c = match a.data_type() {
        DataType::Float64 | DataType::Float32 | DataType::Decimal128(..) => {
            let f = cast(a, &DataType::Float64)?;
            let f = f.as_primitive::<datafusion::arrow::datatypes::Float64Type>();
            return Ok(f.unary_opt(|v| v.is_finite().then(|| v.round() as i64)));
        }
        _ => cast(a, &DataType::Int64)?,
    };
    Ok(c.as_primitive::<datafusion::arrow::datatypes::Int64Type>()
        .clone())
}

/// A numeric argument as Float64.
pub(crate) fn as_f64(a: &ArrayRef) -> Result<datafusion::arrow::array::Float64Array> {
    let c = cast(a, &DataType::Float64)?;
    Ok(
        c.as_primitive::<datafusion::arrow::datatypes::Float64Type>()
            .clone(),
    )
}

/// True if row `i` passes the aggregate's `FILTER`.
#[inline]
pub(crate) fn passes(filter: Option<&BooleanArray>, i: usize) -> bool {
    filter.is_none_or(|f| f.is_valid(i) && f.value(i))
}

/// The constant interval argument `idx` in milliseconds (e.g. a half-life).
pub(crate) fn interval_arg(args: &AccumulatorArgs, idx: usize, what: &str) -> Result<i64> {
    let fname = args.name;
    let Some(e) = args.exprs.get(idx) else {
        return plan_err!("{fname}: missing argument {}: {what}", idx + 1);
    };
    let Some(lit) = e.downcast_ref::<Literal>() else {
        return plan_err!(
            "{fname}: argument {} ({what}) must be a constant interval",
            idx + 1
        );
    };
    match crate::udf::interval_literal_ms(lit.value()) {
        Some(ms) if ms > 0 => Ok(ms),
        _ => plan_err!(
            "{fname}: argument {} ({what}) must be a positive interval without months, got {}",
            idx + 1,
            lit.value()
        ),
    }
}

/// Little-endian encoding helpers for kernel states.
pub(crate) mod codec {
    use datafusion::common::{internal_err, Result};

    pub(crate) fn put_i64(out: &mut Vec<u8>, v: i64) {
        out.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn put_f64(out: &mut Vec<u8>, v: f64) {
        out.extend_from_slice(&v.to_le_bytes());
    }
    /// A zigzag varint: 1 byte for -64..63, at most 10.
    pub(crate) fn put_var(out: &mut Vec<u8>, v: i64) {
        use integer_encoding::VarInt;
        let mut buf = [0u8; 10];
        let n = v.encode_var(&mut buf);
        out.extend_from_slice(&buf[..n]);
    }

    /// A cursor over an encoded state.
    pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

    impl Reader<'_> {
        pub(crate) fn i64(&mut self) -> Result<i64> {
            let Some((head, rest)) = self.0.split_first_chunk::<8>() else {
                return internal_err!("aggregate state: truncated");
            };
            self.0 = rest;
            Ok(i64::from_le_bytes(*head))
        }
        /// A value written by [`put_var`].
        pub(crate) fn var(&mut self) -> Result<i64> {
            use integer_encoding::VarInt;
            let Some((v, n)) = i64::decode_var(self.0) else {
                return internal_err!("aggregate state: truncated");
            };
            self.0 = &self.0[n..];
            Ok(v)
        }
        /// A byte.
        pub(crate) fn u8(&mut self) -> Result<u8> {
            let Some((b, rest)) = self.0.split_first() else {
                return internal_err!("aggregate state: truncated");
            };
            self.0 = rest;
            Ok(*b)
        }
        /// A count written by [`put_var`], at most the bytes left.
        pub(crate) fn var_len(&mut self) -> Result<usize> {
            let n = self.var()?;
            if n < 0 || n as usize > self.0.len() {
                return internal_err!("aggregate state: bad length {n}");
            }
            Ok(n as usize)
        }
        pub(crate) fn f64(&mut self) -> Result<f64> {
            Ok(f64::from_bits(self.i64()? as u64))
        }
        pub(crate) fn len(&mut self) -> Result<usize> {
            let n = self.i64()?;
            if n < 0 || n as usize > self.0.len() {
                return internal_err!("aggregate state: bad length {n}");
            }
            Ok(n as usize)
        }
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::Int64Array;

    use super::*;

    /// Keeps every value seen: a state whose heap grows with its rows.
    #[derive(Debug)]
    struct Keep;

    impl Kernel for Keep {
        type State = Vec<i64>;
        fn update(
            &self,
            states: &mut [Vec<i64>],
            args: &[ArrayRef],
            groups: &[usize],
            _filter: Option<&BooleanArray>,
        ) -> Result<()> {
            let v = args[0].as_primitive::<datafusion::arrow::datatypes::Int64Type>();
            for (i, &g) in groups.iter().enumerate() {
                states[g].push(v.value(i));
            }
            Ok(())
        }
        fn merge(&self, state: &mut Vec<i64>, other: Vec<i64>) -> Result<()> {
            state.extend(other);
            Ok(())
        }
        fn encode(&self, state: &Vec<i64>, out: &mut Vec<u8>) {
            state.iter().for_each(|v| codec::put_i64(out, *v));
        }
        fn decode(&self, bytes: &[u8]) -> Result<Vec<i64>> {
            let mut r = codec::Reader(bytes);
            (0..bytes.len() / 8).map(|_| r.i64()).collect()
        }
        fn evaluate(&self, states: Vec<Vec<i64>>) -> Result<ArrayRef> {
            Ok(Arc::new(Int64Array::from_iter_values(
                states.iter().map(|s| s.len() as i64),
            )))
        }
        fn heap_size(&self, state: &Vec<i64>) -> usize {
            state.capacity() * 8
        }
    }

    #[test]
    fn the_heap_total_stays_exact_as_states_merge_and_drain() {
        let mut g = Groups {
            kernel: Keep,
            states: Vec::new(),
            heap: 0,
        };
        let mut partial = Groups {
            kernel: Keep,
            states: Vec::new(),
            heap: 0,
        };
        // A skewed key space: group 0 takes most rows, as a best seller.
        for round in 0..20i64 {
            let values: ArrayRef = Arc::new(Int64Array::from_iter_values(0..50));
            let groups: Vec<usize> = (0..50usize)
                .map(|i| if i % 5 == 0 { (i / 5) % 4 } else { 0 })
                .collect();
            partial.update_batch(&[values], &groups, None, 4).unwrap();
            assert_eq!(partial.heap, partial.heap_of_all());
            let state = partial.state(EmitTo::All).unwrap();
            assert_eq!(partial.heap, 0);
            let into: Vec<usize> = (0..4).map(|i| (i + round as usize) % 6).collect();
            g.merge_batch(&state, &into, 6).unwrap();
            assert_eq!(g.heap, g.heap_of_all(), "round {round}");
        }
        assert!(g.heap > 0);
        g.evaluate(EmitTo::First(2)).unwrap();
        assert_eq!(g.heap, g.heap_of_all());
    }
}
