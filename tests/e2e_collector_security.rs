//! The collector takes only what it should: the production profile `otel/collector.yaml`, run
//! unchanged by the real collector (otel/builder-config.yaml) with certificates made by `openssl`.
//!
//! - An OTLP client without a client certificate is refused by the receivers (gRPC and HTTP), and
//!   so is plaintext; the same requests with the certificate are accepted (the control).
//! - Behind it, Prometheus 2.42 with its remote-write receiver behind TLS and basic auth: the agent
//!   (test driver `test:///default`, exporting with its client certificate) reaches PromQL, while a
//!   foreign metric family and a forged info series from another `service.name`, sent with a valid
//!   certificate in the same request as an allowed one, never do: every metric name in Prometheus is
//!   the agent's or `target_info`. The control: the same request through the same file with the
//!   `vhafilter` processor taken out of the pipeline does put the foreign family into PromQL.
//! - The development profile `otel/collector-dev.yaml` is the production one minus its transport
//!   security (no drift between the two; the other end-to-end tests run the development one).
//!
//! Needs the collector (`$VHA_OTELCOL_BIN` or scripts/build-collector.sh), Debian's Prometheus 2.42,
//! `openssl`, `curl` and `python3`; no libvirtd. Skips with a printed reason when one is missing,
//! unless `VHA_E2E_REQUIRED=1`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use yaml_rust2::{Yaml, YamlLoader};

use common::libvirt::{e2e_required, unique_uid};
use common::pipeline::{
    collector_binary, describe, Collector, Flavor, Pki, Prometheus, WebSecurity,
};
use common::Agent;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const JOB: &str = "virt-hypervisor-agent";
const TIMEOUT: Duration = Duration::from_secs(30);

