//! The test OTLP receiver (tests/common/receiver.rs) against the real OpenTelemetry SDK exporter, over
//! gRPC and HTTP/protobuf, plain and gzip: what the SDK sends decodes with its attributes and resource,
//! the "current series set" semantics hold, and a stopped receiver can be restarted on the same ports.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::receiver::{describe, Receiver, Series, Transport, Value};
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{
    Compression, MetricExporter, Protocol, WithExportConfig, WithHttpConfig, WithTonicConfig,
};
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::Resource;
use virt_hypervisor_agent::export::SharedReader;

const GAUGE: &str = "selftest_hypervisor_info";
const SELF_COUNTER: &str = "virt_hypervisor_agent_selftest_total";
const WAIT: Duration = Duration::from_secs(10);

/// The points the gauge callback reports: (name, hypervisor_type).
type Points = Arc<Mutex<Vec<(String, String)>>>;

/// A meter provider with a gauge and a counter, and the exporter its collections go to, exported
/// the way the agent does it: collect through a manual reader, then await the exporter.
struct Selftest {
    provider: SdkMeterProvider,
    reader: SharedReader,
    exporter: MetricExporter,
}

impl Selftest {
    async fn flush(&self) -> Result<(), String> {
        let mut rm = ResourceMetrics::default();
        self.reader.collect(&mut rm).map_err(|e| e.to_string())?;
        self.exporter.export(&rm).await.map_err(|e| e.to_string())
    }
}

/// A meter provider exporting to `rx` over `transport`, with a gauge fed from `points` and a
/// self-metric counter. Must be called inside a multi-thread tokio runtime (both exporters run
/// their connections on it).
fn provider(rx: &Receiver, transport: Transport, gzip: bool, points: Points) -> Selftest {
    // The package links reqwest's rustls without a built-in provider: install ring, as the agent does.
    virt_hypervisor_agent::export::otlp::install_crypto_provider();
    let timeout = Duration::from_secs(3);
    let exporter = match transport {
        Transport::Grpc => {
            let mut builder = MetricExporter::builder()
                .with_tonic()
                .with_endpoint(rx.grpc_endpoint())
                .with_timeout(timeout);
            if gzip {
                builder = builder.with_compression(Compression::Gzip);
            }
            builder.build()
        }
        Transport::Http => {
            let mut builder = MetricExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(rx.http_endpoint())
                .with_timeout(timeout);
            if gzip {
                builder = builder.with_compression(Compression::Gzip);
            }
            builder.build()
        }
    }
    .expect("build OTLP metric exporter");
    // Only explicit flushes export.
    let reader = SharedReader::new(exporter.temporality());
    let provider = SdkMeterProvider::builder()
        .with_reader(reader.clone())
        .with_resource(
            Resource::builder_empty()
                .with_service_name("receiver-selftest")
                .with_attribute(KeyValue::new("host.name", "selftest-host"))
                .build(),
        )
        .build();
    let meter = provider.meter("selftest");
    meter
        .i64_observable_gauge(GAUGE)
        .with_description("test gauge")
        .with_callback(move |observer| {
            let points = points.lock().expect("points lock").clone();
            for (name, hypervisor) in points {
                observer.observe(
                    1,
                    &[
                        KeyValue::new("name", name),
                        KeyValue::new("hypervisor_type", hypervisor),
                    ],
                );
            }
        })
        .build();
    meter.u64_counter(SELF_COUNTER).build().add(1, &[]);
    Selftest {
        provider,
        reader,
        exporter,
    }
}

fn points(list: &[(&str, &str)]) -> Points {
    Arc::new(Mutex::new(
        list.iter()
            .map(|(n, h)| (n.to_string(), h.to_string()))
            .collect(),
    ))
}

fn find<'a>(series: &'a [Series], name: &str) -> Option<&'a Series> {
    series.iter().find(|s| s.attr("name") == Some(name))
}

