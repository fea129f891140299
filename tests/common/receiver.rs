//! A real OTLP metrics receiver for tests, in-process: gRPC (tonic, `MetricsService`) and HTTP/protobuf
//! (axum, `POST /v1/metrics`, identity or gzip bodies) on random loopback ports.
//!
//! Every request is decoded and recorded with its arrival [`Instant`] and transport. Tests then ask
//! questions about what a collector would have seen, and how fast:
//!
//! - [`Receiver::latest_series`]: the *current series set* of a metric. The agent's gauge reports only
//!   the domains in its inventory, and with zero domains the metric is absent from the request while the
//!   self-metrics (`virt_hypervisor_agent_*`) are still sent. So the current set is the metric's points
//!   in the latest request that carries any metric at all (empty when the metric is absent from it).
//! - [`Receiver::wait_for_series`] / [`Receiver::wait_for_request`]: wait (polling every 5 ms on a
//!   condition variable, never a bare sleep) for the first request that arrived after `since` and
//!   satisfies a predicate; the returned [`Observation::latency`] is that request's arrival minus
//!   `since`, so it measures the agent, not the polling.
//! - [`Receiver::stop`] / [`Receiver::restart`]: a collector outage on the same ports (all connections
//!   are dropped, the ports refuse), and [`Receiver::set_failing`] / [`Receiver::set_delay`] for a
//!   collector that answers with errors or slowly (requests are still recorded on arrival).
//!
//! Runtime: the servers run on their own current-thread tokio runtime on a dedicated std thread, so the
//! receiver works the same from a plain `#[test]` and from `#[tokio::test(flavor = "multi_thread")]`.
//! Its methods are synchronous; the `wait_*` ones block the calling thread (in an async test that is one
//! worker thread: use the multi-thread flavor, or call them in `spawn_blocking`). Stopping shuts that
//! runtime down, which closes the listeners and every open connection at once.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, DataPointFlags, NumberDataPoint,
};
use prost::Message;

/// Largest request accepted (a 20,000-VM export is a few MiB).
const MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;
/// Upper bound between two looks at the recorded requests while waiting.
const POLL: Duration = Duration::from_millis(5);

/// Which OTLP transport carried a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Grpc,
    Http,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, not `write_str`: honours width and alignment in tables.
        f.pad(match self {
            Transport::Grpc => "grpc",
            Transport::Http => "http/protobuf",
        })
    }
}

/// One export request as received.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// Position in arrival order, from 0.
    pub seq: usize,
    /// When the request was decoded (before any configured delay or failure answer).
    pub at: Instant,
    pub transport: Transport,
    /// The body (HTTP) or message (gRPC) was gzip-compressed.
    pub gzip: bool,
    pub request: ExportMetricsServiceRequest,
}

/// A number data point value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    Int(i64),
    Double(f64),
}

impl Value {
    pub fn as_f64(self) -> f64 {
        match self {
            Value::Int(v) => v as f64,
            Value::Double(v) => v,
        }
    }
}

/// One data point of a gauge or sum: its attributes, its value, and the attributes of the resource
/// that sent it.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub attributes: BTreeMap<String, String>,
    pub value: Value,
    pub resource: BTreeMap<String, String>,
    /// Instrumentation scope name.
    pub scope: String,
}

impl Series {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }

    pub fn resource_attr(&self, key: &str) -> Option<&str> {
        self.resource.get(key).map(String::as_str)
    }
}

impl fmt::Display for Series {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{")?;
        for (i, (k, v)) in self.attributes.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{k}={v:?}")?;
        }
        match self.value {
            Value::Int(v) => write!(f, "}} {v}"),
            Value::Double(v) => write!(f, "}} {v}"),
        }
    }
}

/// One line per series, sorted, for assertion messages.
pub fn describe(series: &[Series]) -> String {
    if series.is_empty() {
        return "(no series)".to_string();
    }
    let mut lines: Vec<String> = series.iter().map(|s| format!("  {s}")).collect();
    lines.sort();
    lines.join("\n")
}

