//! TLS to the upstream server the way libpq's `sslmode=require` does it: encrypted, but the
//! certificate is not checked against any authority or host name. Handshake signatures are
//! still verified, so the peer must hold the key of the certificate it presents.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::UpstreamError;

/// Accepts any certificate chain; checks handshake signatures with ring's algorithms.
#[derive(Debug)]
struct AcceptAnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // sslmode=require semantics: no chain or name verification.
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The client configuration, built once per process (also what tests use to reach the proxy
/// the way libpq's `sslmode=require` does).
pub fn client_config() -> Result<Arc<ClientConfig>, UpstreamError> {
    static CONFIG: OnceLock<Result<Arc<ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let verifier = Arc::new(AcceptAnyCertificate { provider: provider.clone() });
            ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map(|builder| {
                    Arc::new(builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth())
                })
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(UpstreamError::Tls)
}

/// Runs the TLS handshake over a TCP stream whose SSLRequest the server accepted.
pub(crate) async fn handshake(tcp: TcpStream, host: &str) -> Result<TlsStream<TcpStream>, UpstreamError> {
    // The name only feeds SNI (an IP address sends none); it is not verified.
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| UpstreamError::Tls(format!("{host:?} is not a usable server name: {e}")))?;
    TlsConnector::from(client_config()?).connect(name, tcp).await.map_err(|e| UpstreamError::Tls(e.to_string()))
}
