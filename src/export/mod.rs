//! OpenTelemetry export: the `kubevirt_vmi_hypervisor_info` observable gauge, the agent's
//! self-metrics, the OTLP (gRPC, HTTP/protobuf) or stdout exporter, periodic export and
//! push-on-change.
//!
//! One export task on the agent's runtime does all exporting: it waits for the periodic tick or
//! for the state's change signal (then the debounce, unless the push is urgent), collects through a manual
//! reader, and awaits the exporter (tonic or async reqwest, both on this runtime). There is no
//! reader thread and no blocking hand-off, so a push costs a collection and a request, not a
//! chain of thread wake-ups. Exports never overlap; changes during one coalesce into one more.
//! A down collector delays only this task (each request is bounded by the export timeout),
//! never the event path, and memory stays bounded (the gauge is rebuilt from the inventory).
//!
//! Instrument callbacks run inside the collection: they read the state through a
//! [`Store`](crate::state::Store) (the inventory snapshot and the connection table, shared `Arc`s
//! rebuilt only after a change) and never call libvirt or take the inventory's write lock.

pub mod otlp;
pub mod points;
pub mod reporting;
pub mod resource;
pub mod stdout;
pub mod wire;

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::{AgentConfig, ExporterKind};
use crate::inventory::Lifecycle;
use crate::state::{ConnMeta, Store};
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::KeyValue;
use opentelemetry::{StringValue, Value};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{
    Instrument, InstrumentKind, ManualReader, MeterProviderBuilder, Pipeline, SdkMeterProvider,
    Stream, Temporality,
};

/// Meter (instrumentation scope) name.
pub const METER_NAME: &str = "virt-hypervisor-agent";