impl Recorded {
    /// The request carries at least one metric (of any kind).
    pub fn has_metrics(&self) -> bool {
        self.request
            .resource_metrics
            .iter()
            .flat_map(|rm| &rm.scope_metrics)
            .any(|sm| !sm.metrics.is_empty())
    }

    pub fn metric_names(&self) -> BTreeSet<String> {
        self.request
            .resource_metrics
            .iter()
            .flat_map(|rm| &rm.scope_metrics)
            .flat_map(|sm| &sm.metrics)
            .map(|m| m.name.clone())
            .collect()
    }

    /// The metric is present in this request (possibly a kind without number points).
    pub fn has_metric(&self, name: &str) -> bool {
        self.request
            .resource_metrics
            .iter()
            .flat_map(|rm| &rm.scope_metrics)
            .flat_map(|sm| &sm.metrics)
            .any(|m| m.name == name)
    }

    /// The live number points (gauge or sum) of `name` in this request: what a Prometheus behind
    /// it would hold. A point flagged `NO_RECORDED_VALUE` is a staleness marker, the end of its
    /// series, and is not among them (see [`Recorded::stale_series`]). Empty when the metric is
    /// absent.
    pub fn series(&self, name: &str) -> Vec<Series> {
        self.points(name, false)
    }

    /// The staleness markers (points flagged `NO_RECORDED_VALUE`) of `name` in this request.
    pub fn stale_series(&self, name: &str) -> Vec<Series> {
        self.points(name, true)
    }

    fn points(&self, name: &str, stale: bool) -> Vec<Series> {
        points(&self.request, name, stale)
    }

    /// Resource attributes of every `ResourceMetrics` in the request.
    pub fn resources(&self) -> Vec<BTreeMap<String, String>> {
        self.request
            .resource_metrics
            .iter()
            .map(|rm| {
                rm.resource
                    .as_ref()
                    .map(|r| attributes(&r.attributes))
                    .unwrap_or_default()
            })
            .collect()
    }

    /// The node that sent this request: the resource attribute `k8s.node.name` (of the first
    /// resource that has one).
    pub fn node(&self) -> Option<String> {
        self.resources()
            .into_iter()
            .find_map(|res| res.get("k8s.node.name").cloned())
    }

    /// The request carries metrics and was sent by `node` (one agent's current state).
    pub fn has_metrics_from(&self, node: &str) -> bool {
        self.has_metrics() && self.node().as_deref() == Some(node)
    }
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), any_value_string(kv.value.as_ref())))
        .collect()
}

