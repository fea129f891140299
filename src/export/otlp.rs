//! The OTLP transport: gRPC (tonic) or HTTP/protobuf (reqwest), sending the requests that
//! [`super::wire`] builds.
//!
//! Why the agent sends its own requests: `opentelemetry-otlp`'s exporters take the SDK's
//! collection, whose data points cannot carry the `NO_RECORDED_VALUE` flag the staleness
//! markers need. So the request is built with `opentelemetry-proto` (the same family's protobuf
//! types and SDK transform) and sent here with tonic (the generated OTLP client) or reqwest.
//! `opentelemetry-otlp` still supplies the names of the standard variables it defines.
//!
//! Settings left unset in the agent's config fall through to the standard variables, resolved
//! here (no SDK reads them), as the OpenTelemetry SDKs do: `OTEL_EXPORTER_OTLP_METRICS_*` first
//! (an endpoint used verbatim), then `OTEL_EXPORTER_OTLP_*` (HTTP appends `/v1/metrics` to that
//! endpoint), then the defaults of [`crate::config`] (`http://localhost:4317`,
//! `http://localhost:4318/v1/metrics`, 10 s, no compression). Headers from both variables are
//! merged, the config's win. The TLS certificate variables (`OTEL_EXPORTER_OTLP_CERTIFICATE`,
//! `…CLIENT_CERTIFICATE`, `…CLIENT_KEY`) are read here too.
//!
//! TLS: rustls (ring) with the web PKI roots plus an optional CA and client identity, on both
//! transports, from files read and checked once (`otlp/tls.rs`); `https://` turns it on.

use std::path::PathBuf;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use prost::Message;
use tonic::transport::{Channel, Endpoint};

use super::ExportError;
use crate::config::{
    header_pairs, Compression, ExportConfig, HeaderPairError, Protocol, DEFAULT_GRPC_ENDPOINT,
    DEFAULT_HTTP_ENDPOINT,
};

const ENDPOINT: &str = opentelemetry_otlp::OTEL_EXPORTER_OTLP_ENDPOINT;
const METRICS_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT";
const HEADERS: &str = opentelemetry_otlp::OTEL_EXPORTER_OTLP_HEADERS;
const METRICS_HEADERS: &str = "OTEL_EXPORTER_OTLP_METRICS_HEADERS";
const TIMEOUT: &str = opentelemetry_otlp::OTEL_EXPORTER_OTLP_TIMEOUT;
const METRICS_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT";
const COMPRESSION: &str = opentelemetry_otlp::OTEL_EXPORTER_OTLP_COMPRESSION;
const METRICS_COMPRESSION: &str = "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION";
/// Appended to an `OTEL_EXPORTER_OTLP_ENDPOINT` base for HTTP (the signal's path).
const HTTP_PATH: &str = "/v1/metrics";

mod tls;
use tls::TlsFiles;

/// The protocol in force: config, else `OTEL_EXPORTER_OTLP_(METRICS_)PROTOCOL`, else gRPC.
pub fn protocol(cfg: &ExportConfig) -> Protocol {
    if let Some(p) = cfg.protocol {
        return p;
    }
    let var = std::env::var("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL")
        .or_else(|_| std::env::var(opentelemetry_otlp::OTEL_EXPORTER_OTLP_PROTOCOL))
        .unwrap_or_default();
    match var.trim() {
        "http/protobuf" | "http" => Protocol::HttpProtobuf,
        _ => Protocol::Grpc,
    }
}