/// Why export could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("building the OTLP exporter failed: {0}")]
    Build(String),
    #[error("setting up TLS for the OTLP exporter: {0}")]
    Tls(String),
    #[error("refusing to export: {0}")]
    Insecure(String),
    #[error("reading TLS file {path}")]
    TlsFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Why one export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportFailure {
    #[error("collecting the metrics failed: {0}")]
    Collect(String),
    #[error(transparent)]
    Send(#[from] otlp::SendError),
    #[error("writing to stdout failed: {0}")]
    Stdout(std::io::Error),
}

/// Where collected metrics go.
#[derive(Debug)]
enum SinkKind {
    Otlp(Box<otlp::Transport>),
    Stdout,
}

/// A sink: the request builder with its staleness markers, the transport (swapped by a reload,
/// taking effect at the next export), the failure report.
#[derive(Debug)]
struct Sink {
    kind: Mutex<Arc<SinkKind>>,
    staleness: Mutex<wire::Staleness>,
    report: reporting::Reporting,
}

/// Unix time in nanoseconds.
fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl Sink {
    fn new(kind: SinkKind, marker_limit: usize) -> Self {
        let target = match kind {
            SinkKind::Otlp(_) => "the collector",
            SinkKind::Stdout => "stdout",
        };
        Self {
            kind: Mutex::new(Arc::new(kind)),
            staleness: Mutex::new(wire::Staleness::new(marker_limit)),
            report: reporting::Reporting::new(target),
        }
    }

    fn kind(&self) -> Arc<SinkKind> {
        Arc::clone(&self.kind.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Export through `kind` from the next export on; the staleness markers owed stay owed.
    fn swap(&self, kind: SinkKind) {
        *self.kind.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(kind);
    }

    fn staleness(&self) -> std::sync::MutexGuard<'_, wire::Staleness> {
        self.staleness.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Export one collection: its live points plus the staleness markers owed (new ones only
    /// when `mark`). Markers are forgotten only once a request carrying them was delivered.
    async fn export(&self, rm: &ResourceMetrics, mark: bool) -> Result<(), ExportFailure> {
        let req = self.staleness().request(rm, now_nanos(), mark);
        let result = match &*self.kind() {
            SinkKind::Otlp(t) => t.send(req).await.map_err(ExportFailure::from),
            SinkKind::Stdout => stdout::write(stdout::render(&req))
                .await
                .map_err(ExportFailure::Stdout),
        };
        if result.is_ok() {
            self.staleness().delivered();
        }
        self.report.record(&result);
        result
    }
}

/// A manual reader that can be given to a provider and still be collected through: the
/// provider owns one clone, the export task another.
#[derive(Clone, Debug)]
pub struct SharedReader(Arc<ManualReader>);

impl SharedReader {
    pub fn new(temporality: Temporality) -> Self {
        Self(Arc::new(
            ManualReader::builder()
                .with_temporality(temporality)
                .build(),
        ))
    }
}

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline)
    }

    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

/// When the export task exports: every `interval`, and `debounce` after a change (`0`: only
/// periodically).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Timing {
    interval: Duration,
    debounce: Duration,
}

/// Collects and exports; shared by the export task and the final flush.
#[derive(Debug)]
struct Pipe {
    reader: SharedReader,
    sink: Sink,
    /// Read by the export task, which restarts its clock when a reload changes it.
    timing: tokio::sync::watch::Sender<Timing>,
}

impl Pipe {
    /// Collect everything and export it once. The collected points are not kept between
    /// exports (at 10,000 domains they are a few MB that would otherwise stay resident).
    /// `mark`: whether series that left since the last export get staleness markers (not in
    /// the final export at shutdown).
    async fn export_once(&self, mark: bool) -> Result<(), ExportFailure> {
        let mut rm = ResourceMetrics::default();
        self.reader
            .collect(&mut rm)
            .map_err(|e| ExportFailure::Collect(e.to_string()))?;
        self.sink.export(&rm, mark).await
    }
}

/// First retry delay after a failed export; doubled per failure up to the export interval.
const RETRY_FIRST: Duration = Duration::from_secs(1);

/// The running export pipeline.
#[derive(Debug)]
pub struct Exporter {
    provider: Option<SdkMeterProvider>,
    pipe: Option<Arc<Pipe>>,
    store: Store,
}

impl Exporter {
    /// Build the meter provider and register every instrument. Must run inside a multi-thread
    /// tokio runtime (the exporters run their connections on it).
    pub fn start(cfg: &AgentConfig, node: &str, store: Store) -> Result<Self, ExportError> {
        let kind = match cfg.export.exporter {
            ExporterKind::Otlp => Some(SinkKind::Otlp(Box::new(otlp::Transport::build(
                &cfg.export,
            )?))),
            ExporterKind::Stdout => Some(SinkKind::Stdout),
            ExporterKind::None => None,
        };
        // Markers owed are bounded by the series that can leave between two delivered exports:
        // the info gauge's limit, twice over (a full turnover during an outage), plus the
        // self-metrics' connection series.
        let marker_limit = cfg.metric.cardinality_limit.saturating_mul(2).max(1024);
        let pipe = kind.map(|kind| {
            Arc::new(Pipe {
                // OTLP's cumulative temporality: every export carries each series' full state.
                reader: SharedReader::new(Temporality::Cumulative),
                sink: Sink::new(kind, marker_limit),
                timing: tokio::sync::watch::Sender::new(Timing {
                    interval: export_interval(cfg),
                    debounce: cfg.export.debounce,
                }),
            })
        });
        let mut builder = provider_builder(cfg, node);
        if let Some(p) = &pipe {
            builder = builder.with_reader(p.reader.clone());
        }
        let provider = builder.build();
        // Without a reader nothing would ever collect them (and the SDK logs an error for each).
        if pipe.is_some() {
            register_instruments(&provider, cfg, node, store.clone());
        }
        Ok(Self {
            provider: Some(provider),
            pipe,
            store,
        })
    }

    /// Spawn the export task: periodic export, plus push on change unless `debounce` is zero,
    /// plus a retry after a failed export (1 s, doubling up to the interval), so the truth and
    /// the staleness markers owed reach the receiver soon after it is back. `None` when nothing
    /// is exported (`exporter: none`).
    pub fn spawn_export_task(&self, debounce: Duration) -> Option<tokio::task::JoinHandle<()>> {
        let pipe = Arc::clone(self.pipe.as_ref()?);
        let mut store = self.store.clone();
        pipe.timing.send_modify(|t| t.debounce = debounce);
        let mut timing_rx = pipe.timing.subscribe();
        Some(tokio::spawn(async move {
            let Timing {
                mut interval,
                mut debounce,
            } = *timing_rx.borrow_and_update();
            let mut tick = periodic(interval);
            let mut retry_delay = RETRY_FIRST;
            let mut retry_at: Option<tokio::time::Instant> = None;
            loop {
                let why = tokio::select! {
                    _ = tick.tick() => "periodic",
                    _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => "retry",
                    Ok(()) = timing_rx.changed() => {
                        // A reload changed the timing: the next periodic export is one new
                        // interval from now.
                        Timing { interval, debounce } = *timing_rx.borrow_and_update();
                        tick = periodic(interval);
                        continue;
                    }
                    _ = store.changed(), if !debounce.is_zero() => {
                        // Wait the debounce, unless an urgent push arrives (before or during it).
                        let until = tokio::time::Instant::now() + debounce;
                        while !store.take_urgent() {
                            tokio::select! {
                                _ = tokio::time::sleep_until(until) => break,
                                _ = store.changed() => {}
                            }
                        }
                        "on change"
                    }
                };
                // Whatever this export carries is the complete picture an urgent push asked for.
                store.take_urgent();
                let started = Instant::now();
                match pipe.export_once(true).await {
                    Ok(()) => {
                        retry_at = None;
                        retry_delay = RETRY_FIRST;
                        tracing::debug!(
                            why,
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "exported"
                        )
                    }
                    // The sink reports failures (rate-limited).
                    Err(e) => {
                        retry_at = Some(tokio::time::Instant::now() + retry_delay);
                        retry_delay = (retry_delay * 2).min(interval.max(RETRY_FIRST));
                        tracing::debug!(why, error = %e, retry_in = ?retry_delay, "export failed")
                    }
                }
            }
        }))
    }

    /// Apply a reloaded configuration's export settings from the next export on, keeping the
    /// staleness markers owed: the interval and debounce always, the transport (endpoint,
    /// headers, TLS files read again) when `transport`. On an error nothing changes. The
    /// exporter kind, the metric and the resource are fixed at start.
    pub fn reconfigure(&self, cfg: &AgentConfig, transport: bool) -> Result<(), ExportError> {
        let Some(pipe) = &self.pipe else {
            return Ok(());
        };
        if let (true, SinkKind::Otlp(_)) = (transport, &*pipe.sink.kind()) {
            let transport = otlp::Transport::build(&cfg.export)?;
            pipe.sink.swap(SinkKind::Otlp(Box::new(transport)));
        }
        pipe.timing.send_if_modified(|t| {
            let new = Timing {
                interval: export_interval(cfg),
                debounce: cfg.export.debounce,
            };
            std::mem::replace(t, new) != new
        });
        Ok(())
    }

    /// Export once more and shut the provider down, bounded by `deadline`. Call after the
    /// export task has been stopped. This export marks nothing stale: the VMs still run, and
    /// their series continue when the agent is back (see the README, "Staleness").
    pub async fn shutdown(mut self, deadline: Duration) {
        let Some(provider) = self.provider.take() else {
            return;
        };
        if let Some(pipe) = self.pipe.take() {
            match tokio::time::timeout(deadline, pipe.export_once(false)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "final export failed"),
                Err(_) => {
                    tracing::warn!(
                        "final export did not finish within {deadline:?}; exiting anyway"
                    )
                }
            }
        }
        if let Err(e) = provider.shutdown() {
            tracing::debug!(error = %e, "meter provider shutdown reported an error");
        }
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

/// A clock that ticks every `interval`, first one interval from now.
fn periodic(interval: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// Periodic export interval: the config's, else `OTEL_METRIC_EXPORT_INTERVAL` (milliseconds,
/// ignored when not a number, clamped to [`crate::config::MIN_EXPORT_INTERVAL`] ..
/// [`crate::config::MAX_EXPORT_INTERVAL`]), else the agent's default of 30 s; resolved by
/// [`crate::config::export_interval`], which also tells the binary what to warn about.
fn export_interval(cfg: &AgentConfig) -> Duration {
    crate::config::export_interval(cfg.export.interval).0
}

/// The `connection` attribute of a connection-level self-metric (the label is shared, not copied).
fn connection_attribute(m: &ConnMeta) -> [KeyValue; 1] {
    [KeyValue::new(
        "connection",
        Value::String(StringValue::from(Arc::clone(&m.label))),
    )]
}

/// An observable counter with one point per connection, labelled `connection`.
fn connection_counter(
    meter: &opentelemetry::metrics::Meter,
    store: &Store,
    name: &'static str,
    description: &'static str,
    value: fn(&ConnMeta) -> u64,
) {
    let store = store.clone();
    meter
        .u64_observable_counter(name)
        .with_description(description)
        .with_callback(move |obs| {
            for m in store.connections().values() {
                obs.observe(value(m), &connection_attribute(m));
            }
        })
        .build();
}

/// Register the info gauge and the self-metrics on `provider`. Their callbacks run at each
/// collection: they read the state through `store` (the inventory snapshot and the connection
/// table, both shared `Arc`s rebuilt only after a change) and never call libvirt.
pub fn register_instruments(
    provider: &SdkMeterProvider,
    cfg: &AgentConfig,
    node: &str,
    store: Store,
) {
    let meter = provider.meter(METER_NAME);
    let points = Arc::new(Mutex::new(
        points::InfoPoints::new(node, cfg.metric.attributes.clone())
            .with_cardinality_limit(cfg.metric.cardinality_limit),
    ));

    let st = store.clone();
    let info_points = Arc::clone(&points);
    let _info = meter
        .i64_observable_gauge(cfg.metric.name.clone())
        .with_description("Hypervisor that runs each VM on this node: 1 per active domain, labelled kvm, qemu-tcg, mshv or unknown")
        .with_callback(move |obs| {
            // Connections first: the owner drops a connection's domains before its entry, so
            // every domain in the snapshot read after this finds its connection's attributes.
            let conns = st.connections();
            let snap = st.snapshot();
            let mut points = info_points.lock().unwrap_or_else(|p| p.into_inner());
            for attrs in points.refresh(snap, conns) {
                obs.observe(1, attrs);
            }
        })
        .build();

    let st = store.clone();
    let _domains = meter
        .i64_observable_gauge("virt_hypervisor_agent_domains")
        .with_description("Active domains known to the agent, by hypervisor type")
        .with_callback(move |obs| {
            for (t, n) in st.snapshot().count_by_type() {
                obs.observe(*n as i64, &[KeyValue::new("hypervisor_type", t.as_str())]);
            }
        })
        .build();

    let st = store.clone();
    let _up = meter
        .i64_observable_gauge("virt_hypervisor_agent_connection_up")
        .with_description("1 when the agent's libvirt connection is established, else 0")
        .with_callback(move |obs| {
            for m in st.connections().values() {
                obs.observe(i64::from(m.up), &connection_attribute(m));
            }
        })
        .build();

    connection_counter(
        &meter,
        &store,
        "virt_hypervisor_agent_reconnects",
        "Successful reconnections of a libvirt connection after it was lost",
        |m| m.reconnects,
    );
    connection_counter(
        &meter,
        &store,
        "virt_hypervisor_agent_lifecycle_events_dropped",
        "Lifecycle events of a connection dropped because its backlog (libvirt.event_backlog) was full; a burst of drops triggers one resync of that connection",
        |m| m.dropped_events,
    );

    let st = store.clone();
    let _sync = meter
        .f64_observable_gauge("virt_hypervisor_agent_last_sync_duration")
        .with_unit("s")
        .with_description("Duration of the last full resync of a connection")
        .with_callback(move |obs| {
            for m in st.connections().values() {
                if let Some(d) = m.last_sync {
                    obs.observe(d.as_secs_f64(), &connection_attribute(m));
                }
            }
        })
        .build();

    let st = store.clone();
    let _events = meter
        .u64_observable_counter("virt_hypervisor_agent_lifecycle_events")
        .with_description("Domain lifecycle events received from libvirt, by event type")
        .with_callback(move |obs| {
            for ev in Lifecycle::ALL {
                obs.observe(
                    st.telemetry().events(ev),
                    &[KeyValue::new("event", ev.as_str())],
                );
            }
        })
        .build();

    let _landlock = meter
        .i64_observable_gauge("virt_hypervisor_agent_landlock")
        .with_description(
            "1, labelled with what Landlock self-confinement achieved: full, partial, none (kernel without Landlock) or off",
        )
        .with_callback(|obs| {
            if let Some(status) = crate::confine::status() {
                obs.observe(1, &[KeyValue::new("status", status.as_str())]);
            }
        })
        .build();

    let st = store.clone();
    let _rejected = meter
        .u64_observable_counter("virt_hypervisor_agent_discovery_rejected")
        .with_description(
            "Paths matching a discovery glob that were not connected to, by reason (not_socket, symlink, owner); each counted once while it stays rejected",
        )
        .with_callback(move |obs| {
            for (reason, n) in st.telemetry().rejections() {
                obs.observe(n, &[KeyValue::new("reason", reason)]);
            }
        })
        .build();

    let st = store.clone();
    let _errors = meter
        .u64_observable_counter("virt_hypervisor_agent_xml_errors")
        .with_description(
            "Domain XML fetches or parses that failed, by kind (fetch, timeout, parse)",
        )
        .with_callback(move |obs| {
            for (kind, n) in st.telemetry().xml_errors() {
                obs.observe(n, &[KeyValue::new("kind", kind)]);
            }
        })
        .build();

    // Whether this node can run KVM guests (src/node): one series per agent, exported at every
    // interval once the first check finished, so it doubles as the agent's heartbeat.
    let st = store.clone();
    let node_attr = [KeyValue::new("node", node.to_string())];
    let _kvm = meter
        .i64_observable_gauge("virt_hypervisor_agent_node_kvm_available")
        .with_description(
            "1 when this node can run KVM guests (/dev/kvm answers the KVM API), else 0",
        )
        .with_callback(move |obs| {
            if let Some(available) = st.telemetry().kvm_available() {
                obs.observe(i64::from(available), &node_attr);
            }
        })
        .build();

    // Whether this node can run guests on the Microsoft Hypervisor (src/node/mshv.rs): the
    // alert rules treat a node with it like one with KVM. One series per agent, like KVM's.
    let st = store.clone();
    let node_attr = [KeyValue::new("node", node.to_string())];
    let _mshv = meter
        .i64_observable_gauge("virt_hypervisor_agent_node_mshv_available")
        .with_description(
            "1 when this node can run guests on the Microsoft Hypervisor (/dev/mshv opens), else 0",
        )
        .with_callback(move |obs| {
            if let Some(available) = st.telemetry().mshv_available() {
                obs.observe(i64::from(available), &node_attr);
            }
        })
        .build();

    register_info_checks(&meter, points, store);
    // Observable instruments stay registered with the provider after their handles drop.
}

/// Self-metrics about the info gauge's attribute sets (see [`points`]): collisions and sets
/// beyond the cardinality limit, as of this collection (each callback brings the shared points
/// up to date first, which costs nothing when the info gauge's callback already did).
fn register_info_checks(
    meter: &opentelemetry::metrics::Meter,
    points: Arc<Mutex<points::InfoPoints>>,
    store: Store,
) {
    let (st, pts) = (store.clone(), Arc::clone(&points));
    let stats = move || {
        // Connections first, as in the info gauge's callback.
        let conns = st.connections();
        let snap = st.snapshot();
        let mut points = pts.lock().unwrap_or_else(|p| p.into_inner());
        points.refresh(snap, conns).for_each(drop);
        points.stats()
    };
    let stats = Arc::new(stats);
    let read = Arc::clone(&stats);
    let _collisions = meter
        .i64_observable_gauge("virt_hypervisor_agent_info_collisions")
        .with_description(
            "Active domains whose info attribute set another domain already has (both are one series)",
        )
        .with_callback(move |obs| obs.observe(read().collisions as i64, &[]))
        .build();
    let read = Arc::clone(&stats);
    let _over = meter
        .i64_observable_gauge("virt_hypervisor_agent_info_sets_over_limit")
        .with_description(
            "Info attribute sets beyond metric.cardinality_limit, exported only as one otel.metric.overflow point",
        )
        .with_callback(move |obs| obs.observe(read().over_limit as i64, &[]))
        .build();
    let _over_conn = meter
        .i64_observable_gauge("virt_hypervisor_agent_connection_domains_over_limit")
        .with_description(
            "Domains of a discovered launcher socket beyond libvirt.discover.max_domains_per_socket, not exported (0 for a connection within it or without such a bound)",
        )
        .with_callback(move |obs| {
            stats();
            let conns = store.connections();
            let points = points.lock().unwrap_or_else(|p| p.into_inner());
            for (id, m) in conns.iter() {
                obs.observe(
                    points.over_connection_limit(*id) as i64,
                    &connection_attribute(m),
                );
            }
        })
        .build();
}
