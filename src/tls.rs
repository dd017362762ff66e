//! TLS for `https://` endpoints (feature `tls`, on by default), with rustls.

use std::fmt;

use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// TLS settings for `https://` endpoints: which CAs to trust, an optional client certificate
/// for mutual TLS, and an optional server name override.
///
/// Without any CA the system's trust store is used.
///
/// ```no_run
/// # async fn demo(ca: String, cert: String, key: String) -> etcdv3::Result<()> {
/// use etcdv3::{Client, TlsOptions};
/// let client = Client::builder(["https://127.0.0.1:2379"])
///     .tls(TlsOptions::new().ca_pem(ca).identity(cert, key))
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct TlsOptions {
    ca_pems: Vec<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    domain_name: Option<String>,
}

impl TlsOptions {
    /// No CA (system roots), no client certificate, the endpoint's host as server name.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trust the CA certificate(s) in this PEM text (may be called more than once). When any
    /// CA is given, only the given CAs are trusted.
    pub fn ca_pem(mut self, pem: impl AsRef<[u8]>) -> Self {
        self.ca_pems.push(pem.as_ref().to_vec());
        self
    }

    /// Present this client certificate and private key (PEM) for mutual TLS.
    pub fn identity(mut self, cert_pem: impl AsRef<[u8]>, key_pem: impl AsRef<[u8]>) -> Self {
        self.identity = Some((cert_pem.as_ref().to_vec(), key_pem.as_ref().to_vec()));
        self
    }

    /// Verify the server certificate against this name instead of the endpoint's host.
    pub fn domain_name(mut self, name: impl Into<String>) -> Self {
        self.domain_name = Some(name.into());
        self
    }
}

/// A built rustls client configuration (from [`TlsOptions`]) and the server name override.
#[derive(Clone)]
pub(crate) struct ClientTls {
    connector: tokio_rustls::TlsConnector,
    domain_name: Option<String>,
}

impl ClientTls {
    /// Build the rustls configuration: the given CAs (or the system's trust store), the client
    /// identity, ALPN `h2` (gRPC servers expect it).
    pub(crate) fn new(opts: &TlsOptions) -> Result<ClientTls, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let mut roots = rustls::RootCertStore::empty();
        if opts.ca_pems.is_empty() {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                // Unparsable system certificates are skipped, as every rustls user does.
                let _ = roots.add(cert);
            }
        } else {
            for pem in &opts.ca_pems {
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| format!("CA certificate PEM: {e}"))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("CA certificate: {e}"))?;
                }
            }
            if roots.is_empty() {
                return Err("the CA PEM holds no certificate".into());
            }
        }
        let builder = builder.with_root_certificates(roots);
        let mut config = match &opts.identity {
            Some((cert, key)) => {
                let certs = CertificateDer::pem_slice_iter(cert)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("client certificate PEM: {e}"))?;
                let key = PrivateKeyDer::from_pem_slice(key)
                    .map_err(|e| format!("client key PEM: {e}"))?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| format!("client identity: {e}"))?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(ClientTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            domain_name: opts.domain_name.clone(),
        })
    }

    /// The name to verify the server certificate against, when overridden.
    pub(crate) fn domain_name(&self) -> Option<&str> {
        self.domain_name.as_deref()
    }

    /// The TLS handshake over `io`.
    pub(crate) async fn connect<IO>(
        &self,
        name: ServerName<'static>,
        io: IO,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<IO>>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        self.connector.connect(name, io).await
    }
}

impl fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsOptions")
            .field("ca_certificates", &self.ca_pems.len())
            .field(
                "client_identity",
                &self.identity.as_ref().map(|_| "<redacted>"),
            )
            .field("domain_name", &self.domain_name)
            .finish()
    }
}
