//! Export over TLS with mutual authentication, on both transports: the agent binary (demo node,
//! test driver) sends to a gRPC receiver (tonic + rustls) and to an HTTPS receiver (Python's
//! `ssl` + `http.server`), each of which requires a client certificate signed by the test CA.
//! The received protobuf is decoded and checked for the demo VMs. Certificates come from the
//! `openssl` CLI.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use prost::Message;

mod common;

use common::pipeline::Pki;

const BIN: &str = env!("CARGO_BIN_EXE_virt-hypervisor-agent");

fn demo_uri() -> String {
    format!("test://{}/config/demo-node.xml", env!("CARGO_MANIFEST_DIR"))
}

fn names(req: &ExportMetricsServiceRequest) -> Vec<String> {
    let mut out = Vec::new();
    for rm in &req.resource_metrics {
        for sm in &rm.scope_metrics {
            for m in &sm.metrics {
                if m.name != "kubevirt_vmi_hypervisor_info" {
                    continue;
                }
                if let Some(opentelemetry_proto::tonic::metrics::v1::metric::Data::Gauge(g)) =
                    &m.data
                {
                    for dp in &g.data_points {
                        for kv in &dp.attributes {
                            if kv.key == "name" {
                                if let Some(v) = &kv.value {
                                    if let Some(
                                        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s),
                                    ) = &v.value
                                    {
                                        out.push(s.clone());
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    out.sort();
    out
}

const DEMO_NAMES: [&str; 6] = [
    "build-runner",
    "db01",
    "legacy_app",
    "odd-one",
    "sql-01",
    "web-frontend",
];

/// Kills and reaps a child process on drop (agent or receiver).
struct AgentProc(Child);
impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The agent with the test PKI's client identity, trusting the test CA only if `trust_ca`.
fn spawn_agent(protocol: &str, endpoint: &str, pki: &Path, trust_ca: bool) -> AgentProc {
    let mut agent = Command::new(BIN);
    agent.args([
        "--uri",
        &demo_uri(),
        "--protocol",
        protocol,
        "--endpoint",
        endpoint,
        "--set",
        "export.interval=1s",
        "run",
    ]);
    if trust_ca {
        agent.env(
            "VIRT_HYPERVISOR_AGENT_EXPORT__TLS__CA_FILE",
            pki.join("ca.pem"),
        );
    }
    let child = agent
        .env(
            "VIRT_HYPERVISOR_AGENT_EXPORT__TLS__CERT_FILE",
            pki.join("client.pem"),
        )
        .env(
            "VIRT_HYPERVISOR_AGENT_EXPORT__TLS__KEY_FILE",
            pki.join("client.key"),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    AgentProc(child)
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<ExportMetricsServiceRequest>>>);

#[tonic::async_trait]
impl MetricsService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Some(v) = f() {
            return Some(v);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A gRPC receiver that requires a client certificate of a fresh test CA, and the agent sending
/// to it, trusting that CA only if `trust_ca`. Dropping it stops both.
struct GrpcExport {
    /// What the receiver got.
    sink: Sink,
    _agent: AgentProc,
    _rt: tokio::runtime::Runtime,
    _pki: Pki,
}

fn grpc_export(trust_ca: bool) -> GrpcExport {
    let pki = Pki::new().unwrap();
    let dir = pki.dir();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let sink = Sink::default();
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            read("server.pem"),
            read("server.key"),
        ))
        .client_ca_root(tonic::transport::Certificate::from_pem(read("ca.pem")));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let svc = MetricsServiceServer::new(sink.clone());
    rt.spawn(async move {
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(svc)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    let agent = spawn_agent("grpc", &format!("https://localhost:{port}"), dir, trust_ca);
    GrpcExport {
        sink,
        _agent: agent,
        _rt: rt,
        _pki: pki,
    }
}

#[test]
fn grpc_export_over_mutual_tls_reaches_the_receiver() {
    let export = grpc_export(true);
    let got = wait_for(Duration::from_secs(20), || {
        export
            .sink
            .0
            .lock()
            .unwrap()
            .iter()
            .map(names)
            .find(|n| n.len() == DEMO_NAMES.len())
    });
    assert_eq!(
        got.expect("the demo VMs arrive over gRPC with mTLS"),
        DEMO_NAMES
    );
}

#[test]
fn a_grpc_collector_with_an_untrusted_certificate_receives_nothing() {
    // As for HTTP below: a valid client identity, but only the web PKI roots are trusted.
    let export = grpc_export(false);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        export.sink.0.lock().unwrap().len(),
        0,
        "an untrusted server must not receive metrics"
    );
}

const HTTPS_SERVER: &str = r#"
import http.server, ssl, sys, os
d = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    n = 0
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get('content-length', 0)))
        H.n += 1
        tmp = os.path.join(d, 'req-%d.tmp' % H.n)
        open(tmp, 'wb').write(body)
        os.rename(tmp, os.path.join(d, 'req-%d.bin' % H.n))
        self.send_response(200)
        self.send_header('content-type', 'application/x-protobuf')
        self.send_header('content-length', '0')
        self.end_headers()
    def log_message(self, *a):
        pass
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(os.path.join(d, 'server.pem'), os.path.join(d, 'server.key'))
ctx.load_verify_locations(os.path.join(d, 'ca.pem'))
ctx.verify_mode = ssl.CERT_REQUIRED
srv = http.server.HTTPServer(('127.0.0.1', 0), H)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
open(os.path.join(d, 'port'), 'w').write(str(srv.server_address[1]))
srv.serve_forever()
"#;

/// Start the Python HTTPS receiver in `dir` (which holds the PKI); returns its guard and port.
fn start_https_receiver(dir: &Path) -> (AgentProc, u16) {
    let server = Command::new("python3")
        .args(["-c", HTTPS_SERVER])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let guard = AgentProc(server);
    let port: u16 = wait_for(Duration::from_secs(10), || {
        std::fs::read_to_string(dir.join("port"))
            .ok()
            .and_then(|p| p.trim().parse().ok())
    })
    .expect("HTTPS receiver started");
    (guard, port)
}

#[test]
fn http_export_over_mutual_tls_reaches_the_receiver() {
    let pki = Pki::new().unwrap();
    let dir = pki.dir();
    let (_server, port) = start_https_receiver(dir);
    let _agent = spawn_agent(
        "http/protobuf",
        &format!("https://localhost:{port}/v1/metrics"),
        dir,
        true,
    );
    let got = wait_for(Duration::from_secs(20), || {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "bin"))
            .collect();
        files.sort();
        files
            .iter()
            .filter_map(|f| ExportMetricsServiceRequest::decode(&*std::fs::read(f).unwrap()).ok())
            .map(|r| names(&r))
            .find(|n| n.len() == DEMO_NAMES.len())
    });
    assert_eq!(
        got.expect("the demo VMs arrive over HTTPS with mTLS"),
        DEMO_NAMES
    );
}

#[test]
fn a_collector_with_an_untrusted_certificate_receives_nothing() {
    // The agent has a valid client identity but trusts only the web PKI roots (no CA file):
    // verifying the server's certificate must fail, so nothing is sent.
    let pki = Pki::new().unwrap();
    let dir = pki.dir();
    let (_server, port) = start_https_receiver(dir);
    let child = Command::new(BIN)
        .args([
            "--uri",
            &demo_uri(),
            "--protocol",
            "http/protobuf",
            "--endpoint",
            &format!("https://localhost:{port}/v1/metrics"),
            "--set",
            "export.interval=500ms",
            "run",
        ])
        .env(
            "VIRT_HYPERVISOR_AGENT_EXPORT__TLS__CERT_FILE",
            dir.join("client.pem"),
        )
        .env(
            "VIRT_HYPERVISOR_AGENT_EXPORT__TLS__KEY_FILE",
            dir.join("client.key"),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _agent = AgentProc(child);
    std::thread::sleep(Duration::from_secs(3));
    let received = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "bin"))
        .count();
    assert_eq!(received, 0, "an untrusted server must not receive metrics");
}
