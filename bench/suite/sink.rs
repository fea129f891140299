//! The benchmarks' OTLP receiver: the integration tests' receiver (`tests/common/receiver.rs`,
//! a real tonic `MetricsService` on its own thread and current-thread runtime, so its CPU is never
//! counted as the agent's), seen through a summary of each request: arrival time, protobuf size,
//! and the identities (`namespace/name`, or `name`) of the live `kubevirt_vmi_hypervisor_info`
//! points. A point flagged `NO_RECORDED_VALUE` is a staleness marker, the end of its series: it
//! is not among them, as it is not in Prometheus.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use prost::Message;

use crate::common::receiver::{live_series, Receiver, Recorded};

pub const INFO_METRIC: &str = "kubevirt_vmi_hypervisor_info";

/// One request as received.
#[derive(Clone, Debug)]
pub struct Received {
    pub at: Instant,
    /// Protobuf size of the request (what crossed the wire, uncompressed).
    pub bytes: usize,
    /// Live data points of the info metric.
    pub info_points: usize,
    /// `namespace/name` (or `name`) of every live info point.
    pub names: Arc<BTreeSet<String>>,
}

/// The live info points of a request: their count and identities.
pub fn summarise(req: &ExportMetricsServiceRequest) -> (usize, BTreeSet<String>) {
    let series = live_series(req, INFO_METRIC);
    let names = series
        .iter()
        .map(|s| {
            let name = s.attr("name").unwrap_or_default();
            match s.attr("namespace") {
                Some(ns) => format!("{ns}/{name}"),
                None => name.to_string(),
            }
        })
        .collect();
    (series.len(), names)
}

fn received(r: &Recorded) -> Received {
    let (info_points, names) = summarise(&r.request);
    Received {
        at: r.at,
        bytes: r.request.encoded_len(),
        info_points,
        names: Arc::new(names),
    }
}

/// The running receiver; dropping it stops the server.
pub struct Sink(Receiver);

impl Sink {
    /// Listen on a free port of 127.0.0.1.
    pub fn start() -> Result<Sink> {
        Receiver::start().map(Sink)
    }

    /// The gRPC endpoint.
    pub fn endpoint(&self) -> String {
        self.0.grpc_endpoint()
    }

    /// Requests received at or after `since`.
    pub fn since(&self, since: Instant) -> Vec<Received> {
        self.0.requests_since(since).iter().map(received).collect()
    }

    /// The first request at or after `since` that satisfies `pred`, waiting up to `timeout`.
    pub fn wait_for(
        &self,
        since: Instant,
        timeout: Duration,
        mut pred: impl FnMut(&Received) -> bool,
    ) -> Option<Received> {
        let mut found = None;
        self.0
            .wait_for_request(since, timeout, |r| {
                let rec = received(r);
                let hit = pred(&rec);
                if hit {
                    found = Some(rec);
                }
                hit
            })
            .ok()?;
        found
    }

    /// Forget recorded requests (keeps memory flat over long runs).
    pub fn clear(&self) {
        self.0.clear()
    }
}

/// `sink` mode: a receiver in its own process (for clean RSS figures of another process). Prints
/// `listening <endpoint>`, then `req <bytes> <info_points>` per request, until stdin closes.
pub fn run_child() -> Result<()> {
    use std::io::{BufRead, Write};
    let born = Instant::now();
    let sink = Arc::new(Sink::start()?);
    println!("listening {}", sink.endpoint());
    std::io::stdout().flush()?;
    let printer = Arc::clone(&sink);
    std::thread::spawn(move || loop {
        // Blocks until a request is there (every request arrives after `born`).
        if printer
            .0
            .wait_for_request(born, Duration::from_secs(3600), |_| true)
            .is_err()
        {
            continue;
        }
        let mut out = std::io::stdout().lock();
        for r in printer.0.take().iter().map(received) {
            let _ = writeln!(out, "req {} {}", r.bytes, r.info_points);
        }
        let _ = out.flush();
    });
    // Until the parent closes our stdin.
    for line in std::io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
    }
    Ok(())
}
