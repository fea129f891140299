//! Structured concurrency, written once: how a task is told to stop (and by when), and how the
//! owner of a set of tasks waits for them within a deadline.
//!
//! Every long-lived task of the agent (connections, discovery, the node checks, the health
//! endpoint, the heartbeat) takes a [`StopSignal`]; its owner keeps the [`Stop`] and the task's
//! handle, and waits for it with [`drain_by`]. The one exception is the export task, which holds
//! nothing to release: the agent aborts it, then flushes a last export itself.

use std::time::Instant;

use tokio::sync::watch;
use tokio::task::JoinSet;

/// The sending half: asks every task holding one of its signals to stop.
#[derive(Debug)]
pub struct Stop(watch::Sender<Option<Instant>>);

/// The receiving half: `None` while the task may run, then the instant by which it must be done.
/// A dropped [`Stop`] reads as "stop now".
#[derive(Clone, Debug)]
pub struct StopSignal(watch::Receiver<Option<Instant>>);

impl Stop {
    pub fn new() -> (Stop, StopSignal) {
        let (tx, rx) = watch::channel(None);
        (Stop(tx), StopSignal(rx))
    }

    /// Ask to stop by `by` (the first deadline given stands).
    pub fn stop(&self, by: Instant) {
        self.0.send_if_modified(|d| {
            let first = d.is_none();
            d.get_or_insert(by);
            first
        });
    }

    /// Another signal of this stop.
    pub fn signal(&self) -> StopSignal {
        StopSignal(self.0.subscribe())
    }
}

impl StopSignal {
    /// The deadline, once asked to stop.
    pub fn deadline(&self) -> Option<Instant> {
        *self.0.borrow()
    }

    /// Wait until asked to stop; the deadline.
    pub async fn stopped(&mut self) -> Instant {
        match self.0.wait_for(Option::is_some).await {
            Ok(d) => d.unwrap_or_else(Instant::now),
            Err(_) => Instant::now(),
        }
    }
}

/// Wait for every task of `set` until `by`, then abort the ones still running and wait for them
/// to unwind (an aborted task ends at its next await). Returns how many were still running at
/// the deadline.
pub async fn drain_by<T: 'static>(set: &mut JoinSet<T>, by: Instant) -> usize {
    let all = async { while set.join_next().await.is_some() {} };
    if tokio::time::timeout_at(by.into(), all).await.is_ok() {
        return 0;
    }
    let late = set.len();
    set.abort_all();
    while set.join_next().await.is_some() {}
    late
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn every_signal_sees_the_first_deadline() {
        let (stop, mut a) = Stop::new();
        let mut b = stop.signal();
        assert_eq!(a.deadline(), None);
        let by = Instant::now() + Duration::from_secs(1);
        stop.stop(by);
        stop.stop(by + Duration::from_secs(5));
        assert_eq!(a.stopped().await, by);
        assert_eq!(b.stopped().await, by);
        assert_eq!(a.clone().deadline(), Some(by));
    }

    #[tokio::test]
    async fn a_dropped_stop_means_stop_now() {
        let (stop, mut signal) = Stop::new();
        drop(stop);
        let before = Instant::now();
        assert!(signal.stopped().await >= before);
    }

    #[tokio::test]
    async fn drain_by_waits_for_the_quick_and_aborts_the_late() {
        let mut set = JoinSet::new();
        set.spawn(async {});
        set.spawn(std::future::pending::<()>());
        set.spawn(std::future::pending::<()>());
        let late = drain_by(&mut set, Instant::now() + Duration::from_millis(50)).await;
        assert_eq!(late, 2);
        assert!(set.is_empty(), "every task was waited for");

        set.spawn(async {});
        assert_eq!(
            drain_by(&mut set, Instant::now() + Duration::from_secs(10)).await,
            0
        );
    }
}