fn any_value_string(v: Option<&AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// The live number points of `name` in `request` (see [`Recorded::series`]).
pub fn live_series(request: &ExportMetricsServiceRequest, name: &str) -> Vec<Series> {
    points(request, name, false)
}

fn points(request: &ExportMetricsServiceRequest, name: &str, stale: bool) -> Vec<Series> {
    let mut out = Vec::new();
    for rm in &request.resource_metrics {
        let resource = rm
            .resource
            .as_ref()
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        for sm in &rm.scope_metrics {
            let scope = sm
                .scope
                .as_ref()
                .map(|s| s.name.clone())
                .unwrap_or_default();
            for m in sm.metrics.iter().filter(|m| m.name == name) {
                let points: &[NumberDataPoint] = match &m.data {
                    Some(metric::Data::Gauge(g)) => &g.data_points,
                    Some(metric::Data::Sum(s)) => &s.data_points,
                    _ => &[],
                };
                let flagged = |p: &&NumberDataPoint| {
                    (p.flags & DataPointFlags::NoRecordedValueMask as u32 != 0) == stale
                };
                out.extend(points.iter().filter(flagged).map(|p| Series {
                    attributes: attributes(&p.attributes),
                    value: match p.value {
                        Some(number_data_point::Value::AsInt(v)) => Value::Int(v),
                        Some(number_data_point::Value::AsDouble(v)) => Value::Double(v),
                        None => Value::Double(f64::NAN),
                    },
                    resource: resource.clone(),
                    scope: scope.clone(),
                }));
            }
        }
    }
    out
}

/// What a `wait_*` call found.
#[derive(Clone, Debug)]
pub struct Observation {
    /// The first request (arrival order) after `since` that satisfied the predicate.
    pub request: Recorded,
    /// `request.at - since`: how long the change took to reach the receiver.
    pub latency: Duration,
    /// For [`Receiver::wait_for_series`]: the metric's series in that request.
    pub series: Vec<Series>,
}

#[derive(Debug, Default)]
struct Log {
    requests: Vec<Recorded>,
    /// Requests dropped by [`Receiver::clear`] (sequence numbers go on from there).
    cleared: usize,
    /// Bodies that could not be decoded, with the reason.
    rejected: Vec<String>,
}

#[derive(Debug, Default)]
struct Shared {
    log: Mutex<Log>,
    arrived: Condvar,
    failing: AtomicBool,
    delay_ms: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Log> {
        // A panicking test thread must not make every later look at the log panic too.
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, transport: Transport, gzip: bool, request: ExportMetricsServiceRequest) {
        let mut log = self.lock();
        let seq = log.cleared + log.requests.len();
        log.requests.push(Recorded {
            seq,
            at: Instant::now(),
            transport,
            gzip,
            request,
        });
        drop(log);
        self.arrived.notify_all();
    }

    fn reject(&self, why: String) {
        self.lock().rejected.push(why);
        self.arrived.notify_all();
    }

    /// The configured answer delay, then whether to fail.
    async fn answer_policy(&self) -> bool {
        let delay = self.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        self.failing.load(Ordering::Relaxed)
    }
}

struct GrpcSink(Arc<Shared>);

#[tonic::async_trait]
impl MetricsService for GrpcSink {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let gzip = request
            .metadata()
            .get("grpc-encoding")
            .is_some_and(|v| v.as_bytes() == b"gzip");
        self.0.record(Transport::Grpc, gzip, request.into_inner());
        if self.0.answer_policy().await {
            return Err(tonic::Status::unavailable("test receiver set to fail"));
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

async fn http_export(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.starts_with("application/x-protobuf") {
        shared.reject(format!("unsupported content-type {content_type:?}"));
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "only application/x-protobuf",
        )
            .into_response();
    }
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity")
        .to_ascii_lowercase();
    let gzip = encoding == "gzip";
    let raw = match encoding.as_str() {
        "gzip" => {
            let mut out = Vec::new();
            if let Err(e) = flate2::read::GzDecoder::new(&body[..]).read_to_end(&mut out) {
                shared.reject(format!("bad gzip body: {e}"));
                return (StatusCode::BAD_REQUEST, "bad gzip body").into_response();
            }
            Bytes::from(out)
        }
        "identity" | "" => body,
        other => {
            shared.reject(format!("unsupported content-encoding {other:?}"));
            return (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported encoding").into_response();
        }
    };
    let request = match ExportMetricsServiceRequest::decode(raw) {
        Ok(r) => r,
        Err(e) => {
            shared.reject(format!("undecodable protobuf: {e}"));
            return (StatusCode::BAD_REQUEST, "undecodable protobuf").into_response();
        }
    };
    shared.record(Transport::Http, gzip, request);
    if shared.answer_policy().await {
        return (StatusCode::SERVICE_UNAVAILABLE, "test receiver set to fail").into_response();
    }
    (
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        ExportMetricsServiceResponse::default().encode_to_vec(),
    )
        .into_response()
}

/// The servers' thread while running.
struct Running {
    shutdown: tokio::sync::oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

/// The in-process OTLP receiver. Dropping it stops the servers.
pub struct Receiver {
    shared: Arc<Shared>,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    running: Option<Running>,
}

impl fmt::Debug for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver")
            .field("grpc", &self.grpc_addr)
            .field("http", &self.http_addr)
            .field("running", &self.running.is_some())
            .field("requests", &self.request_count())
            .finish()
    }
}

impl Receiver {
    /// Start both servers on random ports of 127.0.0.1.
    pub fn start() -> Result<Self> {
        let grpc = TcpListener::bind("127.0.0.1:0").context("bind gRPC listener")?;
        let http = TcpListener::bind("127.0.0.1:0").context("bind HTTP listener")?;
        let mut receiver = Receiver {
            shared: Arc::default(),
            grpc_addr: grpc.local_addr()?,
            http_addr: http.local_addr()?,
            running: None,
        };
        receiver.running = Some(serve(receiver.shared.clone(), grpc, http)?);
        Ok(receiver)
    }

    /// `http://127.0.0.1:PORT` for an OTLP gRPC exporter.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// `http://127.0.0.1:PORT/v1/metrics` for an OTLP HTTP exporter (the full per-signal URL).
    pub fn http_endpoint(&self) -> String {
        format!("http://{}/v1/metrics", self.http_addr)
    }

    pub fn endpoint(&self, transport: Transport) -> String {
        match transport {
            Transport::Grpc => self.grpc_endpoint(),
            Transport::Http => self.http_endpoint(),
        }
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Simulate a collector outage: close the listeners and every connection. Recorded requests are
    /// kept. Idempotent.
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.shutdown.send(());
            if running.thread.join().is_err() {
                eprintln!("test receiver: server thread panicked");
            }
        }
    }

    /// Serve again on the same ports after [`Receiver::stop`]. Fails if another process took a port.
    pub fn restart(&mut self) -> Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        let grpc = TcpListener::bind(self.grpc_addr)
            .with_context(|| format!("rebind gRPC listener on {}", self.grpc_addr))?;
        let http = TcpListener::bind(self.http_addr)
            .with_context(|| format!("rebind HTTP listener on {}", self.http_addr))?;
        self.running = Some(serve(self.shared.clone(), grpc, http)?);
        Ok(())
    }

    /// Answer every request with an error (gRPC UNAVAILABLE, HTTP 503) while `true`; requests are
    /// still recorded.
    pub fn set_failing(&self, failing: bool) {
        self.shared.failing.store(failing, Ordering::Relaxed);
    }

    /// Hold every answer for `delay` (a slow collector); requests are recorded on arrival.
    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.shared.delay_ms.store(ms, Ordering::Relaxed);
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().requests.clone()
    }

    pub fn request_count(&self) -> usize {
        self.shared.lock().requests.len()
    }

    /// Requests that arrived at or after `since`.
    pub fn requests_since(&self, since: Instant) -> Vec<Recorded> {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| r.at >= since)
            .cloned()
            .collect()
    }

    /// Forget the requests recorded so far (keeps memory flat over a long benchmark); sequence
    /// numbers go on.
    pub fn clear(&self) {
        drop(self.take());
    }

    /// The requests recorded so far, forgotten here at once (see [`Receiver::clear`]).
    pub fn take(&self) -> Vec<Recorded> {
        let mut log = self.shared.lock();
        log.cleared += log.requests.len();
        std::mem::take(&mut log.requests)
    }

    /// Bodies the HTTP server could not decode (wrong content type, bad gzip, bad protobuf).
    pub fn rejected(&self) -> Vec<String> {
        self.shared.lock().rejected.clone()
    }

    /// The latest request that carries any metric.
    pub fn latest_with_metrics(&self) -> Option<Recorded> {
        self.shared
            .lock()
            .requests
            .iter()
            .rev()
            .find(|r| r.has_metrics())
            .cloned()
    }

    /// The current series set of `metric` (see the module note); `None` before any request with
    /// metrics arrived.
    pub fn latest_series(&self, metric: &str) -> Option<Vec<Series>> {
        self.shared
            .lock()
            .requests
            .iter()
            .rev()
            .find(|r| r.has_metrics())
            .map(|r| r.series(metric))
    }

    /// Wait up to `timeout` for the first request that arrived at or after `since` and satisfies
    /// `pred` (requests are looked at in arrival order, each once).
    pub fn wait_for_request<F>(
        &self,
        since: Instant,
        timeout: Duration,
        mut pred: F,
    ) -> Result<Observation>
    where
        F: FnMut(&Recorded) -> bool,
    {
        let deadline = Instant::now() + timeout;
        // By sequence number, not index: another thread may `clear` meanwhile.
        let mut next = 0;
        let mut log = self.shared.lock();
        loop {
            next = next.max(log.cleared);
            while next < log.cleared + log.requests.len() {
                let r = &log.requests[next - log.cleared];
                next += 1;
                if r.at >= since && pred(r) {
                    return Ok(Observation {
                        request: r.clone(),
                        latency: r.at.saturating_duration_since(since),
                        series: Vec::new(),
                    });
                }
            }
            let now = Instant::now();
            if now >= deadline {
                let after: Vec<&Recorded> = log.requests.iter().filter(|r| r.at >= since).collect();
                bail!(
                    "no matching OTLP request within {timeout:?}: {} request(s) arrived in that window \
                     ({} in all), last: {}",
                    after.len(),
                    log.requests.len(),
                    after
                        .last()
                        .map(|r| format!(
                            "#{} via {} with metrics {:?}",
                            r.seq,
                            r.transport,
                            r.metric_names()
                        ))
                        .unwrap_or_else(|| "none".to_string())
                );
            }
            log = self
                .shared
                .arrived
                .wait_timeout(log, POLL.min(deadline - now))
                .map(|(guard, _)| guard)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Wait up to `timeout` for the first request after `since` that carries metrics and whose series
    /// set of `metric` (empty when absent) satisfies `pred`.
    pub fn wait_for_series<F>(
        &self,
        since: Instant,
        timeout: Duration,
        metric: &str,
        mut pred: F,
    ) -> Result<Observation>
    where
        F: FnMut(&[Series]) -> bool,
    {
        let mut found = Vec::new();
        let result = self.wait_for_request(since, timeout, |r| {
            if !r.has_metrics() {
                return false;
            }
            let series = r.series(metric);
            if pred(&series) {
                found = series;
                true
            } else {
                false
            }
        });
        match result {
            Ok(mut obs) => {
                obs.series = found;
                Ok(obs)
            }
            Err(e) => Err(anyhow!(
                "{e}\ncurrent series of {metric}:\n{}",
                self.latest_series(metric)
                    .map(|s| describe(&s))
                    .unwrap_or_else(|| "(no request with metrics yet)".to_string())
            )),
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Run both servers on a fresh current-thread runtime on its own thread.
fn serve(shared: Arc<Shared>, grpc: TcpListener, http: TcpListener) -> Result<Running> {
    grpc.set_nonblocking(true)?;
    http.set_nonblocking(true)?;
    let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("build receiver runtime")?;
    let thread = std::thread::Builder::new()
        .name("otlp-test-receiver".into())
        .spawn(move || {
            runtime.block_on(async move {
                let grpc = match tokio::net::TcpListener::from_std(grpc) {
                    Ok(l) => l,
                    Err(e) => return eprintln!("test receiver: gRPC listener: {e}"),
                };
                let http = match tokio::net::TcpListener::from_std(http) {
                    Ok(l) => l,
                    Err(e) => return eprintln!("test receiver: HTTP listener: {e}"),
                };
                let service = MetricsServiceServer::new(GrpcSink(shared.clone()))
                    .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
                    .max_decoding_message_size(MAX_REQUEST_BYTES);
                let grpc_server = tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(tonic::transport::server::TcpIncoming::from(grpc));
                let app = Router::new()
                    .route("/v1/metrics", post(http_export))
                    .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
                    .with_state(shared);
                let http_server = axum::serve(http, app);
                tokio::select! {
                    r = grpc_server => eprintln!("test receiver: gRPC server ended: {r:?}"),
                    r = http_server => eprintln!("test receiver: HTTP server ended: {r:?}"),
                    _ = stop => {}
                }
            });
            // Dropping the runtime here cancels the connection tasks: every socket closes.
            runtime.shutdown_timeout(Duration::from_secs(1));
        })
        .context("spawn receiver thread")?;
    Ok(Running { shutdown, thread })
}
