//! The engine's own thread. Applying a micro-batch is CPU work that holds
//! a thread for up to hundreds of milliseconds at high rates; on the shared
//! multi-threaded runtime it would stall the tasks queued behind it on that
//! worker (HTTP and pgwire queries, Kafka I/O) and give queries a long
//! latency tail. So the apply loop and the background view refresher run on
//! a dedicated runtime of two `storepulse-engine` threads (the way InfluxDB 3
//! keeps DataFusion work off its I/O runtime; two, so that an apply's
//! partitioned DataFusion plans keep their parallelism), while sources,
//! servers and query execution stay on the main runtime. The OS scheduler
//! shares the cores between the two runtimes; a query task is never queued
//! behind an apply on the same worker. Tasks talk across
//! the two through channels and the engine's async lock, which work between
//! runtimes.

use std::future::Future;

use anyhow::Context;
use tokio::{runtime::Handle, sync::oneshot, task::JoinHandle};

/// Dedicated threads running the engine's runtime until dropped.
pub(crate) struct EngineRuntime {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EngineRuntime {
    /// Starts the runtime (threads named `storepulse-engine`).
    pub(crate) fn start() -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("storepulse-engine")
            .enable_all()
            .build()
            .context("cannot start the engine runtime")?;
        let handle = rt.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("storepulse-engine-main".into())
            .spawn(move || {
                let _ = rt.block_on(stopped);
                // Tasks still running (only after a failed start) are dropped.
                rt.shutdown_background();
            })
            .context("cannot start the engine thread")?;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Runs `fut` on the engine thread; the handle can be awaited from any
    /// runtime.
    pub(crate) fn spawn<F>(&self, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(fut)
    }
}

impl Drop for EngineRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_run_on_the_engine_thread_and_are_awaited_from_another_runtime() {
        let rt = EngineRuntime::start().unwrap();
        let name = rt
            .spawn(async { std::thread::current().name().map(str::to_string) })
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("storepulse-engine"));
        // Work spawned from inside lands on the same thread.
        let inner = rt
            .spawn(async {
                tokio::spawn(async { std::thread::current().name().map(str::to_string) })
                    .await
                    .unwrap()
            })
            .await
            .unwrap();
        assert_eq!(inner.as_deref(), Some("storepulse-engine"));
        drop(rt);
    }
}