async fn gauge_roundtrip(transport: Transport, gzip: bool) {
    let rx = Receiver::start().expect("start receiver");
    let pts = points(&[("vm-a", "kvm"), ("vm-b", "qemu-tcg")]);
    let provider = provider(&rx, transport, gzip, pts);
    let since = Instant::now();
    provider.flush().await.expect("flush to the receiver");

    let obs = rx
        .wait_for_series(since, WAIT, GAUGE, |s| s.len() == 2)
        .expect("gauge arrives");
    assert_eq!(obs.request.transport, transport);
    assert_eq!(obs.request.gzip, gzip, "compression seen by the receiver");
    let a = find(&obs.series, "vm-a").expect("series vm-a");
    assert_eq!(a.attr("hypervisor_type"), Some("kvm"));
    assert_eq!(a.value, Value::Int(1));
    assert_eq!(a.scope, "selftest");
    assert_eq!(a.resource_attr("service.name"), Some("receiver-selftest"));
    assert_eq!(a.resource_attr("host.name"), Some("selftest-host"));
    let b = find(&obs.series, "vm-b").expect("series vm-b");
    assert_eq!(b.attr("hypervisor_type"), Some("qemu-tcg"));
    assert!(obs.request.metric_names().contains(SELF_COUNTER));
    assert_eq!(
        rx.latest_series(GAUGE).expect("a request with metrics"),
        obs.series
    );
    assert!(rx.rejected().is_empty(), "rejected: {:?}", rx.rejected());
    provider.provider.shutdown().ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_gauge_decodes_with_attributes_and_resource() {
    gauge_roundtrip(Transport::Grpc, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_gzip_gauge_decodes() {
    gauge_roundtrip(Transport::Grpc, true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn http_gauge_decodes_with_attributes_and_resource() {
    gauge_roundtrip(Transport::Http, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn http_gzip_gauge_decodes() {
    gauge_roundtrip(Transport::Http, true).await;
}

/// With no points the gauge vanishes from the request while the self-metric is still sent: the
/// current series set is then empty (not the previous request's points).
#[tokio::test(flavor = "multi_thread")]
async fn absent_gauge_means_empty_current_set() {
    let rx = Receiver::start().expect("start receiver");
    let pts = points(&[("vm-a", "kvm")]);
    let provider = provider(&rx, Transport::Http, false, pts.clone());
    assert_eq!(rx.latest_series(GAUGE), None, "nothing received yet");

    let since = Instant::now();
    provider.flush().await.expect("first flush");
    rx.wait_for_series(since, WAIT, GAUGE, |s| s.len() == 1)
        .expect("first export with one series");

    pts.lock().expect("points lock").clear();
    let since = Instant::now();
    provider.flush().await.expect("second flush");
    let obs = rx
        .wait_for_series(since, WAIT, GAUGE, |s| s.is_empty())
        .expect("an export without the gauge");
    assert!(
        !obs.request.has_metric(GAUGE),
        "gauge absent from the request"
    );
    assert!(
        obs.request.has_metric(SELF_COUNTER),
        "self-metric still sent"
    );
    assert_eq!(rx.latest_series(GAUGE), Some(Vec::new()));
    provider.provider.shutdown().ok();
}

/// A collector outage on the same ports: exports fail while stopped and arrive again after restart.
async fn stop_and_restart(transport: Transport) {
    let mut rx = Receiver::start().expect("start receiver");
    let endpoint = rx.endpoint(transport);
    let pts = points(&[("vm-a", "kvm")]);
    let provider = provider(&rx, transport, false, pts);
    provider.flush().await.expect("flush while up");
    assert_eq!(rx.request_count(), 1);

    rx.stop();
    assert!(!rx.is_running());
    let result = provider.flush().await;
    assert!(result.is_err(), "flush to a stopped receiver must fail");
    assert_eq!(rx.request_count(), 1, "nothing received while stopped");

    rx.restart().expect("restart on the same ports");
    assert_eq!(rx.endpoint(transport), endpoint);
    let since = Instant::now();
    provider.flush().await.expect("flush after restart");
    let obs = rx
        .wait_for_series(since, WAIT, GAUGE, |s| find(s, "vm-a").is_some())
        .unwrap_or_else(|e| panic!("export after restart: {e:#}"));
    assert_eq!(obs.request.seq, 1, "{}", describe(&obs.series));
    provider.provider.shutdown().ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_receiver_restarts_on_same_port() {
    stop_and_restart(Transport::Grpc).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn http_receiver_restarts_on_same_port() {
    stop_and_restart(Transport::Http).await;
}

/// A failing collector still records what arrived, and the SDK sees the failure.
#[tokio::test(flavor = "multi_thread")]
async fn failing_receiver_records_and_answers_error() {
    let rx = Receiver::start().expect("start receiver");
    let provider = provider(&rx, Transport::Http, false, points(&[("vm-a", "kvm")]));
    rx.set_failing(true);
    assert!(
        provider.flush().await.is_err(),
        "an error answer fails the flush"
    );
    assert!(rx.request_count() >= 1, "the request was recorded");
    rx.set_failing(false);
    provider
        .flush()
        .await
        .expect("flush once the receiver answers OK");
    provider.provider.shutdown().ok();
}
