//! OpenTelemetry export: the `kubevirt_vmi_hypervisor_info` observable gauge, the agent's
//! self-metrics, the OTLP (gRPC, HTTP/protobuf) or stdout exporter, and push-on-change.
//!
//! Instrument callbacks run on the SDK's periodic-reader thread: they only take an inventory
//! snapshot (an `Arc`, rebuilt only after a change) and read counters; they never call libvirt
//! and never flush. Push on change is a single [`Flusher`] task: a change wakes it, it waits the
//! debounce, then runs one `force_flush` on a blocking thread; changes during a flush coalesce
//! into one more flush. A down collector therefore costs one blocked thread at most, never the
//! event path, and memory stays bounded (the gauge is rebuilt from the inventory each time).

pub mod otlp;
pub mod points;
pub mod reporting;
pub mod resource;
pub mod telemetry;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::KeyValue;
use opentelemetry::{StringValue, Value};
use opentelemetry_sdk::metrics::{
    Instrument, MeterProviderBuilder, PeriodicReader, SdkMeterProvider, Stream,
};
use tokio::sync::Notify;

use crate::config::{AgentConfig, ExporterKind};
use crate::inventory::{Inventory, Lifecycle};
pub use points::domain_attributes;
pub use telemetry::Telemetry;

/// Meter (instrumentation scope) name.
pub const METER_NAME: &str = "virt-hypervisor-agent";

