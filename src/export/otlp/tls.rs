//! The export's TLS material, read and checked once for both transports: the trust roots (the
//! web PKI's plus every certificate of the CA file) and the client identity (certificate chain
//! and key). [`TlsFiles::load`] reads each file once and builds the rustls configuration (ring)
//! from it, so a file that is unreadable, holds no certificate or key, or a key that does not
//! fit the certificate, fails the start with the file's name, whichever the transport; reqwest
//! then takes that configuration as it is, and tonic the same roots and identity.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{ClientTlsConfig, Identity};

use crate::export::ExportError;

/// TLS files read and checked; see the module documentation.
pub(super) struct TlsFiles {
    roots: rustls::RootCertStore,
    /// The client certificate and key files as read: tonic takes an identity only as PEM.
    identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    config: rustls::ClientConfig,
}

impl std::fmt::Debug for TlsFiles {
    /// Never the client key (nor the certificate's bytes): only what is there.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsFiles")
            .field("roots", &self.roots.len())
            .field("client_identity", &self.identity_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// A TLS file's error, with its path.
fn file_error(path: &Path, what: impl Into<String>) -> ExportError {
    ExportError::TlsFile {
        path: path.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, what.into()),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ExportError> {
    std::fs::read(path).map_err(|source| ExportError::TlsFile {
        path: path.display().to_string(),
        source,
    })
}

/// Every certificate of a PEM file; an error when it has none.
fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, ExportError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e.to_string()))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate in file"));
    }
    Ok(certs)
}

impl TlsFiles {
    /// Read and check `ca` (PEM certificates added to the web PKI roots) and `identity` (PEM
    /// client certificate chain and key), each file once.
    pub(super) fn load(
        ca: Option<&Path>,
        identity: Option<(&Path, &Path)>,
    ) -> Result<Self, ExportError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(ca) = ca {
            for cert in certificates(ca, &read(ca)?)? {
                roots.add(cert).map_err(|e| file_error(ca, e.to_string()))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ExportError::Tls(e.to_string()))?
            .with_root_certificates(roots.clone());
        let (config, identity_pem) = match identity {
            Some((cert, key)) => {
                let (cert_pem, key_pem) = (read(cert)?, read(key)?);
                let chain = certificates(cert, &cert_pem)?;
                let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
                    rustls_pki_types::pem::Error::NoItemsFound => {
                        file_error(key, "no PEM private key in file")
                    }
                    e => file_error(key, e.to_string()),
                })?;
                let config = builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| file_error(cert, e.to_string()))?;
                (config, Some((cert_pem, key_pem)))
            }
            None => (builder.with_no_client_auth(), None),
        };
        Ok(Self {
            roots,
            identity_pem,
            config,
        })
    }

    /// The rustls client configuration, for reqwest.
    pub(super) fn into_rustls_config(self) -> rustls::ClientConfig {
        self.config
    }

    /// The same roots and identity for tonic, which builds its own rustls configuration (with
    /// the process's provider, ring: see [`super::install_crypto_provider`]) and adds the `h2`
    /// ALPN gRPC needs.
    pub(super) fn tonic_config(&self) -> ClientTlsConfig {
        let tls = ClientTlsConfig::new().trust_anchors(self.roots.roots.iter().cloned());
        match &self.identity_pem {
            Some((cert, key)) => tls.identity(Identity::from_pem(cert, key)),
            None => tls,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;
    use std::path::PathBuf;

    use super::*;

    /// A self-signed CA certificate (its key was not kept): something to trust.
    const CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBpjCCAU2gAwIBAgIUZ+2WAFkZI1lVCzeVaTqoE+3w9nAwCgYIKoZIzj0EAwIw
KDEmMCQGA1UEAwwddmlydC1oeXBlcnZpc29yLWFnZW50IHRlc3QgQ0EwIBcNMjYx
MjAyMTUyNzU4WhgPMjEyNjExMDgxNTI3NThaMCgxJjAkBgNVBAMMHXZpcnQtaHlw
ZXJ2aXNvci1hZ2VudCB0ZXN0IENBMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE
/Yp4MTDpaNC31y6D9xmeBvb5r2ClTacLoWVOBl05mbqLclUoXLju89Lgz5qpGaCK
ibv9FWIkw94CTQeuHobKpqNTMFEwHQYDVR0OBBYEFDh0hoWNY/gzTQVF5Tt77Baj
vbnxMB8GA1UdIwQYMBaAFDh0hoWNY/gzTQVF5Tt77BajvbnxMA8GA1UdEwEB/wQF
MAMBAf8wCgYIKoZIzj0EAwIDRwAwRAIgWQrRL+VHM6usfGCv1BlVCNTmt+Zi/bFA
yGPC+nYGGloCIGf+im6J0B2s0YuVEgTXVK7jzWdORC6GWrjihLN+iLO9
-----END CERTIFICATE-----
";

    fn write(dir: &tempfile::TempDir, name: &str, contents: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    /// Assert that loading failed with a message, error and source as the agent reports them,
    /// that names `path` and says `why`.
    fn assert_refused(result: Result<TlsFiles, ExportError>, path: &Path, why: &str) {
        let e = result.expect_err("the files must be refused");
        let text = match e.source() {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        };
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains(why), "{text}");
    }

    #[test]
    fn the_ca_file_adds_its_certificates_to_the_web_pki_roots() {
        let dir = tempfile::tempdir().unwrap();
        let ca = write(&dir, "ca.pem", &CA_PEM.repeat(2));
        let web_pki = TlsFiles::load(None, None).unwrap().roots.len();
        assert_eq!(web_pki, webpki_roots::TLS_SERVER_ROOTS.len());
        let files = TlsFiles::load(Some(&ca), None).unwrap();
        assert_eq!(files.roots.len(), web_pki + 2);
        assert!(files.identity_pem.is_none());
    }

    /// tonic used to take a CA file without a certificate without a word (and trust nothing
    /// more); both transports now refuse it, as the HTTP one did, and a missing one.
    #[test]
    fn an_unusable_ca_file_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca = write(&dir, "ca.pem", "not a certificate\n");
        assert_refused(TlsFiles::load(Some(&ca), None), &ca, "no PEM certificate");
        let missing = dir.path().join("missing.pem");
        assert_refused(
            TlsFiles::load(Some(&missing), None),
            &missing,
            "No such file",
        );
    }

    #[test]
    fn an_identity_without_a_certificate_or_a_key_is_refused_with_the_file_name() {
        let dir = tempfile::tempdir().unwrap();
        let empty = write(&dir, "empty.pem", "");
        let cert = write(&dir, "cert.pem", CA_PEM);
        let refused = TlsFiles::load(None, Some((&empty, &cert)));
        assert_refused(refused, &empty, "no PEM certificate");
        let refused = TlsFiles::load(None, Some((&cert, &empty)));
        assert_refused(refused, &empty, "no PEM private key");
    }
}
