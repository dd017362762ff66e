//! Throwaway certificates for TLS test clusters, made with `rcgen`.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use super::error::TestkitError;

/// PEM texts of a test certificate authority, a server certificate for `127.0.0.1` and
/// `localhost`, and a client certificate, all signed by that authority.
///
/// A cluster started with [`EtcdClusterBuilder::tls`](super::EtcdClusterBuilder::tls) makes a
/// fresh set; get it with [`EtcdCluster::certs`](super::EtcdCluster::certs) to configure the
/// client. [`TestCerts::generate`] makes an unrelated set, e.g. to test a wrong CA.
#[derive(Clone)]
pub struct TestCerts {
    /// The certificate authority's certificate.
    pub ca_pem: String,
    /// The server certificate (SANs: `127.0.0.1`, `::1`, `localhost`).
    pub server_cert_pem: String,
    /// The server certificate's private key.
    pub server_key_pem: String,
    /// A client certificate (CN `root`) for mutual TLS.
    pub client_cert_pem: String,
    /// The client certificate's private key.
    pub client_key_pem: String,
}

impl std::fmt::Debug for TestCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCerts").finish_non_exhaustive()
    }
}

fn err(what: &str, e: rcgen::Error) -> TestkitError {
    TestkitError::Config(format!("generating test certificates ({what}): {e}"))
}

impl TestCerts {
    /// Make a fresh CA with a server and a client certificate.
    pub fn generate() -> Result<TestCerts, TestkitError> {
        let ca_key = KeyPair::generate().map_err(|e| err("CA key", e))?;
        let mut ca_params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| err("CA", e))?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "etcdv3 testkit CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .map_err(|e| err("CA certificate", e))?;
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().map_err(|e| err("server key", e))?;
        let mut server =
            CertificateParams::new(vec!["localhost".to_owned()]).map_err(|e| err("server", e))?;
        server
            .distinguished_name
            .push(DnType::CommonName, "etcd test server");
        server
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        server
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
        server.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let server_cert = server
            .signed_by(&server_key, &issuer)
            .map_err(|e| err("server certificate", e))?;

        let client_key = KeyPair::generate().map_err(|e| err("client key", e))?;
        let mut client =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| err("client", e))?;
        client.distinguished_name.push(DnType::CommonName, "root");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client
            .signed_by(&client_key, &issuer)
            .map_err(|e| err("client certificate", e))?;

        Ok(TestCerts {
            ca_pem: ca_cert.pem(),
            server_cert_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
            client_cert_pem: client_cert.pem(),
            client_key_pem: client_key.serialize_pem(),
        })
    }

    /// Write `ca.pem`, `server.pem`, `server-key.pem` into `dir`; returns their paths.
    pub(crate) fn write_server_files(
        &self,
        dir: &Path,
    ) -> Result<(PathBuf, PathBuf, PathBuf), TestkitError> {
        let ca = dir.join("ca.pem");
        let cert = dir.join("server.pem");
        let key = dir.join("server-key.pem");
        for (path, text) in [
            (&ca, &self.ca_pem),
            (&cert, &self.server_cert_pem),
            (&key, &self.server_key_pem),
        ] {
            std::fs::write(path, text)
                .map_err(|e| TestkitError::io(format!("writing {}", path.display()), e))?;
        }
        Ok((ca, cert, key))
    }
}
