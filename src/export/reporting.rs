//! An exporter wrapper that reports export failures the way an operator wants to read them:
//! one warning when exports start failing, at most one a minute while they keep failing, and
//! one line when they work again. The SDK's own per-attempt error logs are filtered out by
//! default (`opentelemetry=off` in the log filter), so a collector outage does not flood the
//! journal with a pair of lines per push.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::Temporality;

/// How often a continuing failure is repeated in the log.
const REPEAT_EVERY: Duration = Duration::from_secs(60);

/// Wraps an exporter; see the module docs.
#[derive(Debug)]
pub struct Reporting<E> {
    inner: E,
    failing: AtomicBool,
    failures: AtomicU64,
    last_warn: Mutex<Option<Instant>>,
}

impl<E> Reporting<E> {
    pub fn new(inner: E) -> Self {
        Self {
            inner,
            failing: AtomicBool::new(false),
            failures: AtomicU64::new(0),
            last_warn: Mutex::new(None),
        }
    }

    fn failed(&self, error: &dyn std::fmt::Display) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let first = !self.failing.swap(true, Ordering::AcqRel);
        let mut last = self.last_warn.lock().unwrap_or_else(|p| p.into_inner());
        if first || last.is_none_or(|t| t.elapsed() >= REPEAT_EVERY) {
            tracing::warn!(%error, failed_exports = n, "export to the collector failed; the current state is sent again at the next export (repeats are logged once a minute)");
            *last = Some(Instant::now());
        } else {
            tracing::debug!(%error, "export to the collector failed");
        }
    }

    fn succeeded(&self) {
        if self.failing.swap(false, Ordering::AcqRel) {
            let n = self.failures.swap(0, Ordering::Relaxed);
            tracing::info!(failed_exports = n, "export to the collector works again");
        }
    }
}

impl<E: PushMetricExporter> PushMetricExporter for Reporting<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let result = self.inner.export(metrics).await;
        match &result {
            Ok(()) => self.succeeded(),
            Err(e) => self.failed(e),
        }
        result
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}