/// Every transport setting, resolved from the config and the environment.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub protocol: Protocol,
    pub endpoint: String,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub gzip: bool,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The malformed pairs of `OTEL_EXPORTER_OTLP_(METRICS_)HEADERS`, skipped: each variable's
    /// name and why (never the value).
    pub skipped_headers: Vec<(&'static str, HeaderPairError)>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

fn tls_path(cfg: &Option<PathBuf>, var: &str) -> Option<PathBuf> {
    cfg.clone().or_else(|| env(var).map(PathBuf::from))
}

/// A header list from `OTEL_EXPORTER_OTLP_(METRICS_)HEADERS`, parsed as the configuration parses
/// `export.headers` from the environment ([`header_pairs`]). As the SDKs do, a malformed pair
/// sets no header, nor does a pair with an empty value; the malformed ones are returned too, so
/// that the transport can say why they were skipped.
fn parse_header_list(text: &str) -> (Vec<(String, String)>, Vec<HeaderPairError>) {
    let mut pairs = Vec::new();
    let mut malformed = Vec::new();
    for pair in header_pairs(text) {
        match pair {
            Ok((_, v)) if v.is_empty() => {}
            Ok(pair) => pairs.push(pair),
            Err(e) => malformed.push(e),
        }
    }
    (pairs, malformed)
}

impl Settings {
    pub fn resolve(cfg: &ExportConfig) -> Self {
        let protocol = protocol(cfg);
        let endpoint = cfg
            .endpoint
            .clone()
            .filter(|e| !e.trim().is_empty())
            .or_else(|| env(METRICS_ENDPOINT))
            .or_else(|| {
                env(ENDPOINT).map(|base| match protocol {
                    Protocol::Grpc => base,
                    Protocol::HttpProtobuf => {
                        format!("{}{HTTP_PATH}", base.trim_end_matches('/'))
                    }
                })
            })
            .unwrap_or_else(|| {
                match protocol {
                    Protocol::Grpc => DEFAULT_GRPC_ENDPOINT,
                    Protocol::HttpProtobuf => DEFAULT_HTTP_ENDPOINT,
                }
                .to_string()
            });
        let mut headers: Vec<(String, String)> = Vec::new();
        let mut set = |k: String, v: String| {
            headers.retain(|(old, _)| !old.eq_ignore_ascii_case(&k));
            headers.push((k, v));
        };
        let mut skipped_headers = Vec::new();
        for var in [HEADERS, METRICS_HEADERS] {
            let (pairs, malformed) = env(var).map(|t| parse_header_list(&t)).unwrap_or_default();
            for (k, v) in pairs {
                set(k, v);
            }
            skipped_headers.extend(malformed.into_iter().map(|e| (var, e)));
        }
        for (k, v) in &cfg.headers {
            set(k.clone(), v.clone());
        }
        let timeout = cfg
            .timeout
            .or_else(|| {
                [METRICS_TIMEOUT, TIMEOUT]
                    .iter()
                    .find_map(|v| env(v).and_then(|ms| ms.parse::<u64>().ok()))
                    .map(Duration::from_millis)
            })
            .filter(|t| !t.is_zero())
            .unwrap_or(crate::config::DEFAULT_EXPORT_TIMEOUT);
        let gzip = match cfg.compression {
            Some(c) => c == Compression::Gzip,
            None => [METRICS_COMPRESSION, COMPRESSION]
                .iter()
                .find_map(|v| env(v))
                .is_some_and(|c| c.eq_ignore_ascii_case("gzip")),
        };
        Self {
            protocol,
            endpoint,
            headers,
            timeout,
            gzip,
            ca: tls_path(&cfg.tls.ca_file, "OTEL_EXPORTER_OTLP_CERTIFICATE"),
            cert: tls_path(&cfg.tls.cert_file, "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"),
            key: tls_path(&cfg.tls.key_file, "OTEL_EXPORTER_OTLP_CLIENT_KEY"),
            skipped_headers,
        }
    }

    /// The endpoint as logs and errors show it (no userinfo, no query).
    pub fn shown_endpoint(&self) -> String {
        crate::config::redact::endpoint(&self.endpoint)
    }

    fn tls_wanted(&self) -> bool {
        self.endpoint.starts_with("https://") || self.ca.is_some() || self.cert.is_some()
    }

    /// The TLS files, read and checked ([`TlsFiles`]); a client identity needs both files.
    fn tls_files(&self) -> Result<TlsFiles, ExportError> {
        let identity = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            _ => None,
        };
        TlsFiles::load(self.ca.as_deref(), identity)
    }
}

