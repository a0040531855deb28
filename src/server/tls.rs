//! TLS termination with rustls: certificates by SNI, ALPN h2 and http/1.1, TLS 1.2 and
//! 1.3 with rustls's safe defaults, optional session resumption, and certificates that
//! reload without dropping a connection (new handshakes get the new set; established
//! sessions keep theirs).

mod expiry;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::ring as provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ResolvesServerCert, ServerSessionMemoryCache,
};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::config::TlsSettings;

/// Why certificates could not be used; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("server.tls.certs: {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("server.tls.certs: {key} does not match the certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("server.tls: {0}")]
    Config(String),
}

/// The certificates in use; swapped whole on reload.
pub struct CertSet {
    certs: Vec<Arc<CertifiedKey>>,
}

impl CertSet {
    /// The first certificate valid for `name`, else the first (the default).
    fn pick(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let matching = name.and_then(|name| {
            let server_name = ServerName::try_from(name).ok()?;
            self.certs.iter().find(|key| {
                key.cert.first().is_some_and(|der| {
                    webpki::EndEntityCert::try_from(der).is_ok_and(|cert| {
                        cert.verify_is_valid_for_subject_name(&server_name).is_ok()
                    })
                })
            })
        });
        matching.or_else(|| self.certs.first()).cloned()
    }
}

/// Reads every certificate and key. Returns the set and warnings (expired certificates).
pub fn load(settings: &TlsSettings) -> Result<(CertSet, Vec<String>), TlsError> {
    if settings.certs.is_empty() {
        return Err(TlsError::Config("no certificates configured".into()));
    }
    let provider = provider::default_provider();
    let now = crate::timefmt::unix_ms() as i64 / 1000;
    let mut certs = Vec::new();
    let mut warnings = Vec::new();
    for (cert_path, key_path) in &settings.certs {
        let chain = read_chain(cert_path)?;
        let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| file_error(key_path, e))?;
        let signing = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| file_error(key_path, e))?;
        let certified = CertifiedKey::new(chain, signing);
        certified.keys_match().map_err(|_| TlsError::KeyMismatch {
            cert: cert_path.clone(),
            key: key_path.clone(),
        })?;
        if let Some(not_after) = certified
            .cert
            .first()
            .and_then(|der| expiry::not_after(der))
        {
            if not_after < now {
                warnings.push(format!(
                    "server.tls.certs: {} expired at {}",
                    cert_path.display(),
                    crate::timefmt::rfc3339(not_after.max(0) as u64 * 1000)
                ));
            }
        }
        certs.push(Arc::new(certified));
    }
    Ok((CertSet { certs }, warnings))
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(path, e))?;
    if chain.is_empty() {
        return Err(file_error(path, "no PEM certificate in the file"));
    }
    Ok(chain)
}

fn file_error(path: &Path, error: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        message: error.to_string(),
    }
}

/// Picks a certificate per handshake from the current set.
pub struct Certificates {
    current: ArcSwap<CertSet>,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Certificates({})", self.current.load().certs.len())
    }
}

impl Certificates {
    pub fn new(set: CertSet) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::from_pointee(set),
        })
    }

    /// New handshakes use `set` from now on.
    pub fn replace(&self, set: CertSet) {
        self.current.store(Arc::new(set));
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load().pick(hello.server_name())
    }
}

/// The rustls server config: TLS 1.3 and 1.2, ALPN h2 then http/1.1.
pub fn server_config(
    certificates: Arc<Certificates>,
    session_resumption: bool,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(certificates);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if session_resumption {
        config.session_storage = ServerSessionMemoryCache::new(16_384);
        config.ticketer = provider::Ticketer::new().map_err(|e| TlsError::Config(e.to_string()))?;
    } else {
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok(Arc::new(config))
}
