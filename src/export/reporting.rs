//! Reports export failures the way an operator wants to read them:
//! one warning when exports start failing, at most one a minute while they keep failing, and
//! one line when they work again. The SDK's own per-attempt error logs are filtered out by
//! default (`opentelemetry=off` in the log filter), so a collector outage does not flood the
//! journal with a pair of lines per push.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a continuing failure is repeated in the log.
const REPEAT_EVERY: Duration = Duration::from_secs(60);

/// Reports the results of one sink's exports; see the module docs.
#[derive(Debug)]
pub struct Reporting {
    /// What the exports go to, for the log lines ("the collector", "stdout").
    target: &'static str,
    failing: AtomicBool,
    failures: AtomicU64,
    last_warn: Mutex<Option<Instant>>,
}

impl Reporting {
    pub fn new(target: &'static str) -> Self {
        Self {
            target,
            failing: AtomicBool::new(false),
            failures: AtomicU64::new(0),
            last_warn: Mutex::new(None),
        }
    }

    /// Record the outcome of one export.
    pub fn record<E: std::fmt::Display>(&self, result: &Result<(), E>) {
        match result {
            Ok(()) => self.succeeded(),
            Err(e) => self.failed(e),
        }
    }

    fn failed(&self, error: &dyn std::fmt::Display) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let first = !self.failing.swap(true, Ordering::AcqRel);
        let mut last = self.last_warn.lock().unwrap_or_else(|p| p.into_inner());
        if first || last.is_none_or(|t| t.elapsed() >= REPEAT_EVERY) {
            tracing::warn!(%error, failed_exports = n, "export to {} failed; the current state and any staleness markers not yet delivered are sent again at the next export (repeats are logged once a minute)", self.target);
            *last = Some(Instant::now());
        } else {
            tracing::debug!(%error, "export to {} failed", self.target);
        }
    }

    fn succeeded(&self) {
        if self.failing.swap(false, Ordering::AcqRel) {
            let n = self.failures.swap(0, Ordering::Relaxed);
            tracing::info!(failed_exports = n, "export to {} works again", self.target);
        }
    }
}
