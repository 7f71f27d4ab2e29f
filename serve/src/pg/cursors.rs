//! Cursors over the wire (`DECLARE`, `FETCH`, `CLOSE`): the Arrow rows of
//! each open cursor, per connection, bounded in number and idle time.

use super::*;

/// Open cursors at most per connection.
pub(super) const CURSORS_PER_CONNECTION: usize = 16;
/// A cursor unused this long is dropped (a client that neither closes it
/// nor disconnects).
pub(super) const CURSOR_IDLE: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// The open cursors of every connection, by (peer address, name).
#[derive(Default)]
pub(super) struct Cursors(pub(super) std::sync::Mutex<HashMap<(SocketAddr, String), Cursor>>);

/// A declared cursor: its columns and the rows not fetched yet.
pub(super) struct Cursor {
    pub(super) schema: SchemaRef,
    /// Rows not fetched yet, each batch with the bytes reserved for it.
    pub(super) rows: VecDeque<(RecordBatch, usize)>,
    /// The rows' memory, reserved in the serving memory pool (`[serving]
    /// memory_limit`, shared with the queries): released as batches are
    /// fetched and when the cursor goes.
    pub(super) memory: MemoryReservation,
    pub(super) last_used: Instant,
}

impl Cursor {
    /// A cursor over `batches`, taking over the query's reservation of
    /// their memory (`result`; the rows stay counted once) or reserving it
    /// in `pool`; 53200 if the pool cannot hold them.
    pub(super) fn new(
        name: &str,
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
        result: storepulse_engine::ResultMemory,
        pool: &Arc<dyn MemoryPool>,
    ) -> PgWireResult<Cursor> {
        let rows: VecDeque<(RecordBatch, usize)> = batches
            .into_iter()
            .map(|b| {
                let bytes = storepulse_engine::batch_bytes(&b);
                (b, bytes)
            })
            .collect();
        let total = rows.iter().map(|(_, n)| n).sum();
        let memory = match result.into_reservation() {
            Some(held) => held,
            None => MemoryConsumer::new(format!("pgwire cursor {name}")).register(pool),
        };
        memory
            .try_resize(total)
            .map_err(|e| pg_error(&EngineError::from(e)))?;
        Ok(Cursor {
            schema,
            rows,
            memory,
            last_used: Instant::now(),
        })
    }
}

impl Cursors {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(SocketAddr, String), Cursor>> {
        self.0.lock().expect("cursors lock")
    }

    /// Adds (or replaces) `name` of `peer`; drops idle cursors first.
    pub(super) fn declare(&self, peer: SocketAddr, name: &str, cursor: Cursor) -> PgWireResult<()> {
        let mut all = self.lock();
        all.retain(|_, c| c.last_used.elapsed() < CURSOR_IDLE);
        let key = (peer, name.to_string());
        if !all.contains_key(&key)
            && all.keys().filter(|(p, _)| *p == peer).count() >= CURSORS_PER_CONNECTION
        {
            return Err(sql_error(
                "54000",
                format!("too many open cursors on this connection (at most {CURSORS_PER_CONNECTION}): CLOSE some"),
            ));
        }
        all.insert(key, cursor);
        metrics::gauge!(crate::metric_names::PG_CURSORS).set(all.len() as f64);
        Ok(())
    }

    /// The columns of `name` of `peer`.
    pub(super) fn schema(&self, peer: SocketAddr, name: &str) -> PgWireResult<SchemaRef> {
        self.lock()
            .get(&(peer, name.to_string()))
            .map(|c| c.schema.clone())
            .ok_or_else(|| no_cursor(name))
    }

    /// Takes up to `count` (all if `None`) of the next rows of `name`.
    pub(super) fn fetch(
        &self,
        peer: SocketAddr,
        name: &str,
        count: Option<usize>,
    ) -> PgWireResult<(SchemaRef, Vec<RecordBatch>)> {
        let mut all = self.lock();
        let c = all
            .get_mut(&(peer, name.to_string()))
            .ok_or_else(|| no_cursor(name))?;
        c.last_used = Instant::now();
        let mut left = count.unwrap_or(usize::MAX);
        let mut out = Vec::new();
        while left > 0 {
            let Some((b, bytes)) = c.rows.pop_front() else {
                break;
            };
            if b.num_rows() > left {
                // The rest keeps the whole batch's buffers (and bytes).
                out.push(b.slice(0, left));
                c.rows
                    .push_front((b.slice(left, b.num_rows() - left), bytes));
                break;
            }
            left -= b.num_rows();
            c.memory.shrink(bytes.min(c.memory.size()));
            out.push(b);
        }
        Ok((c.schema.clone(), out))
    }

    /// `CLOSE name` (`None`: `CLOSE ALL`) of `peer`.
    pub(super) fn close(&self, peer: SocketAddr, name: Option<&str>) -> PgWireResult<()> {
        let mut all = self.lock();
        match name {
            Some(n) => {
                all.remove(&(peer, n.to_string()))
                    .ok_or_else(|| no_cursor(n))?;
            }
            None => all.retain(|(p, _), _| *p != peer),
        }
        metrics::gauge!(crate::metric_names::PG_CURSORS).set(all.len() as f64);
        Ok(())
    }

    /// Drops the cursors of a connection that ended.
    pub(super) fn close_connection(&self, peer: SocketAddr) {
        let _ = self.close(peer, None);
    }
}
