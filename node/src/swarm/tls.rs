//! TLS for the chunk exchange. Image data is trusted only through hashes (DESIGN 7): the
//! manifest hash a node boots with names every chunk, and every chunk is verified on arrival.
//! So a peer's certificate proves nothing that matters here, and booting nodes have none from
//! the cluster CA: each process makes a throwaway self-signed certificate, and a fetcher
//! accepts any certificate whose key signed the handshake. QUIC still encrypts the bytes on
//! the wire; what a hostile peer can do is written in docs/threat-model.md.

use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

use super::{ALPN_CHUNKS, SwarmError};

/// The name a fetcher connects with; nobody checks it.
pub const PEER_NAME: &str = "peer.bootmesh";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(what: &'static str) -> impl FnOnce(rustls::Error) -> SwarmError {
    move |error| SwarmError::Tls(format!("{what}: {error}"))
}

/// A throwaway certificate and key for this process's chunk endpoint. Ed25519: quick to make
/// and to sign with, and its signatures are deterministic and of one length, so the handshake
/// has the same size in every run (a simulation replays a seed only if the datagrams do not
/// change with the randomness of an ECDSA signature's encoding).
pub fn ephemeral_identity() -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), SwarmError>
{
    let certificate_error =
        |error: rcgen::Error| SwarmError::Tls(format!("make a peer certificate: {error}"));
    let signing_key =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(certificate_error)?;
    let certificate = rcgen::CertificateParams::new(vec![PEER_NAME.to_owned()])
        .and_then(|params| params.self_signed(&signing_key))
        .map_err(certificate_error)?;
    let key = PrivatePkcs8KeyDer::from(signing_key.serialize_der());
    Ok((certificate.der().clone(), key.into()))
}

/// Server side of the chunk exchange, with `certificate` and `key`; no client certificate
/// is asked for.
pub fn server_config(
    certificate: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, SwarmError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error("peer server TLS"))?
        .with_no_client_auth()
        .with_single_cert(vec![certificate], key)
        .map_err(tls_error("peer server certificate"))?;
    tls.alpn_protocols = vec![ALPN_CHUNKS.to_vec()];
    let crypto = QuicServerConfig::try_from(tls)
        .map_err(|error| SwarmError::Tls(format!("peer server TLS for QUIC: {error}")))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport);
    Ok(config)
}

/// Client side of the chunk exchange: any peer certificate will do (see the module comment).
pub fn client_config(
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig, SwarmError> {
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error("peer client TLS"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyPeer { provider }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN_CHUNKS.to_vec()];
    let crypto = QuicClientConfig::try_from(tls)
        .map_err(|error| SwarmError::Tls(format!("peer client TLS for QUIC: {error}")))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport);
    Ok(config)
}

/// Accepts any certificate, but still checks that the handshake was signed with its key, so
/// the connection is at least with whoever holds that key.
#[derive(Debug)]
struct AnyPeer {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyPeer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
