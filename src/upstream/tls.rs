//! TLS towards upstreams: a rustls client per upstream that verifies the instance's
//! certificate against the webpki roots or the upstream's own CA file.

use std::sync::Arc;

use rustls::crypto::ring as provider;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use crate::config::{Protocol, UpstreamTls};

/// Connects TLS to one upstream's instances under one server name.
#[derive(Clone)]
pub struct UpstreamConnector {
    pub connector: TlsConnector,
    pub server_name: ServerName<'static>,
}

impl UpstreamConnector {
    /// Builds the client. The config was validated at load, so this cannot fail for a
    /// compiled [`UpstreamTls`]; a CA certificate rustls rejects is left out (and every
    /// handshake then fails verification, which is the safe direction).
    /// ALPN offers what `protocol` may speak.
    pub fn new(spec: &UpstreamTls, protocol: Protocol) -> Option<Self> {
        let mut roots = RootCertStore::empty();
        match &spec.roots {
            Some(certs) => {
                for cert in certs {
                    if let Err(error) = roots.add(cert.clone()) {
                        tracing::error!(%error, "upstream CA certificate rejected");
                    }
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(provider::default_provider()))
                .with_safe_default_protocol_versions()
                .ok()?
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = match protocol {
            Protocol::H2 => vec![b"h2".to_vec()],
            Protocol::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            Protocol::Http1 | Protocol::H2c => vec![b"http/1.1".to_vec()],
        };
        Some(Self {
            connector: TlsConnector::from(Arc::new(config)),
            server_name: ServerName::try_from(spec.server_name.clone()).ok()?,
        })
    }
}