/// `true` when everything the end-to-end tests need is here; else a printed skip (or a panic under
/// `VHA_E2E_REQUIRED=1`).
fn require_tools(test: &str) -> bool {
    let mut missing = Vec::new();
    if !Path::new("/usr/bin/prometheus").exists() {
        missing.push("/usr/bin/prometheus (Debian's prometheus package)".to_string());
    }
    for tool in ["openssl", "curl", "python3"] {
        if Command::new(tool).arg("--version").output().is_err() {
            missing.push(tool.to_string());
        }
    }
    if missing.is_empty() {
        if let Err(e) = collector_binary() {
            missing.push(format!("the collector ({e:#})"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let reason = format!("missing: {}", missing.join(", "));
    if e2e_required() {
        panic!("{test}: VHA_E2E_REQUIRED=1 but {reason}");
    }
    eprintln!("SKIPPED {test}: {reason} (set VHA_E2E_REQUIRED=1 to make this a failure)");
    false
}

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
}

/// A gauge point of value 1 with these attributes.
fn gauge(name: &str, attrs: &[(&str, &str)]) -> Metric {
    Metric {
        name: name.into(),
        data: Some(metric::Data::Gauge(Gauge {
            data_points: vec![NumberDataPoint {
                attributes: attrs.iter().map(|(k, v)| kv(k, v)).collect(),
                time_unix_nano: now_nanos(),
                value: Some(number_data_point::Value::AsInt(1)),
                ..Default::default()
            }],
        })),
        ..Default::default()
    }
}

/// One resource (`service.name`, `service.instance.id`) with these metrics.
fn resource(service: &str, instance: &str, metrics: Vec<Metric>) -> ResourceMetrics {
    ResourceMetrics {
        resource: Some(Resource {
            attributes: vec![
                kv("service.name", service),
                kv("service.instance.id", instance),
            ],
            ..Default::default()
        }),
        scope_metrics: vec![ScopeMetrics {
            metrics,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// What a client holding a valid certificate might send, tagged `tag`: under the agent's
/// `service.name`, a foreign family (`node_cpu_seconds_total`) next to an allowed sentinel
/// (`virt_hypervisor_agent_probe`); and from another `service.name` ("evil", which would become
/// `job`), a forged `kubevirt_vmi_hypervisor_info`. All in one request: once the sentinel is in
/// PromQL, the rest would be too if it had been forwarded.
fn foreign_request(tag: &str) -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest {
        resource_metrics: vec![
            resource(
                JOB,
                &format!("probe-{tag}"),
                vec![
                    gauge("node_cpu_seconds_total", &[("tag", tag), ("cpu", "0")]),
                    gauge("virt_hypervisor_agent_probe", &[("tag", tag)]),
                ],
            ),
            resource(
                "evil",
                &format!("evil-{tag}"),
                vec![gauge(
                    "kubevirt_vmi_hypervisor_info",
                    &[("node", &format!("forged-{tag}")), ("name", "vm")],
                )],
            ),
        ],
    }
}

/// POST `req` to an OTLP/HTTP endpoint with `curl`; `client`: send `pki`'s client certificate.
/// `Ok(status)`, or `Err` when no HTTP exchange happened (e.g. the TLS handshake was refused).
fn post_otlp(
    url: &str,
    pki: &Pki,
    client: bool,
    req: &ExportMetricsServiceRequest,
) -> Result<u16, String> {
    let body = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
    std::fs::write(body.path(), req.encode_to_vec()).map_err(|e| e.to_string())?;
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
    ])
    .arg("--cacert")
    .arg(pki.path("ca.pem"))
    .args([
        "-H",
        "Content-Type: application/x-protobuf",
        "--data-binary",
    ])
    .arg(format!("@{}", body.path().display()));
    if client {
        cmd.arg("--cert")
            .arg(pki.path("client.pem"))
            .arg("--key")
            .arg(pki.path("client.key"));
    }
    let out = cmd.arg(url).output().map_err(|e| e.to_string())?;
    let code = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || code == "000" {
        return Err(format!(
            "curl exit {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    code.parse().map_err(|e| format!("status {code:?}: {e}"))
}

/// One gRPC export to `endpoint` (`https://…`, or `http://…` for plaintext); `client`: with `pki`'s
/// client certificate. `Err` with the reason when the collector did not accept it.
fn grpc_export(
    endpoint: &str,
    pki: &Pki,
    client: bool,
    req: ExportMetricsServiceRequest,
) -> Result<(), String> {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let read = |name: &str| std::fs::read(pki.path(name)).map_err(|e| e.to_string());
    let mut builder = Channel::from_shared(endpoint.to_string())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    if endpoint.starts_with("https://") {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca.pem")?))
            .domain_name("localhost");
        if client {
            tls = tls.identity(Identity::from_pem(read("client.pem")?, read("client.key")?));
        }
        builder = builder.tls_config(tls).map_err(|e| e.to_string())?;
    }
    rt.block_on(async move {
        let channel = builder.connect().await.map_err(|e| format!("{e:?}"))?;
        MetricsServiceClient::new(channel)
            .export(req)
            .await
            .map(|_| ())
            .map_err(|e| format!("{e:?}"))
    })
}

/// The collector's own metric `name` (summed over its label sets), from its telemetry endpoint.
fn collector_metric(col: &Collector, name: &str) -> f64 {
    let text = ureq::get(&col.telemetry_url())
        .call()
        .and_then(|mut r| r.body_mut().read_to_string())
        .unwrap_or_default();
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn unique(tag: &str) -> String {
    format!("{tag}-{}-{}", std::process::id(), unique_uid())
}

/// (a) TLS with client certificates on both receivers: no certificate, no data.
#[test]
fn production_receivers_refuse_clients_without_a_certificate() {
    let test = "production_receivers_refuse_clients_without_a_certificate";
    if !require_tools(test) {
        return;
    }
    let pki = Pki::new().expect("PKI");
    // Nothing is remote-written here: the receivers are under test.
    let mut col = Collector::start_production(
        &pki,
        "https://127.0.0.1:9/api/v1/write",
        &pki.path("ca.pem"),
        "Basic dW51c2VkOnVudXNlZA==",
    )
    .expect("start the production collector");
    let req = || foreign_request(&unique("refused"));
    let grpc = col.grpc_endpoint();
    let http = col.http_endpoint();

    let no_cert = grpc_export(&grpc, &pki, false, req());
    assert!(
        no_cert.is_err(),
        "gRPC without a client certificate was accepted"
    );
    println!(
        "gRPC, no client certificate: refused ({})",
        no_cert.unwrap_err()
    );
    let plain = grpc_export(&grpc.replace("https://", "http://"), &pki, false, req());
    assert!(plain.is_err(), "plaintext gRPC was accepted");
    println!("gRPC, plaintext: refused ({})", plain.unwrap_err());
    let no_cert = post_otlp(&http, &pki, false, &req());
    assert!(
        !matches!(no_cert, Ok(200)),
        "OTLP/HTTP without a client certificate was accepted"
    );
    println!("HTTP, no client certificate: refused ({no_cert:?})");
    let plain = post_otlp(&http.replace("https://", "http://"), &pki, false, &req());
    assert!(
        !matches!(plain, Ok(200)),
        "plaintext OTLP/HTTP was accepted"
    );
    println!("HTTP, plaintext: refused ({plain:?})");
    // Refused at the door: not a single point reached the pipeline.
    let accepted = collector_metric(&col, "otelcol_receiver_accepted_metric_points");
    assert_eq!(
        accepted, 0.0,
        "the receivers accepted points from clients without a certificate"
    );

    // The control: the same requests with the client certificate are accepted.
    grpc_export(&grpc, &pki, true, req()).expect("gRPC with the client certificate");
    assert_eq!(
        post_otlp(&http, &pki, true, &req()),
        Ok(200),
        "OTLP/HTTP with the client certificate"
    );
    col.check_running().expect("collector alive");
}

/// (b) + (c): only the agent's families (and target_info) reach PromQL, over remote write with TLS
/// and basic auth; the control shows that the filter is what stops the foreign family.
#[test]
fn only_the_agents_metric_families_reach_promql() {
    let test = "only_the_agents_metric_families_reach_promql";
    if !require_tools(test) {
        return;
    }
    let pki = Pki::new().expect("PKI");
    let web = WebSecurity::new(&pki, "vha-collector").expect("web security");
    let prom = Prometheus::start_secured(Flavor::RemoteWrite, web.clone())
        .expect("start Prometheus 2.42 behind TLS and basic auth");

    // Remote write without the credentials is refused: the collector's header is what gets in.
    let anon = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(&web.ca)
        .args(["-X", "POST", "--data-binary", "x"])
        .arg(prom.remote_write_url())
        .output()
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&anon.stdout),
        "401",
        "Prometheus accepted a remote write without credentials"
    );

    let mut col = Collector::start_production(
        &pki,
        &prom.remote_write_url(),
        &web.ca,
        &web.authorization(),
    )
    .expect("start the production collector");

    // (c) The agent, exporting over gRPC with its client certificate.
    let node = unique("sec-node");
    let mut env: Vec<(String, String)> = vec![
        (
            "VIRT_HYPERVISOR_AGENT_LIBVIRT__URIS".into(),
            "test:///default".into(),
        ),
        (
            "VIRT_HYPERVISOR_AGENT_EXPORT__PROTOCOL".into(),
            "grpc".into(),
        ),
        (
            "VIRT_HYPERVISOR_AGENT_EXPORT__ENDPOINT".into(),
            col.grpc_endpoint(),
        ),
        ("VIRT_HYPERVISOR_AGENT_EXPORT__INTERVAL".into(), "2s".into()),
        ("VIRT_HYPERVISOR_AGENT_NODE_NAME".into(), node.clone()),
        ("RUST_LOG".into(), "info".into()),
    ];
    env.extend(pki.agent_env());
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let agent = Agent::spawn(&["run"], &env_ref).expect("spawn the agent");
    let info = format!("kubevirt_vmi_hypervisor_info{{job=\"{JOB}\",node=\"{node}\"}}");
    let took = prom
        .wait_for(&info, agent.started(), TIMEOUT, |r| !r.is_empty())
        .unwrap_or_else(|e| {
            panic!(
                "the agent's series never reached PromQL: {e:#}\nagent:\n{}\ncollector:\n{}",
                agent.log_tail(30),
                col.log_tail(30)
            )
        });
    println!("agent -> mTLS collector -> TLS+auth remote write -> PromQL: {took:?}");
    let instance = prom.query(&info).expect("query")[0]
        .label("instance")
        .expect("instance label")
        .to_string();
    for q in [
        format!("target_info{{job=\"{JOB}\",instance=\"{instance}\",k8s_node_name=\"{node}\"}}"),
        format!(
            "virt_hypervisor_agent_connection_up{{job=\"{JOB}\",instance=\"{instance}\"}} == 1"
        ),
        format!(
            "virt_hypervisor_agent_node_kvm_available{{job=\"{JOB}\",instance=\"{instance}\"}}"
        ),
    ] {
        prom.wait_for(&q, Instant::now(), TIMEOUT, |r| r.len() == 1)
            .unwrap_or_else(|e| panic!("the agent's {q}: {e:#}"));
    }

    // (b) Foreign data with a valid client certificate, next to an allowed sentinel.
    let tag = unique("foreign");
    let dropped_before = collector_metric(&col, "otelcol_vhafilter_dropped_data_points");
    assert_eq!(
        post_otlp(&col.http_endpoint(), &pki, true, &foreign_request(&tag)),
        Ok(200),
        "the request with a valid certificate is accepted (then filtered)"
    );
    prom.wait_for(
        &format!("virt_hypervisor_agent_probe{{tag=\"{tag}\"}}"),
        Instant::now(),
        TIMEOUT,
        |r| r.len() == 1,
    )
    .expect("the allowed sentinel of the same request reaches PromQL");
    // Let one more agent export and batch pass, then look at everything Prometheus holds (it
    // scrapes nothing: every series came through the collector).
    std::thread::sleep(Duration::from_secs(3));
    for q in [
        format!("node_cpu_seconds_total{{tag=\"{tag}\"}}"),
        "{__name__=\"node_cpu_seconds_total\"}".to_string(),
        "{job=\"evil\"}".to_string(),
        format!("kubevirt_vmi_hypervisor_info{{node=\"forged-{tag}\"}}"),
    ] {
        let r = prom.query(&q).expect("query");
        assert!(r.is_empty(), "{q} reached PromQL:\n{}", describe(&r));
    }
    let names = prom
        .query("count by (__name__) ({__name__=~\".+\"})")
        .expect("query names");
    let foreign: Vec<_> = names
        .iter()
        .filter_map(|s| s.label("__name__"))
        .filter(|n| {
            *n != "kubevirt_vmi_hypervisor_info"
                && *n != "target_info"
                && !n.starts_with("virt_hypervisor_agent_")
        })
        .collect();
    assert!(
        foreign.is_empty(),
        "metric families other than the agent's in Prometheus: {foreign:?}"
    );
    let dropped = collector_metric(&col, "otelcol_vhafilter_dropped_data_points") - dropped_before;
    assert!(
        dropped >= 2.0,
        "the filter counted {dropped} dropped points, expected the 2 foreign ones"
    );
    col.check_running().expect("collector alive");
    drop(agent);
    col.stop();

    // The control: the production file with vhafilter taken out of the pipeline lets the foreign
    // family through to the same Prometheus (so the absence above is the filter's doing).
    let prod = std::fs::read_to_string(format!("{ROOT}/otel/collector.yaml")).expect("read");
    let pipeline = "processors: [memory_limiter, vhafilter, batch]";
    assert_eq!(
        prod.matches(pipeline).count(),
        1,
        "the metrics pipeline changed: update the control"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let unfiltered = dir.path().join("collector-unfiltered.yaml");
    std::fs::write(
        &unfiltered,
        prod.replace(pipeline, "processors: [memory_limiter, batch]"),
    )
    .expect("write");
    let col = Collector::start_config(
        &unfiltered,
        &pki,
        &prom.remote_write_url(),
        &web.ca,
        &web.authorization(),
    )
    .expect("start the unfiltered collector");
    let tag = unique("control");
    assert_eq!(
        post_otlp(&col.http_endpoint(), &pki, true, &foreign_request(&tag)),
        Ok(200)
    );
    prom.wait_for(
        &format!("node_cpu_seconds_total{{tag=\"{tag}\"}}"),
        Instant::now(),
        TIMEOUT,
        |r| r.len() == 1,
    )
    .expect("control: without vhafilter the foreign family reaches PromQL");
}

fn load(path: &str) -> Yaml {
    let text = std::fs::read_to_string(format!("{ROOT}/{path}")).expect("read");
    YamlLoader::load_from_str(&text)
        .expect("parse")
        .into_iter()
        .next()
        .expect("one document")
}

/// Remove the key at `path` (a chain of map keys); it must exist.
fn remove(doc: &mut Yaml, path: &[&str]) -> Yaml {
    let (last, parents) = path.split_last().expect("a path");
    let mut node = doc;
    for key in parents {
        node = match node {
            Yaml::Hash(h) => h
                .get_mut(&Yaml::String((*key).into()))
                .unwrap_or_else(|| panic!("{path:?}: no {key}")),
            _ => panic!("{path:?}: {key} is not a map"),
        };
    }
    match node {
        Yaml::Hash(h) => h
            .remove(&Yaml::String((*last).into()))
            .unwrap_or_else(|| panic!("{path:?}: no {last}")),
        _ => panic!("{path:?}: not a map"),
    }
}

/// The production profile has its security settings, and the development profile is the same
/// file without them: same receivers' endpoints, processors, allowlist, exporter and pipelines.
#[test]
fn development_profile_is_production_minus_transport_security() {
    let mut prod = load("otel/collector.yaml");
    let mut dev = load("otel/collector-dev.yaml");
    let prw = ["exporters", "prometheus_remote_write"];
    let s = |y: &Yaml| y.as_str().unwrap_or_default().to_string();

    for proto in ["grpc", "http"] {
        let tls = remove(&mut prod, &["receivers", "otlp", "protocols", proto, "tls"]);
        for key in ["cert_file", "key_file", "client_ca_file"] {
            assert!(
                s(&tls[key]).starts_with("${env:OTELCOL_TLS_"),
                "{proto} receiver: tls.{key} = {:?}",
                tls[key]
            );
        }
    }
    let tls = remove(&mut prod, &[prw[0], prw[1], "tls"]);
    assert!(
        tls["insecure"].is_badvalue(),
        "production remote write is insecure"
    );
    assert!(s(&tls["ca_file"]).contains("PROMETHEUS_REMOTE_WRITE_CA_FILE"));
    let headers = remove(&mut prod, &[prw[0], prw[1], "headers"]);
    assert_eq!(
        s(&headers["Authorization"]),
        "${env:PROMETHEUS_REMOTE_WRITE_AUTHORIZATION}"
    );
    let endpoint = remove(&mut prod, &[prw[0], prw[1], "endpoint"]);
    assert!(
        s(&endpoint).contains(":-https://"),
        "production remote write: {endpoint:?}"
    );

    assert_eq!(
        remove(&mut dev, &[prw[0], prw[1], "tls"])["insecure"],
        Yaml::Boolean(true)
    );
    let endpoint = remove(&mut dev, &[prw[0], prw[1], "endpoint"]);
    assert!(
        s(&endpoint).contains(":-http://"),
        "development remote write: {endpoint:?}"
    );

    assert_eq!(
        prod, dev,
        "otel/collector-dev.yaml drifted from otel/collector.yaml"
    );

    // The allowlist, first after memory_limiter, in both.
    let processors = &prod["service"]["pipelines"]["metrics"]["processors"];
    let names: Vec<String> = processors
        .as_vec()
        .expect("processors")
        .iter()
        .map(s)
        .collect();
    assert_eq!(names, ["memory_limiter", "vhafilter", "batch"]);
    let filter = &prod["processors"]["vhafilter"];
    assert_eq!(
        filter["metric_names"]
            .as_vec()
            .map(|v| v.iter().map(s).collect::<Vec<_>>()),
        Some(vec!["kubevirt_vmi_hypervisor_info".to_string()])
    );
    assert_eq!(
        filter["metric_name_prefixes"]
            .as_vec()
            .map(|v| v.iter().map(s).collect::<Vec<_>>()),
        Some(vec!["virt_hypervisor_agent_".to_string()])
    );
    assert_eq!(s(&filter["resource_attributes"]["service.name"]), JOB);
}
