//! The OTLP metric exporter, gRPC (tonic) or HTTP/protobuf.
//!
//! Settings left unset in the agent's config fall through to the standard variables the SDK
//! reads itself (`OTEL_EXPORTER_OTLP_(METRICS_)ENDPOINT`, `…HEADERS`, `…TIMEOUT`,
//! `…COMPRESSION`). The SDK ignores `OTEL_EXPORTER_OTLP_PROTOCOL` once a transport is chosen and
//! does not implement the TLS certificate variables, so the agent reads those itself.
//!
//! TLS: gRPC uses tonic's rustls (ring) with the web PKI roots plus an optional CA and client
//! identity. HTTP/protobuf uses an async reqwest client (on the agent's runtime, like tonic)
//! given a rustls configuration built here the same way (the SDK's default HTTP client has no
//! TLS compiled in).

use std::collections::HashMap;
use std::path::PathBuf;

use opentelemetry_otlp::{MetricExporter, WithExportConfig, WithHttpConfig, WithTonicConfig};

use super::ExportError;
use crate::config::{Compression, ExportConfig, Protocol};

/// The protocol in force: config, else `OTEL_EXPORTER_OTLP_(METRICS_)PROTOCOL`, else gRPC.
pub fn protocol(cfg: &ExportConfig) -> Protocol {
    if let Some(p) = cfg.protocol {
        return p;
    }
    let var = std::env::var("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_default();
    match var.trim() {
        "http/protobuf" | "http" => Protocol::HttpProtobuf,
        _ => Protocol::Grpc,
    }
}

fn tls_path(cfg: &Option<PathBuf>, var: &str) -> Option<PathBuf> {
    cfg.clone().or_else(|| {
        std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
}

fn read(path: &PathBuf) -> Result<Vec<u8>, ExportError> {
    std::fs::read(path).map_err(|source| ExportError::TlsFile {
        path: path.display().to_string(),
        source,
    })
}

/// Make ring the process-wide rustls crypto provider (idempotent). The agent links reqwest with
/// `rustls-no-provider` (to share tonic's ring instead of adding aws-lc), so any reqwest client
/// built without an explicit configuration, such as the SDK's default HTTP client, needs it.
pub fn install_crypto_provider() {
    // Err means a provider is already installed: fine either way.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The settings both transports take the same way; unset ones fall through to the SDK's
/// `OTEL_EXPORTER_OTLP_*` handling.
fn endpoint_and_timeout<B: WithExportConfig>(mut b: B, cfg: &ExportConfig) -> B {
    if let Some(ep) = &cfg.endpoint {
        b = b.with_endpoint(ep.clone());
    }
    if let Some(t) = cfg.timeout {
        b = b.with_timeout(t);
    }
    b
}

/// Build the exporter. Must run inside a multi-thread tokio runtime.
pub fn build(cfg: &ExportConfig) -> Result<MetricExporter, ExportError> {
    install_crypto_provider();
    let ca = tls_path(&cfg.tls.ca_file, "OTEL_EXPORTER_OTLP_CERTIFICATE");
    let cert = tls_path(&cfg.tls.cert_file, "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE");
    let key = tls_path(&cfg.tls.key_file, "OTEL_EXPORTER_OTLP_CLIENT_KEY");
    match protocol(cfg) {
        Protocol::Grpc => {
            let mut b = endpoint_and_timeout(MetricExporter::builder().with_tonic(), cfg);
            if cfg.compression == Some(Compression::Gzip) {
                b = b.with_compression(opentelemetry_otlp::Compression::Gzip);
            }
            if !cfg.headers.is_empty() {
                let mut headers = http::HeaderMap::new();
                for (k, v) in &cfg.headers {
                    match (
                        http::HeaderName::from_bytes(k.as_bytes()),
                        http::HeaderValue::from_str(v),
                    ) {
                        (Ok(name), Ok(value)) => {
                            headers.insert(name, value);
                        }
                        _ => {
                            tracing::warn!(header = %k, "ignoring export header that is not valid gRPC metadata")
                        }
                    }
                }
                let md =
                    opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(headers);
                b = b.with_metadata(md);
            }
            if ca.is_some() || cert.is_some() {
                use opentelemetry_otlp::tonic_types::transport::{
                    Certificate, ClientTlsConfig, Identity,
                };
                let mut tls = ClientTlsConfig::new().with_webpki_roots();
                if let Some(ca) = &ca {
                    tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
                }
                if let (Some(cert), Some(key)) = (&cert, &key) {
                    tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
                }
                b = b.with_tls_config(tls);
            }
            b.build().map_err(ExportError::Build)
        }
        Protocol::HttpProtobuf => {
            let http = MetricExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
            let mut b = endpoint_and_timeout(http, cfg);
            if cfg.compression == Some(Compression::Gzip) {
                b = b.with_compression(opentelemetry_otlp::Compression::Gzip);
            }
            if !cfg.headers.is_empty() {
                let headers: HashMap<String, String> = cfg
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                b = b.with_headers(headers);
            }
            let identity = match (&cert, &key) {
                (Some(c), Some(k)) => Some((c.clone(), k.clone())),
                _ => None,
            };
            let timeout = cfg.timeout.unwrap_or(crate::config::DEFAULT_EXPORT_TIMEOUT);
            b = b.with_http_client(http_client(ca, identity, timeout)?);
            b.build().map_err(ExportError::Build)
        }
    }
}

/// An async reqwest client with rustls (ring): web PKI roots, plus `ca` when given, plus a
/// client identity for mutual TLS.
fn http_client(
    ca: Option<PathBuf>,
    identity: Option<(PathBuf, PathBuf)>,
    timeout: std::time::Duration,
) -> Result<reqwest::Client, ExportError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let tls_err = |path: &PathBuf, what: String| ExportError::TlsFile {
        path: path.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, what),
    };
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = &ca {
        let certs = CertificateDer::pem_file_iter(ca)
            .map_err(|e| tls_err(ca, e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| tls_err(ca, e.to_string()))?;
        if certs.is_empty() {
            return Err(tls_err(ca, "no PEM certificate in file".into()));
        }
        for c in certs {
            roots.add(c).map_err(|e| tls_err(ca, e.to_string()))?;
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ExportError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let config = match &identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| tls_err(cert, e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| tls_err(cert, e.to_string()))?;
            let key_der =
                PrivateKeyDer::from_pem_file(key).map_err(|e| tls_err(key, e.to_string()))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| tls_err(cert, e.to_string()))?
        }
        None => builder.with_no_client_auth(),
    };
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .timeout(timeout)
        .build()
        .map_err(|e| ExportError::Tls(e.to_string()))
}