/// Why export could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("building the OTLP exporter failed")]
    Build(#[source] opentelemetry_otlp::ExporterBuildError),
    #[error("setting up TLS for the HTTP exporter: {0}")]
    Tls(String),
    #[error("reading TLS file {path}")]
    TlsFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The running export pipeline.
#[derive(Debug)]
pub struct Exporter {
    provider: Option<SdkMeterProvider>,
    wake: Arc<Notify>,
    urgent: Arc<AtomicBool>,
    urgent_wake: Arc<Notify>,
}

impl Exporter {
    /// Build the meter provider and register every instrument. Must run inside a multi-thread
    /// tokio runtime (the gRPC exporter spawns its channel worker on it).
    pub fn start(
        cfg: &AgentConfig,
        node: &str,
        inventory: Arc<Mutex<Inventory>>,
        telemetry: Arc<Telemetry>,
    ) -> Result<Self, ExportError> {
        let mut builder = provider_builder(cfg, node);
        let interval = export_interval(cfg);
        match cfg.export.exporter {
            ExporterKind::Otlp => {
                let exporter = reporting::Reporting::new(otlp::build(&cfg.export)?);
                let mut reader = PeriodicReader::builder(exporter);
                if let Some(i) = interval {
                    reader = reader.with_interval(i);
                }
                builder = builder.with_reader(reader.build());
            }
            ExporterKind::Stdout => {
                let mut reader =
                    PeriodicReader::builder(opentelemetry_stdout::MetricExporter::default());
                if let Some(i) = interval {
                    reader = reader.with_interval(i);
                }
                builder = builder.with_reader(reader.build());
            }
            ExporterKind::None => {}
        }
        let provider = builder.build();
        // Without a reader nothing would ever collect them (and the SDK logs an error for each).
        if cfg.export.exporter != ExporterKind::None {
            register_instruments(&provider, cfg, node, inventory, telemetry);
        }
        Ok(Self {
            provider: Some(provider),
            wake: Arc::new(Notify::new()),
            urgent: Arc::new(AtomicBool::new(false)),
            urgent_wake: Arc::new(Notify::new()),
        })
    }

    /// A handle that schedules a debounced push.
    pub fn trigger(&self) -> PushTrigger {
        PushTrigger {
            wake: Arc::clone(&self.wake),
            urgent: Arc::clone(&self.urgent),
            urgent_wake: Arc::clone(&self.urgent_wake),
        }
    }

    /// Spawn the push-on-change task (no-op when `debounce` is zero).
    pub fn spawn_flusher(&self, debounce: Duration) -> Option<tokio::task::JoinHandle<()>> {
        if debounce.is_zero() {
            return None;
        }
        let provider = self.provider.clone()?;
        let wake = Arc::clone(&self.wake);
        let urgent = Arc::clone(&self.urgent);
        let urgent_wake = Arc::clone(&self.urgent_wake);
        Some(tokio::spawn(async move {
            loop {
                wake.notified().await;
                // Wait the debounce, unless an urgent push arrives (before or during it).
                if !urgent.swap(false, Ordering::AcqRel) {
                    tokio::select! {
                        _ = tokio::time::sleep(debounce) => {}
                        _ = urgent_wake.notified() => {}
                    }
                    urgent.store(false, Ordering::Release);
                }
                let p = provider.clone();
                let started = Instant::now();
                match tokio::task::spawn_blocking(move || p.force_flush()).await {
                    Ok(Ok(())) => {
                        tracing::debug!(
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "pushed on change"
                        )
                    }
                    // The exporter wrapper reports failures (rate-limited).
                    Ok(Err(e)) => tracing::debug!(error = %e, "push to the collector failed"),
                    Err(e) => tracing::error!(error = %e, "push task failed"),
                }
            }
        }))
    }

    /// Flush once more and shut the provider down, bounded by `deadline`.
    pub async fn shutdown(mut self, deadline: Duration) {
        let Some(provider) = self.provider.take() else {
            return;
        };
        let task = tokio::task::spawn_blocking(move || {
            if let Err(e) = provider.force_flush() {
                tracing::warn!(error = %e, "final flush failed");
            }
            if let Err(e) = provider.shutdown() {
                tracing::debug!(error = %e, "meter provider shutdown reported an error");
            }
        });
        if tokio::time::timeout(deadline, task).await.is_err() {
            tracing::warn!("final flush did not finish within {deadline:?}; exiting anyway");
        }
    }
}

/// Cloneable handle that asks the flusher for a push.
#[derive(Clone, Debug)]
pub struct PushTrigger {
    wake: Arc<Notify>,
    urgent: Arc<AtomicBool>,
    urgent_wake: Arc<Notify>,
}

impl PushTrigger {
    pub fn push(&self) {
        self.wake.notify_one();
    }

    /// Push without waiting for the debounce (the first complete picture after startup).
    pub fn push_now(&self) {
        self.urgent.store(true, Ordering::Release);
        self.urgent_wake.notify_one();
        self.wake.notify_one();
    }
}

/// A meter provider builder with the agent's resource and the info gauge's cardinality limit,
/// still without a reader.
pub fn provider_builder(cfg: &AgentConfig, node: &str) -> MeterProviderBuilder {
    let metric_name = cfg.metric.name.clone();
    let limit = cfg.metric.cardinality_limit;
    SdkMeterProvider::builder()
        .with_resource(resource::build(node))
        .with_view(move |inst: &Instrument| {
            if inst.name() == metric_name {
                Stream::builder().with_cardinality_limit(limit).build().ok()
            } else {
                None
            }
        })
}

/// Explicit config interval, else `OTEL_METRIC_EXPORT_INTERVAL` (read by the SDK: `None`), else
/// the agent's default of 30 s.
fn export_interval(cfg: &AgentConfig) -> Option<Duration> {
    if let Some(i) = cfg.export.interval {
        return Some(i);
    }
    match std::env::var("OTEL_METRIC_EXPORT_INTERVAL") {
        Ok(v) if v.trim().parse::<u64>().is_ok() => None,
        _ => Some(crate::config::DEFAULT_EXPORT_INTERVAL),
    }
}

/// The `connection` attribute of a connection-level self-metric (the label is shared, not copied).
fn connection_attribute(m: &telemetry::ConnMeta) -> [KeyValue; 1] {
    [KeyValue::new(
        "connection",
        Value::String(StringValue::from(Arc::clone(&m.label))),
    )]
}

/// Register the info gauge and the self-metrics on `provider`. Their callbacks run at each
/// collection: they read the inventory snapshot and the connection table (both shared `Arc`s,
/// rebuilt only after a change) and never call libvirt.
pub fn register_instruments(
    provider: &SdkMeterProvider,
    cfg: &AgentConfig,
    node: &str,
    inventory: Arc<Mutex<Inventory>>,
    telemetry: Arc<Telemetry>,
) {
    let meter = provider.meter(METER_NAME);
    let points = Mutex::new(points::InfoPoints::new(node, cfg.metric.attributes.clone()));

    let inv = Arc::clone(&inventory);
    let tel = Arc::clone(&telemetry);
    let _info = meter
        .i64_observable_gauge(cfg.metric.name.clone())
        .with_description("Hypervisor that runs each VM on this node: 1 per active domain, labelled kvm, qemu-tcg or unknown")
        .with_callback(move |obs| {
            let snap = inv.lock().unwrap_or_else(|p| p.into_inner()).snapshot();
            let conns = tel.connection_meta();
            let mut points = points.lock().unwrap_or_else(|p| p.into_inner());
            for attrs in points.refresh(snap, conns) {
                obs.observe(1, attrs);
            }
        })
        .build();

    let inv = Arc::clone(&inventory);
    let _domains = meter
        .i64_observable_gauge("virt_hypervisor_agent_domains")
        .with_description("Active domains known to the agent, by hypervisor type")
        .with_callback(move |obs| {
            let snap = inv.lock().unwrap_or_else(|p| p.into_inner()).snapshot();
            for (t, n) in snap.count_by_type() {
                obs.observe(n as i64, &[KeyValue::new("hypervisor_type", t.as_str())]);
            }
        })
        .build();

    let tel = Arc::clone(&telemetry);
    let _up = meter
        .i64_observable_gauge("virt_hypervisor_agent_connection_up")
        .with_description("1 when the agent's libvirt connection is established, else 0")
        .with_callback(move |obs| {
            for m in tel.connection_meta().values() {
                obs.observe(i64::from(m.up), &connection_attribute(m));
            }
        })
        .build();

    let tel = Arc::clone(&telemetry);
    let _reconnects = meter
        .u64_observable_counter("virt_hypervisor_agent_reconnects")
        .with_description("Successful reconnections of a libvirt connection after it was lost")
        .with_callback(move |obs| {
            for m in tel.connection_meta().values() {
                obs.observe(m.reconnects, &connection_attribute(m));
            }
        })
        .build();

    let tel = Arc::clone(&telemetry);
    let _sync = meter
        .f64_observable_gauge("virt_hypervisor_agent_last_sync_duration")
        .with_unit("s")
        .with_description("Duration of the last full resync of a connection")
        .with_callback(move |obs| {
            for m in tel.connection_meta().values() {
                if let Some(d) = m.last_sync {
                    obs.observe(d.as_secs_f64(), &connection_attribute(m));
                }
            }
        })
        .build();

    let tel = Arc::clone(&telemetry);
    let _events = meter
        .u64_observable_counter("virt_hypervisor_agent_lifecycle_events")
        .with_description("Domain lifecycle events received from libvirt, by event type")
        .with_callback(move |obs| {
            for ev in Lifecycle::ALL {
                obs.observe(tel.events(ev), &[KeyValue::new("event", ev.as_str())]);
            }
        })
        .build();

    let tel = Arc::clone(&telemetry);
    let _errors = meter
        .u64_observable_counter("virt_hypervisor_agent_xml_errors")
        .with_description(
            "Domain XML fetches or parses that failed, by kind (fetch, timeout, parse)",
        )
        .with_callback(move |obs| {
            for (kind, n) in tel.xml_errors() {
                obs.observe(n, &[KeyValue::new("kind", kind)]);
            }
        })
        .build();
    // Observable instruments stay registered with the provider after their handles drop.
}