/// Make ring the process-wide rustls crypto provider (idempotent). The agent links reqwest with
/// `rustls-no-provider` (to share tonic's ring instead of adding aws-lc), so any rustls user
/// without an explicit configuration needs it.
pub fn install_crypto_provider() {
    // Err means a provider is already installed: fine either way.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Why one export did not reach the receiver.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("gRPC export to {endpoint} failed: {status}")]
    Grpc {
        endpoint: String,
        status: Box<tonic::Status>,
    },
    #[error("HTTP export to {endpoint} failed: {source}")]
    Request {
        endpoint: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("HTTP export to {endpoint} answered {status}: {body}")]
    Status {
        endpoint: String,
        status: reqwest::StatusCode,
        body: String,
    },
    #[error("export to {endpoint} did not finish within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
    #[error("compressing the request failed: {0}")]
    Compress(std::io::Error),
}

/// A built transport; cheap to use concurrently (clients are reference-counted).
#[derive(Debug)]
pub enum Transport {
    Grpc {
        client: MetricsServiceClient<Channel>,
        metadata: tonic::metadata::MetadataMap,
        settings: Settings,
    },
    Http {
        client: reqwest::Client,
        headers: reqwest::header::HeaderMap,
        settings: Settings,
    },
}

impl Transport {
    /// Build the transport for `cfg`. Must run inside a tokio runtime (the gRPC channel runs
    /// its connection on it); connects lazily, so a down collector does not fail the start.
    pub fn build(cfg: &ExportConfig) -> Result<Self, ExportError> {
        install_crypto_provider();
        let settings = Settings::resolve(cfg);
        // Checked here too, on what the environment resolved (OTEL_EXPORTER_OTLP_*), which
        // config validation does not see.
        crate::config::redact::credentials_in_clear(
            &settings.endpoint,
            settings.headers.iter().map(|(k, _)| k.as_str()),
            settings.cert.is_some() || settings.key.is_some(),
        )
        .map_err(ExportError::Insecure)?;
        for (var, why) in &settings.skipped_headers {
            tracing::warn!("ignoring a malformed export header: {var}: {why}");
        }
        match settings.protocol {
            Protocol::Grpc => {
                let mut ep = Endpoint::from_shared(settings.endpoint.clone())
                    .map_err(|e| {
                        ExportError::Build(format!(
                            "invalid endpoint {:?}: {e}",
                            settings.shown_endpoint()
                        ))
                    })?
                    .timeout(settings.timeout)
                    .connect_timeout(settings.timeout);
                if settings.tls_wanted() {
                    ep = ep
                        .tls_config(settings.tls_files()?.tonic_config())
                        .map_err(|e| ExportError::Tls(e.to_string()))?;
                }
                let mut client = MetricsServiceClient::new(ep.connect_lazy());
                if settings.gzip {
                    client = client.send_compressed(tonic::codec::CompressionEncoding::Gzip);
                }
                let mut metadata = tonic::metadata::MetadataMap::new();
                for (k, v) in &settings.headers {
                    match (
                        tonic::metadata::MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes()),
                        tonic::metadata::MetadataValue::try_from(v.as_str()),
                    ) {
                        (Ok(name), Ok(value)) => {
                            metadata.insert(name, value);
                        }
                        _ => {
                            tracing::warn!(header = %k, "ignoring export header that is not valid gRPC metadata")
                        }
                    }
                }
                Ok(Transport::Grpc {
                    client,
                    metadata,
                    settings,
                })
            }
            Protocol::HttpProtobuf => {
                reqwest::Url::parse(&settings.endpoint).map_err(|e| {
                    ExportError::Build(format!(
                        "invalid endpoint {:?}: {e}",
                        settings.shown_endpoint()
                    ))
                })?;
                let mut headers = reqwest::header::HeaderMap::new();
                for (k, v) in &settings.headers {
                    match (
                        reqwest::header::HeaderName::from_bytes(k.as_bytes()),
                        reqwest::header::HeaderValue::from_str(v),
                    ) {
                        (Ok(name), Ok(value)) => {
                            headers.insert(name, value);
                        }
                        _ => {
                            tracing::warn!(header = %k, "ignoring export header that is not a valid HTTP header")
                        }
                    }
                }
                let client = reqwest::Client::builder()
                    .tls_backend_preconfigured(settings.tls_files()?.into_rustls_config())
                    .timeout(settings.timeout)
                    .build()
                    .map_err(|e| ExportError::Tls(e.to_string()))?;
                Ok(Transport::Http {
                    client,
                    headers,
                    settings,
                })
            }
        }
    }

    pub fn settings(&self) -> &Settings {
        match self {
            Transport::Grpc { settings, .. } | Transport::Http { settings, .. } => settings,
        }
    }

    /// Send one request, bounded by the export timeout.
    pub async fn send(&self, req: ExportMetricsServiceRequest) -> Result<(), SendError> {
        let s = self.settings();
        match tokio::time::timeout(s.timeout, self.send_unbounded(req)).await {
            Ok(r) => r,
            Err(_) => Err(SendError::Timeout {
                endpoint: s.shown_endpoint(),
                timeout: s.timeout,
            }),
        }
    }

    async fn send_unbounded(&self, req: ExportMetricsServiceRequest) -> Result<(), SendError> {
        match self {
            Transport::Grpc {
                client,
                metadata,
                settings,
            } => {
                let mut request = tonic::Request::new(req);
                *request.metadata_mut() = metadata.clone();
                client
                    .clone()
                    .export(request)
                    .await
                    .map(|_| ())
                    .map_err(|status| SendError::Grpc {
                        endpoint: settings.shown_endpoint(),
                        status: Box::new(status),
                    })
            }
            Transport::Http {
                client,
                headers,
                settings,
            } => {
                let mut body = req.encode_to_vec();
                let mut post = client
                    .post(&settings.endpoint)
                    .headers(headers.clone())
                    .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf");
                if settings.gzip {
                    use std::io::Write as _;
                    let mut enc =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                    enc.write_all(&body).map_err(SendError::Compress)?;
                    body = enc.finish().map_err(SendError::Compress)?;
                    post = post.header(reqwest::header::CONTENT_ENCODING, "gzip");
                }
                let endpoint = || settings.shown_endpoint();
                // reqwest's error names the URL it was sending to: dropped, the redacted
                // endpoint is in our message.
                let resp = post
                    .body(body)
                    .send()
                    .await
                    .map_err(|source| SendError::Request {
                        endpoint: endpoint(),
                        source: source.without_url(),
                    })?;
                let status = resp.status();
                if status.is_success() {
                    return Ok(());
                }
                // The receiver's reason, bounded and on one line.
                let text = resp.text().await.unwrap_or_default();
                let body: String = text
                    .chars()
                    .take(200)
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect();
                Err(SendError::Status {
                    endpoint: endpoint(),
                    status,
                    body,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults live in `crate::config`; they are still the SDKs' (the HTTP one being the
    /// default base with the path an `OTEL_EXPORTER_OTLP_ENDPOINT` base gets).
    #[test]
    fn default_endpoints_are_the_sdks() {
        assert_eq!(DEFAULT_GRPC_ENDPOINT, "http://localhost:4317");
        assert_eq!(
            DEFAULT_HTTP_ENDPOINT,
            format!("http://localhost:4318{HTTP_PATH}")
        );
    }

    #[test]
    fn header_lists_parse_like_the_sdks() {
        assert_eq!(
            parse_header_list(" a = 1 ,b=x%20y,,bad, =v,c= ").0,
            [("a".into(), "1".into()), ("b".into(), "x y".into())]
        );
    }

    /// The pairs the SDKs skip without a word are skipped here too, with the reason the
    /// configuration would give; a value with a stray `%` is one of them (the SDK sends it
    /// undecoded), a pair with an empty value is not malformed but sets no header.
    #[test]
    fn skipped_header_pairs_are_reported_as_the_configuration_would() {
        assert_eq!(
            parse_header_list(" a = 1 ,b=x%20y,,bad, =v,c= ,d=50%,e=%FF"),
            (
                vec![("a".into(), "1".into()), ("b".into(), "x y".into())],
                vec![
                    HeaderPairError::NoEquals(4),
                    HeaderPairError::EmptyKey(5),
                    HeaderPairError::BadEscape("d".into()),
                    HeaderPairError::NotUtf8("e".into()),
                ]
            )
        );
    }
}
