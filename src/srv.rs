//! DNS SRV discovery of etcd endpoints (feature `dns-srv`), as etcd's own `--discovery-srv`
//! and Go's client do it: `_etcd-client-ssl._tcp.<domain>` gives `https://` endpoints and
//! `_etcd-client._tcp.<domain>` gives `http://` ones.
//!
//! ```no_run
//! # async fn demo() -> etcdv3::Result<()> {
//! let endpoints = etcdv3::SrvDiscovery::new("example.com").discover().await?;
//! let client = etcdv3::Client::connect(endpoints).await?;
//! # Ok(()) }
//! ```

use std::net::SocketAddr;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;

use crate::error::{Error, ErrorKind, Result};

/// Looks up an etcd cluster's client endpoints in DNS SRV records.
#[derive(Debug, Clone)]
pub struct SrvDiscovery {
    domain: String,
    service_name: Option<String>,
    nameserver: Option<SocketAddr>,
}

impl SrvDiscovery {
    /// Discover the cluster published under `domain`.
    pub fn new(domain: impl Into<String>) -> Self {
        SrvDiscovery {
            domain: domain.into(),
            service_name: None,
            nameserver: None,
        }
    }

    /// Look up `_etcd-client-<name>._tcp` instead of `_etcd-client._tcp` (etcd's
    /// `--discovery-srv-name`).
    pub fn service_name(mut self, name: impl Into<String>) -> Self {
        self.service_name = Some(name.into());
        self
    }

    /// Ask this DNS server (UDP) instead of the system's resolvers.
    pub fn nameserver(mut self, addr: SocketAddr) -> Self {
        self.nameserver = Some(addr);
        self
    }

    fn resolver(&self) -> Result<TokioResolver> {
        let dns_err = |e: hickory_resolver::net::NetError| {
            Error::new(ErrorKind::Unavailable, "could not set up the DNS resolver").with_source(e)
        };
        let builder = match self.nameserver {
            Some(addr) => {
                let mut conn = ConnectionConfig::udp();
                conn.port = addr.port();
                let mut ns = NameServerConfig::udp(addr.ip());
                ns.connections = vec![conn];
                TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![ns]),
                    TokioRuntimeProvider::default(),
                )
            }
            None => TokioResolver::builder_tokio().map_err(dns_err)?,
        };
        builder.build().map_err(dns_err)
    }

    /// The endpoints, `https://` ones (from `_etcd-client-ssl`) first, each group ordered by
    /// SRV priority and then weight. Fails with [`ErrorKind::Unavailable`] when neither name
    /// has records.
    pub async fn discover(&self) -> Result<Vec<String>> {
        let resolver = self.resolver()?;
        let suffix = self
            .service_name
            .as_ref()
            .map(|n| format!("-{n}"))
            .unwrap_or_default();
        let domain = self.domain.trim_end_matches('.');
        let mut endpoints = Vec::new();
        let mut failures = Vec::new();
        for (service, scheme) in [("etcd-client-ssl", "https"), ("etcd-client", "http")] {
            let name = format!("_{service}{suffix}._tcp.{domain}.");
            match resolver.srv_lookup(name.as_str()).await {
                Ok(lookup) => {
                    let mut records: Vec<_> = lookup
                        .answers()
                        .iter()
                        .filter_map(|r| match &r.data {
                            RData::SRV(srv) => Some(srv.clone()),
                            _ => None,
                        })
                        .collect();
                    records
                        .sort_by(|a, b| a.priority.cmp(&b.priority).then(b.weight.cmp(&a.weight)));
                    for srv in records {
                        // ASCII (punycode) names: what a URI takes.
                        let target = srv.target.to_ascii();
                        let host = target.trim_end_matches('.');
                        if host.is_empty() {
                            // "." : the service is decidedly not available (RFC 2782).
                            continue;
                        }
                        let url = format!("{scheme}://{host}:{}", srv.port);
                        if !endpoints.contains(&url) {
                            endpoints.push(url);
                        }
                    }
                }
                Err(e) => failures.push(format!("{name}: {e}")),
            }
        }
        if endpoints.is_empty() {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!("no etcd SRV records found: [{}]", failures.join("; ")),
            ));
        }
        Ok(endpoints)
    }
}
