//! Every libvirt call of a connection goes through [`Calls::run`]: on a blocking thread, holding
//! one of the connection's permits, bounded by `fetch_timeout`, and given up at once when the
//! connection is asked to stop. One typed error, [`CallError`], says which of those ended it.
//!
//! The permit moves into the blocking closure and is released only when libvirt returns, so a call
//! that outlives its timeout (a hung daemon) still counts: a connection never holds more than
//! `fetch_concurrency` blocking threads, whatever its daemon does, and never takes them from the
//! others. What the abandoned closure returns late (a connection, domain handles) is dropped on
//! its own blocking thread, never on the async worker.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::source::libvirt::LibvirtError;

pub use crate::tasks::StopSignal;

/// Why a libvirt call of a connection did not return a result.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{what} timed out after {after:?}")]
    Timeout { what: &'static str, after: Duration },
    #[error("{what} abandoned: the connection is stopping")]
    Stopped { what: &'static str },
    #[error("{what} panicked")]
    Panicked { what: &'static str },
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
}

/// The bounds of one connection's libvirt calls, shared by all its tasks and kept across
/// reconnects (a call stuck on the previous session still holds its permit).
#[derive(Debug, Clone)]
pub struct Calls {
    permits: Arc<Semaphore>,
    /// One open at a time: an open stuck on a hung daemon holds this too, so retries wait for it
    /// instead of parking one more thread each.
    opening: Arc<Semaphore>,
    timeout: Duration,
    stop: StopSignal,
}

impl Calls {
    pub fn new(concurrency: usize, timeout: Duration, stop: StopSignal) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            opening: Arc::new(Semaphore::new(1)),
            timeout,
            stop,
        }
    }

    /// The per-call bound.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Run `f` on a blocking thread with a permit. The timeout covers waiting for the permit too.
    pub async fn run<T, F>(&self, what: &'static str, f: F) -> Result<T, CallError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, LibvirtError> + Send + 'static,
    {
        self.run_with(what, None, f).await
    }

    /// [`run`](Self::run) for opening the connection: also one at a time.
    pub async fn open<T, F>(&self, f: F) -> Result<T, CallError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, LibvirtError> + Send + 'static,
    {
        self.run_with("opening the connection", Some(&self.opening), f)
            .await
    }

    async fn run_with<T, F>(
        &self,
        what: &'static str,
        exclusive: Option<&Arc<Semaphore>>,
        f: F,
    ) -> Result<T, CallError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, LibvirtError> + Send + 'static,
    {
        let mut stop = self.stop.clone();
        let call = async {
            let stopped = |_| CallError::Stopped { what };
            let alone = match exclusive {
                Some(s) => Some(Arc::clone(s).acquire_owned().await.map_err(stopped)?),
                None => None,
            };
            let permit = Arc::clone(&self.permits)
                .acquire_owned()
                .await
                .map_err(stopped)?;
            let task = tokio::task::spawn_blocking(move || {
                let r = f();
                drop((permit, alone));
                r
            });
            match task.await {
                Ok(r) => r.map_err(CallError::from),
                Err(_) => Err(CallError::Panicked { what }),
            }
        };
        tokio::select! {
            biased;
            _ = stop.stopped() => Err(CallError::Stopped { what }),
            r = tokio::time::timeout(self.timeout, call) => r.unwrap_or(Err(CallError::Timeout {
                what,
                after: self.timeout,
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn calls(concurrency: usize, timeout: Duration) -> (crate::tasks::Stop, Calls) {
        let (tx, rx) = crate::tasks::Stop::new();
        (tx, Calls::new(concurrency, timeout, rx))
    }

    #[tokio::test]
    async fn a_result_and_a_libvirt_error_come_back_as_they_are() {
        let (_tx, c) = calls(1, Duration::from_secs(5));
        assert_eq!(c.run("answer", || Ok(42)).await.ok(), Some(42));
        let e = c
            .run::<(), _>("listing", || Err(LibvirtError::Closed))
            .await
            .err();
        assert!(matches!(e, Some(CallError::Libvirt(LibvirtError::Closed))));
    }

    #[tokio::test]
    async fn a_hung_call_times_out_and_keeps_its_permit_until_it_returns() {
        let (_tx, c) = calls(1, Duration::from_millis(250));
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let e = c
            .run("hung", move || {
                let _ = release_rx.recv();
                Ok(())
            })
            .await
            .err();
        assert!(matches!(e, Some(CallError::Timeout { what: "hung", .. })));
        // The only permit is still held by the hung thread: the next call cannot start.
        let e = c.run("next", || Ok(())).await.err();
        assert!(matches!(e, Some(CallError::Timeout { what: "next", .. })));
        assert_eq!(c.permits.available_permits(), 0);
        release_tx.send(()).unwrap();
        let back = c.run("after", || Ok(7));
        assert_eq!(back.await.ok(), Some(7));
    }

    #[tokio::test]
    async fn a_hung_open_makes_the_next_open_wait_but_not_other_calls() {
        let (_tx, c) = calls(4, Duration::from_millis(250));
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let e = c
            .open(move || {
                let _ = release_rx.recv();
                Ok(())
            })
            .await
            .err();
        assert!(matches!(e, Some(CallError::Timeout { .. })));
        let e = c.open(|| Ok(())).await.err();
        assert!(matches!(
            e,
            Some(CallError::Timeout {
                what: "opening the connection",
                ..
            })
        ));
        assert_eq!(c.run("listing", || Ok(1)).await.ok(), Some(1));
        release_tx.send(()).unwrap();
        assert_eq!(c.open(|| Ok(2)).await.ok(), Some(2));
    }

    #[tokio::test]
    async fn stop_abandons_a_call_at_once() {
        let (tx, c) = calls(1, Duration::from_secs(3600));
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let call = c.run("hung", move || {
            let _ = release_rx.recv();
            Ok(())
        });
        tx.stop(Instant::now());
        assert!(matches!(
            call.await,
            Err(CallError::Stopped { what: "hung" })
        ));
        let _ = release_tx.send(());
    }
}
