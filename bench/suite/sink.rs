//! A minimal real OTLP/gRPC metrics receiver (tonic `MetricsService`) for the benchmarks.
//!
//! Unlike the test receiver it keeps only what the benchmarks need per request: arrival time,
//! protobuf size, and the identities (`namespace/name`, or `name`) of the
//! `kubevirt_vmi_hypervisor_info` points. It runs on its own current-thread runtime and thread,
//! in the benchmark process, so its CPU is never counted as the agent's.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::metrics::v1::metric;
use prost::Message;

pub const INFO_METRIC: &str = "kubevirt_vmi_hypervisor_info";

/// One request as received.
#[derive(Clone, Debug)]
pub struct Received {
    pub at: Instant,
    /// Protobuf size of the request (what crossed the wire, uncompressed).
    pub bytes: usize,
    /// Data points of the info metric.
    pub info_points: usize,
    /// `namespace/name` (or `name`) of every info point.
    pub names: Arc<BTreeSet<String>>,
}

#[derive(Default)]
struct Shared {
    log: Mutex<Vec<Received>>,
    arrived: Condvar,
}

struct Svc(Arc<Shared>);

/// Summarise a request.
pub fn summarise(req: &ExportMetricsServiceRequest) -> (usize, BTreeSet<String>) {
    let mut names = BTreeSet::new();
    let mut points = 0;
    for rm in &req.resource_metrics {
        for sm in &rm.scope_metrics {
            for m in sm.metrics.iter().filter(|m| m.name == INFO_METRIC) {
                let dps = match &m.data {
                    Some(metric::Data::Gauge(g)) => &g.data_points,
                    Some(metric::Data::Sum(s)) => &s.data_points,
                    _ => continue,
                };
                for p in dps {
                    points += 1;
                    let attr = |k: &str| {
                        p.attributes.iter().find(|kv| kv.key == k).and_then(|kv| {
                            match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                                Some(any_value::Value::StringValue(s)) => Some(s.clone()),
                                _ => None,
                            }
                        })
                    };
                    let name = attr("name").unwrap_or_default();
                    names.insert(match attr("namespace") {
                        Some(ns) => format!("{ns}/{name}"),
                        None => name,
                    });
                }
            }
        }
    }
    (points, names)
}

#[tonic::async_trait]
impl MetricsService for Svc {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let at = Instant::now();
        let req = request.into_inner();
        let bytes = req.encoded_len();
        let (info_points, names) = summarise(&req);
        self.0
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Received {
                at,
                bytes,
                info_points,
                names: Arc::new(names),
            });
        self.0.arrived.notify_all();
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// The running receiver; dropping it stops the server.
pub struct Sink {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Sink {
    /// Listen on `127.0.0.1:port` (0: any free port).
    pub fn start(port: u16) -> Result<Sink> {
        let listener =
            std::net::TcpListener::bind(("127.0.0.1", port)).context("bind the OTLP sink")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("sink runtime")?;
        let svc = Svc(Arc::clone(&shared));
        let thread = std::thread::Builder::new()
            .name("otlp-sink".into())
            .spawn(move || {
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => return eprintln!("sink: {e}"),
                    };
                    let server = tonic::transport::Server::builder()
                        .add_service(
                            MetricsServiceServer::new(svc)
                                .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
                                .max_decoding_message_size(256 * 1024 * 1024),
                        )
                        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
                    tokio::select! {
                        r = server => eprintln!("sink: server ended: {r:?}"),
                        _ = stopped => {}
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .context("spawn sink thread")?;
        Ok(Sink {
            shared,
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received at or after `since`.
    pub fn since(&self, since: Instant) -> Vec<Received> {
        self.shared
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|r| r.at >= since)
            .cloned()
            .collect()
    }

    /// The first request at or after `since` that satisfies `pred`, waiting up to `timeout`.
    pub fn wait_for(
        &self,
        since: Instant,
        timeout: Duration,
        mut pred: impl FnMut(&Received) -> bool,
    ) -> Option<Received> {
        let deadline = Instant::now() + timeout;
        let mut log = self.shared.log.lock().unwrap_or_else(|p| p.into_inner());
        let mut checked = 0;
        loop {
            for r in log.iter().skip(checked) {
                if r.at >= since && pred(r) {
                    return Some(r.clone());
                }
            }
            checked = log.len();
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            log = self
                .shared
                .arrived
                .wait_timeout(log, (deadline - now).min(Duration::from_millis(50)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Forget recorded requests (keeps memory flat over long runs).
    pub fn clear(&self) {
        self.shared
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `sink` mode: a receiver in its own process (for clean RSS figures of another process). Prints
/// `listening <endpoint>`, then `req <bytes> <info_points>` per request, until stdin closes.
pub fn run_child() -> Result<()> {
    use std::io::{BufRead, Write};
    let sink = Sink::start(0)?;
    println!("listening {}", sink.endpoint());
    std::io::stdout().flush()?;
    let shared = Arc::clone(&sink.shared);
    std::thread::spawn(move || {
        let mut printed = 0;
        loop {
            let log = shared.log.lock().unwrap_or_else(|p| p.into_inner());
            let log = shared
                .arrived
                .wait_timeout(log, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            let new: Vec<(usize, usize)> = log
                .iter()
                .skip(printed)
                .map(|r| (r.bytes, r.info_points))
                .collect();
            printed = log.len();
            drop(log);
            let mut out = std::io::stdout().lock();
            for (b, p) in new {
                let _ = writeln!(out, "req {b} {p}");
            }
            let _ = out.flush();
        }
    });
    // Until the parent closes our stdin.
    for line in std::io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
    }
    drop(sink);
    Ok(())
}
