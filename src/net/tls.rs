//! TLS material for the client side: loading a PEM certificate and key, and generating a
//! self-signed pair for the demo and the tests.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("no certificate found in {0}")]
    NoCertificate(PathBuf),
    #[error("no private key found in {0}")]
    NoKey(PathBuf),
    #[error("invalid TLS configuration: {0}")]
    Config(String),
}

pub fn acceptor(cert_path: &Path, key_path: &Path) -> Result<TlsAcceptor, TlsError> {
    let read = |p: &Path| std::fs::read(p).map_err(|source| TlsError::Read { path: p.to_owned(), source });
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read { path: cert_path.to_owned(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(cert_path.to_owned()));
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|source| TlsError::Read { path: key_path.to_owned(), source })?
        .ok_or_else(|| TlsError::NoKey(key_path.to_owned()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    // PostgreSQL 17's protocol name: a client offering ALPN must offer this one (as the server
    // requires), and direct TLS (no SSLRequest) is accepted only when it was negotiated.
    config.alpn_protocols = vec![POSTGRESQL_ALPN.to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The ALPN protocol name of PostgreSQL connections.
pub const POSTGRESQL_ALPN: &[u8] = b"postgresql";

/// Write a self-signed certificate for `localhost`/`127.0.0.1` into `dir`; returns (cert, key) paths.
/// The key file is created with mode 0600.
pub fn write_self_signed(dir: &Path) -> Result<(PathBuf, PathBuf), TlsError> {
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let cert = rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Config(e.to_string()))?;
    let cert_path = dir.join("proxy.crt");
    let key_path = dir.join("proxy.key");
    let write = |p: &Path, data: &str| {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(p)
            .and_then(|mut f| f.write_all(data.as_bytes()))
            .map_err(|source| TlsError::Read { path: p.to_owned(), source })
    };
    write(&cert_path, &cert.cert.pem())?;
    write(&key_path, &cert.signing_key.serialize_pem())?;
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_pair_loads() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = write_self_signed(dir.path()).unwrap();
        acceptor(&c, &k).unwrap();
        assert!(acceptor(&k, &k).is_err());
    }
}
