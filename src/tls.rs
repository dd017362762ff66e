//! TLS for `https://` endpoints (feature `tls`, on by default), with rustls.

use std::fmt;

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

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

    pub(crate) fn to_tonic(&self) -> ClientTlsConfig {
        let mut c = ClientTlsConfig::new();
        if self.ca_pems.is_empty() {
            c = c.with_native_roots();
        } else {
            c = c.ca_certificates(self.ca_pems.iter().map(Certificate::from_pem));
        }
        if let Some((cert, key)) = &self.identity {
            c = c.identity(Identity::from_pem(cert, key));
        }
        if let Some(d) = &self.domain_name {
            c = c.domain_name(d.clone());
        }
        c
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
