//! The cluster's public key infrastructure: the cluster CA, server certificates, the rustls
//! configurations for mutual TLS between boot servers, and one-time join tokens.
//!
//! Trust model. Every boot server holds a certificate issued by the cluster CA, and peers accept
//! each other only through that CA (mutual TLS, server name [`SERVER_NAME`]). A new server
//! bootstraps with a [`JoinToken`]: it pins the CA by the SHA-256 of its certificate, so the
//! joiner can authenticate the cluster before it has the CA, and it carries a secret that
//! authorises the joiner to receive a certificate. The joiner generates its key pair locally and
//! only sends the public key, so no private key ever crosses the network.
//!
//! All TLS here is TLS 1.3 with the `ring` provider; nothing uses process-wide default providers.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SerialNumber,
};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
};
use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;

use crate::seams::{Clock, SystemClock, os_random_bytes};

/// The DNS name in every server certificate, and the name every peer verifies. Servers are
/// reached by address and may move, so identity is "a member of this cluster", not a host name;
/// which member it is comes from [`server_id_of`]. Clients must connect with this server name.
pub const SERVER_NAME: &str = "bootmesh-server";

/// The first field of an encoded [`JoinToken`]; versioned so the format can change later.
const TOKEN_PREFIX: &str = "bmjoin1";
/// The per-server DNS name is `server-<id>.bootmesh`.
const SERVER_SAN_PREFIX: &str = "server-";
const SERVER_SAN_SUFFIX: &str = ".bootmesh";

const SECONDS_PER_DAY: u64 = 24 * 60 * 60;
/// Roughly 20 years: the CA outlives any server, and rotating it means re-joining everyone.
const CA_LIFETIME: Duration = Duration::from_secs(20 * 365 * SECONDS_PER_DAY + 5 * SECONDS_PER_DAY);
/// Roughly 5 years: long enough that lab clusters never see an expiry, short enough to bound a
/// leaked key.
const SERVER_LIFETIME: Duration =
    Duration::from_secs(5 * 365 * SECONDS_PER_DAY + 2 * SECONDS_PER_DAY);
/// Certificates start a day in the past so that a peer whose clock lags ours accepts them.
const BACKDATE: Duration = Duration::from_secs(SECONDS_PER_DAY);
/// 9999-12-31T23:59:59Z, the last instant an X.509 time can express; beyond it the date
/// arithmetic would overflow.
const LAST_CERTIFICATE_INSTANT: Duration = Duration::from_secs(253_402_300_799);

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen could not generate a key or build and sign a certificate.
    #[error("could not generate a key or certificate: {0}")]
    Generation(#[from] rcgen::Error),
    /// A certificate could not be decoded (PEM or DER) or lacks something required.
    #[error("invalid certificate: {0}")]
    InvalidCertificate(String),
    /// A private key could not be decoded, or is not an ECDSA P-256 PKCS#8 key.
    #[error("invalid private key (expected an ECDSA P-256 PKCS#8 key): {0}")]
    InvalidKey(String),
    /// A SubjectPublicKeyInfo could not be decoded or is not an ECDSA P-256 key.
    #[error("invalid public key (expected an ECDSA P-256 SubjectPublicKeyInfo): {0}")]
    InvalidPublicKey(String),
    /// The certificate offered as the cluster CA is not a CA certificate.
    #[error("the certificate is not a CA certificate (basic constraints do not say cA)")]
    NotACa,
    /// The private key belongs to a different certificate.
    #[error("the private key does not match the certificate's public key")]
    KeyMismatch,
    /// The certificate does not chain to the cluster CA, or is expired, or lacks the usages
    /// and names a server certificate needs.
    #[error("the certificate is not a valid server certificate under the cluster CA: {0}")]
    NotIssuedByCa(rustls::Error),
    /// The certificate has no (or an ambiguous) `server-<id>.bootmesh` name.
    #[error("the certificate does not name exactly one server id (server-<id>.bootmesh)")]
    MissingServerId,
    /// rustls refused the configuration (for example the key or the protocol versions).
    #[error("TLS configuration failed: {0}")]
    Tls(#[from] rustls::Error),
    /// A certificate verifier could not be built.
    #[error("could not build a certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// A CA fingerprint in text form is malformed.
    #[error("invalid CA fingerprint: {0}")]
    InvalidFingerprint(&'static str),
    /// A join token in text form is malformed.
    #[error("invalid join token: {0}")]
    InvalidToken(&'static str),
    /// The system clock is before 1970 or so far ahead that validity dates cannot be encoded.
    #[error("the system clock is outside the range a certificate validity can express")]
    ClockOutOfRange,
    /// The operating system's random number generator failed.
    #[error("the operating system's random number generator failed: {0}")]
    Randomness(getrandom::Error),
    /// During a join, the server's chain did not contain the CA pinned by the token. Surfaces
    /// inside the TLS handshake error.
    #[error("the server's CA certificate does not match the fingerprint in the join token")]
    CaFingerprintMismatch,
}

/// SHA-256 of the CA certificate's DER: how a join token names the cluster it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaFingerprint(pub [u8; 32]);

impl CaFingerprint {
    /// The fingerprint of a certificate given as DER.
    pub fn of(certificate_der: &[u8]) -> Self {
        Self(Sha256::digest(certificate_der).into())
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }

    /// Parses 64 hex characters (either case).
    pub fn from_hex(text: &str) -> Result<Self, PkiError> {
        if text.len() != 64 {
            return Err(PkiError::InvalidFingerprint("expected 64 hex characters"));
        }
        decode_hex(text)
            .map(Self)
            .ok_or(PkiError::InvalidFingerprint("not hexadecimal"))
    }
}

impl fmt::Display for CaFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The cluster CA: its certificate and its signing key. Only servers that issue certificates
/// (the leader answering joins) need the key.
pub struct ClusterCa {
    certificate: CertificateDer<'static>,
    /// rcgen's signer: the CA's name and key identifier, and the key itself.
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for ClusterCa {
    // The key must never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("fingerprint", &self.fingerprint().to_hex())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl ClusterCa {
    /// Creates a new self-signed CA (ECDSA P-256, CA with path length 0 so it can only sign
    /// server certificates directly, valid for about 20 years) for the named cluster.
    pub fn generate(cluster_name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("bootmesh cluster CA {cluster_name}"),
        );
        params
            .distinguished_name
            .push(DnType::OrganizationName, cluster_name.to_owned());
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial()?);
        set_validity(&mut params, SystemClock.wall_now(), CA_LIFETIME)?;
        let certificate = params.self_signed(&key)?.der().clone();
        Ok(Self {
            certificate,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate and PKCS#8 key, both PEM. Checks that the certificate is
    /// a CA and that the key is its key, so a mixed-up pair of files fails here, not at the
    /// first join.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let certificate = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|error| PkiError::InvalidCertificate(error.to_string()))?;
        let key = KeyPair::from_pkcs8_pem_and_sign_algo(key_pem, &PKCS_ECDSA_P256_SHA256)
            .map_err(|error| PkiError::InvalidKey(error.to_string()))?;
        {
            let (_, parsed) = x509_parser::parse_x509_certificate(&certificate)
                .map_err(|error| PkiError::InvalidCertificate(error.to_string()))?;
            if !parsed.is_ca() {
                return Err(PkiError::NotACa);
            }
            if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
                return Err(PkiError::KeyMismatch);
            }
        }
        let issuer = Issuer::from_ca_cert_der(&certificate, key)?;
        Ok(Self {
            certificate,
            issuer,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.certificate)
    }

    /// The CA's private key, PKCS#8 PEM. Secret: store it with owner-only permissions.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.certificate.clone()
    }

    /// The SHA-256 fingerprint that join tokens pin.
    pub fn fingerprint(&self) -> CaFingerprint {
        CaFingerprint::of(&self.certificate)
    }

    /// Signs a certificate for server `server_id` over the given SubjectPublicKeyInfo DER (an
    /// ECDSA P-256 key). SANs: DNS [`SERVER_NAME`] (the name every peer verifies) and DNS
    /// `server-<id>.bootmesh` (which member it is); extended key usages serverAuth and
    /// clientAuth, since members both accept and open connections; valid for about 5 years.
    ///
    /// The caller must have authorised the request (a valid join token): the CA does not
    /// require proof that the requester holds the private key, because a certificate for a
    /// key one does not hold is useless to its holder.
    pub fn issue_server_certificate(
        &self,
        server_id: u64,
        subject_public_key_info_der: &[u8],
    ) -> Result<CertificateDer<'static>, PkiError> {
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(subject_public_key_info_der)
            .map_err(|error| PkiError::InvalidPublicKey(error.to_string()))?;
        if public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(PkiError::InvalidPublicKey(
                "not an ECDSA P-256 key".to_owned(),
            ));
        }
        // An uncompressed P-256 point: 0x04, then 32 bytes each of x and y. Rejecting other
        // shapes early keeps junk out of certificates the CA signs.
        let point = public_key.der_bytes();
        if point.len() != 65 || point.first() != Some(&0x04) {
            return Err(PkiError::InvalidPublicKey(
                "not an uncompressed P-256 point".to_owned(),
            ));
        }

        let mut params =
            CertificateParams::new(vec![SERVER_NAME.to_owned(), server_dns_name(server_id)])?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("bootmesh server {server_id}"));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        set_validity(&mut params, SystemClock.wall_now(), SERVER_LIFETIME)?;
        let certificate = params.signed_by(&public_key, &self.issuer)?;
        Ok(certificate.der().clone())
    }
}

/// A server's key pair (ECDSA P-256), generated on the server itself.
pub struct ServerKey {
    key: KeyPair,
}

impl fmt::Debug for ServerKey {
    // Only the public half is safe to show.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let public_key_sha256 = Sha256::digest(self.subject_public_key_info_der());
        f.debug_struct("ServerKey")
            .field("public_key_sha256", &to_hex(&public_key_sha256))
            .field("private_key", &"<redacted>")
            .finish()
    }
}

impl ServerKey {
    /// Generates a fresh ECDSA P-256 key pair.
    pub fn generate() -> Result<Self, PkiError> {
        Ok(Self {
            key: KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?,
        })
    }

    /// Loads a key from PKCS#8 PEM (as written by [`ServerKey::to_pem`]).
    pub fn from_pem(pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pkcs8_pem_and_sign_algo(pem, &PKCS_ECDSA_P256_SHA256)
            .map_err(|error| PkiError::InvalidKey(error.to_string()))?;
        Ok(Self { key })
    }

    /// The private key, PKCS#8 PEM. Secret: store it with owner-only permissions.
    pub fn to_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The public key as SubjectPublicKeyInfo DER: what a joiner sends to be certified.
    pub fn subject_public_key_info_der(&self) -> Vec<u8> {
        self.key.subject_public_key_info()
    }

    /// The private key as PKCS#8 DER, for rustls.
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }
}

/// What a server needs for mutual TLS with its peers: its certificate, its key and the CA.
pub struct ServerIdentity {
    /// The server id named by the certificate (its `server-<id>.bootmesh` SAN); read-only in
    /// spirit: the certificate, not this field, is what peers see.
    pub server_id: u64,
    certificate: CertificateDer<'static>,
    key: ServerKey,
    ca_certificate: CertificateDer<'static>,
}

impl fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("server_id", &self.server_id)
            .field("ca", &self.ca_fingerprint().to_hex())
            .field("key", &self.key)
            .finish()
    }
}

impl ServerIdentity {
    /// A key only this server can compute, the same across restarts: QUIC stateless reset
    /// tokens derived from it let a restarted server end its peers' stale connections at once.
    pub fn stateless_reset_key(&self) -> [u8; 32] {
        blake3::derive_key(
            "bootmesh 2026 cluster QUIC stateless reset key",
            self.key.key.serialize_der().as_slice(),
        )
    }

    /// Assembles an identity after checking that it will work: the certificate must verify
    /// under the CA (now, as a server certificate for [`SERVER_NAME`] and as a client
    /// certificate), belong to `key`, and name a server id.
    pub fn new(
        certificate: CertificateDer<'static>,
        key: ServerKey,
        ca_certificate: CertificateDer<'static>,
    ) -> Result<Self, PkiError> {
        {
            let (_, parsed) = x509_parser::parse_x509_certificate(&certificate)
                .map_err(|error| PkiError::InvalidCertificate(error.to_string()))?;
            if parsed.public_key().raw != key.subject_public_key_info_der().as_slice() {
                return Err(PkiError::KeyMismatch);
            }
        }

        let provider = ring_provider();
        let roots = Arc::new(root_store(&ca_certificate)?);
        let now = unix_time(SystemClock.wall_now())?;
        // Verify exactly as peers will, in both roles, so a bad certificate fails at startup
        // rather than as mysterious handshake failures later.
        let as_server =
            WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
        as_server
            .verify_server_cert(&certificate, &[], &server_name()?, &[], now)
            .map_err(PkiError::NotIssuedByCa)?;
        let as_client = WebPkiClientVerifier::builder_with_provider(roots, provider).build()?;
        as_client
            .verify_client_cert(&certificate, &[], now)
            .map_err(PkiError::NotIssuedByCa)?;

        let server_id = server_id_of(&certificate).ok_or(PkiError::MissingServerId)?;
        Ok(Self {
            server_id,
            certificate,
            key,
            ca_certificate,
        })
    }

    /// This server's certificate, DER.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.certificate
    }

    /// The cluster CA's certificate, DER.
    pub fn ca_certificate(&self) -> &CertificateDer<'static> {
        &self.ca_certificate
    }

    /// The cluster CA's fingerprint, for minting join tokens.
    pub fn ca_fingerprint(&self) -> CaFingerprint {
        CaFingerprint::of(&self.ca_certificate)
    }

    /// This server's key.
    pub fn key(&self) -> &ServerKey {
        &self.key
    }

    /// The TLS 1.3 server configuration. Client certificates are verified against the CA when
    /// offered, but clients without one are let in too, because joiners have no certificate
    /// yet. The application must therefore check `peer_certificates()` (and [`server_id_of`])
    /// before serving anything but the join request. Presents the chain [leaf, CA] so a joiner
    /// can find the CA its token pins.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<ServerConfig, PkiError> {
        let provider = ring_provider();
        let roots = Arc::new(root_store(&self.ca_certificate)?);
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .allow_unauthenticated()
            .build()?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(
                vec![self.certificate.clone(), self.ca_certificate.clone()],
                self.key.private_key_der(),
            )?;
        config.alpn_protocols = alpn_list(alpn);
        Ok(config)
    }

    /// The TLS 1.3 client configuration for connections between members: presents this
    /// server's certificate and accepts a server only if its certificate verifies under the CA
    /// for [`SERVER_NAME`], which is the server name the caller must connect with.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Result<ClientConfig, PkiError> {
        let provider = ring_provider();
        let roots = root_store(&self.ca_certificate)?;
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![self.certificate.clone()], self.key.private_key_der())?;
        config.alpn_protocols = alpn_list(alpn);
        Ok(config)
    }
}

/// The server id in a peer's certificate, from its `server-<id>.bootmesh` SAN. Meant for
/// connections where rustls already verified the chain; it checks nothing itself. `None` if
/// the certificate does not parse, names no server id, or names more than one.
pub fn server_id_of(certificate: &CertificateDer<'_>) -> Option<u64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate).ok()?;
    let names = parsed.subject_alternative_name().ok()??;
    let mut found = None;
    for name in &names.value.general_names {
        let GeneralName::DNSName(dns_name) = name else {
            continue;
        };
        let Some(digits) = dns_name
            .strip_prefix(SERVER_SAN_PREFIX)
            .and_then(|rest| rest.strip_suffix(SERVER_SAN_SUFFIX))
        else {
            continue;
        };
        // Garbled or repeated ids make the certificate ambiguous: refuse rather than guess.
        let id = parse_canonical_u64(digits)?;
        if found.replace(id).is_some() {
            return None;
        }
    }
    found
}

/// Where a joiner finds the CA certificate it pinned, once the handshake has verified the
/// server. Shared with the verifier inside the joiner's [`ClientConfig`].
#[derive(Debug, Clone, Default)]
pub struct PinnedCa {
    matched: Arc<Mutex<Option<CertificateDer<'static>>>>,
}

impl PinnedCa {
    /// The CA certificate (DER) whose SHA-256 matched the pin, if a server chain contained it.
    /// Because the pin is over the exact bytes, the value is authentic even if the handshake
    /// failed afterwards; check the handshake result before trusting the server, though.
    pub fn ca_certificate(&self) -> Option<CertificateDer<'static>> {
        self.lock().clone()
    }

    fn store(&self, certificate: CertificateDer<'static>) {
        *self.lock() = Some(certificate);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<CertificateDer<'static>>> {
        // The guarded value is a plain Option, consistent even if a holder panicked.
        self.matched.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The client configuration for a joiner: presents no client certificate, and accepts the
/// server only if its chain contains a certificate whose SHA-256 equals `pinned` and the leaf
/// verifies (as a server certificate for [`SERVER_NAME`], whatever server name the caller
/// passed) with that certificate as the only root. Session resumption is off so every
/// handshake runs the verifier and fills the returned [`PinnedCa`].
pub fn joiner_client_config(
    pinned: CaFingerprint,
    alpn: &[&[u8]],
) -> Result<(ClientConfig, PinnedCa), PkiError> {
    let provider = ring_provider();
    let matched = PinnedCa::default();
    let verifier = Arc::new(PinnedCaVerifier {
        pinned,
        provider: provider.clone(),
        matched: matched.clone(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = alpn_list(alpn);
    Ok((config, matched))
}

/// Verifies a server against the CA pinned by a join token, before the joiner has the CA.
#[derive(Debug)]
struct PinnedCaVerifier {
    pinned: CaFingerprint,
    provider: Arc<CryptoProvider>,
    matched: PinnedCa,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|certificate| CaFingerprint::of(certificate) == self.pinned)
        else {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(PkiError::CaFingerprintMismatch)),
            )));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone())?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|error| rustls::Error::General(error.to_string()))?;
        // The leaf must chain directly to the pinned CA: the other certificates the server sent
        // are not offered as intermediates.
        let verified = verifier.verify_server_cert(
            end_entity,
            &[],
            &server_name().map_err(|error| rustls::Error::General(error.to_string()))?,
            ocsp_response,
            now,
        )?;
        self.matched.store(ca.clone().into_owned());
        Ok(verified)
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

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The one-time join token a person copies to a new server:
/// `bmjoin1.<64 hex CA fingerprint>.<32 hex secret>`. The cluster stores only the secret's
/// hash ([`JoinToken::secret_hash`]).
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// The CA the joiner must find in the server's chain.
    pub ca: CaFingerprint,
    secret: [u8; 16],
}

impl fmt::Debug for JoinToken {
    // The secret is a credential; tokens end up in logs via `?token`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("ca", &self.ca.to_hex())
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl JoinToken {
    /// A new token for the cluster whose CA has fingerprint `ca`, with 128 random bits of
    /// secret from the operating system.
    pub fn generate(ca: CaFingerprint) -> Result<Self, PkiError> {
        let secret = os_random_bytes::<16>().map_err(PkiError::Randomness)?;
        Ok(Self { ca, secret })
    }

    /// A token from its parts, for a server that received the secret over the wire.
    pub fn from_parts(ca: CaFingerprint, secret: [u8; 16]) -> Self {
        Self { ca, secret }
    }

    /// The secret, for sending to the cluster during a join. Never log it.
    pub fn secret(&self) -> &[u8; 16] {
        &self.secret
    }

    /// The text form, `bmjoin1.<ca hex>.<secret hex>`.
    pub fn encode(&self) -> String {
        format!(
            "{TOKEN_PREFIX}.{}.{}",
            self.ca.to_hex(),
            to_hex(&self.secret)
        )
    }

    /// Parses the text form. Surrounding whitespace is ignored (tokens get pasted with
    /// newlines); hex may be either case.
    pub fn parse(text: &str) -> Result<Self, PkiError> {
        let mut fields = text.trim().split('.');
        let (Some(prefix), Some(ca), Some(secret), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(PkiError::InvalidToken(
                "expected three dot-separated fields: bmjoin1.<ca>.<secret>",
            ));
        };
        if prefix != TOKEN_PREFIX {
            return Err(PkiError::InvalidToken("it does not start with bmjoin1"));
        }
        if ca.len() != 64 {
            return Err(PkiError::InvalidToken(
                "the CA fingerprint must be 64 hex characters",
            ));
        }
        let ca = decode_hex(ca)
            .map(CaFingerprint)
            .ok_or(PkiError::InvalidToken(
                "the CA fingerprint is not hexadecimal",
            ))?;
        if secret.len() != 32 {
            return Err(PkiError::InvalidToken(
                "the secret must be 32 hex characters",
            ));
        }
        let secret =
            decode_hex(secret).ok_or(PkiError::InvalidToken("the secret is not hexadecimal"))?;
        Ok(Self { ca, secret })
    }

    /// SHA-256 of the secret, lowercase hex: what the cluster stores instead of the secret, so
    /// a leaked cluster state does not leak usable tokens.
    pub fn secret_hash(&self) -> String {
        to_hex(&Sha256::digest(self.secret))
    }

    /// Whether this token's secret hashes to `stored_hash_hex`. The comparison is constant
    /// time so response timing reveals nothing about the stored hash.
    pub fn secret_matches(&self, stored_hash_hex: &str) -> bool {
        let Some(stored) = decode_hex::<32>(stored_hash_hex) else {
            return false;
        };
        let ours: [u8; 32] = Sha256::digest(self.secret).into();
        constant_time_eq::constant_time_eq_32(&ours, &stored)
    }
}

/// A fresh provider per configuration: explicit, and independent of any process-wide default
/// (which might be unset, or aws-lc in another binary).
fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_name() -> Result<ServerName<'static>, PkiError> {
    ServerName::try_from(SERVER_NAME)
        .map_err(|error| PkiError::InvalidCertificate(format!("server name: {error}")))
}

fn server_dns_name(server_id: u64) -> String {
    format!("{SERVER_SAN_PREFIX}{server_id}{SERVER_SAN_SUFFIX}")
}

fn root_store(ca_certificate: &CertificateDer<'static>) -> Result<RootCertStore, PkiError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(ca_certificate.clone())
        .map_err(|error| PkiError::InvalidCertificate(format!("CA certificate: {error}")))?;
    Ok(roots)
}

fn alpn_list(alpn: &[&[u8]]) -> Vec<Vec<u8>> {
    alpn.iter().map(|protocol| protocol.to_vec()).collect()
}

fn unix_time(now: SystemTime) -> Result<UnixTime, PkiError> {
    let since_epoch = now
        .duration_since(UNIX_EPOCH)
        .map_err(|_| PkiError::ClockOutOfRange)?;
    Ok(UnixTime::since_unix_epoch(since_epoch))
}

/// Sets `[now - BACKDATE, now + lifetime]`, refusing clocks whose dates would overflow
/// (rcgen's date type panics on overflow).
fn set_validity(
    params: &mut CertificateParams,
    now: SystemTime,
    lifetime: Duration,
) -> Result<(), PkiError> {
    let since_epoch = now
        .duration_since(UNIX_EPOCH)
        .map_err(|_| PkiError::ClockOutOfRange)?;
    let until = since_epoch
        .checked_add(lifetime)
        .filter(|until| *until <= LAST_CERTIFICATE_INSTANT)
        .ok_or(PkiError::ClockOutOfRange)?;
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + since_epoch.saturating_sub(BACKDATE);
    params.not_after = epoch + until;
    Ok(())
}

/// A random positive 16-byte serial: unique without coordination between issuers.
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = os_random_bytes::<16>().map_err(PkiError::Randomness)?;
    // Clear the sign bit (serials are positive) and set the next one so the serial is never
    // zero and always encodes in exactly 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from(bytes.to_vec()))
}

/// Accepts only the canonical decimal form (no sign, no leading zeros), so each id has exactly
/// one name.
fn parse_canonical_u64(digits: &str) -> Option<u64> {
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    if digits.len() > 1 && digits.starts_with('0') {
        return None;
    }
    digits.parse().ok()
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

/// Decodes exactly `2 * N` hex digits (either case).
fn decode_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    fn nibble(digit: u8) -> Option<u8> {
        match digit {
            b'0'..=b'9' => Some(digit - b'0'),
            b'a'..=b'f' => Some(digit - b'a' + 10),
            b'A'..=b'F' => Some(digit - b'A' + 10),
            _ => None,
        }
    }
    let digits = text.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let mut bytes = [0u8; N];
    for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(bytes)
}

/// PEM with 64-character lines. Written here because no PEM encoder is among our direct
/// dependencies (rustls's `pki_types` only decodes).
fn pem_encode(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut base64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let b0 = chunk[0];
        let b1 = chunk.get(1).copied().unwrap_or(0);
        let b2 = chunk.get(2).copied().unwrap_or(0);
        let group = (u32::from(b0) << 16) | (u32::from(b1) << 8) | u32::from(b2);
        for (index, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            // A chunk of n bytes yields n + 1 significant characters; the rest is padding.
            if index <= chunk.len() {
                base64.push(ALPHABET[((group >> shift) & 0x3f) as usize]);
            } else {
                base64.push(b'=');
            }
        }
    }
    let mut text = format!("-----BEGIN {label}-----\n");
    for line in base64.chunks(64) {
        text.push_str(&String::from_utf8_lossy(line));
        text.push('\n');
    }
    text.push_str(&format!("-----END {label}-----\n"));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io;

    use rustls::{ClientConnection, ServerConnection};

    const ALPN: &[u8] = b"bootmesh-test/1";

    fn identity(ca: &ClusterCa, server_id: u64) -> ServerIdentity {
        let key = ServerKey::generate().unwrap();
        let certificate = ca
            .issue_server_certificate(server_id, &key.subject_public_key_info_der())
            .unwrap();
        ServerIdentity::new(certificate, key, ca.cert_der()).unwrap()
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Side {
        Client,
        Server,
    }

    /// Moves all pending bytes from one connection to the other; reports whether any moved.
    fn transfer<A, B>(
        from: &mut rustls::ConnectionCommon<A>,
        to: &mut rustls::ConnectionCommon<B>,
    ) -> Result<bool, rustls::Error> {
        let mut moved = false;
        while from.wants_write() {
            let mut buffer = Vec::new();
            from.write_tls(&mut buffer).unwrap();
            let mut reader = io::Cursor::new(buffer);
            while (reader.position() as usize) < reader.get_ref().len() {
                to.read_tls(&mut reader).unwrap();
                to.process_new_packets()?;
            }
            moved = true;
        }
        Ok(moved)
    }

    /// Runs a handshake in memory; the error says which side gave up.
    fn handshake(
        client: &mut ClientConnection,
        server: &mut ServerConnection,
    ) -> Result<(), (Side, rustls::Error)> {
        for _ in 0..32 {
            let to_server =
                transfer(&mut **client, &mut **server).map_err(|error| (Side::Server, error))?;
            let to_client =
                transfer(&mut **server, &mut **client).map_err(|error| (Side::Client, error))?;
            if !to_server && !to_client && !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
        }
        Err((
            Side::Client,
            rustls::Error::General("the handshake did not finish".to_owned()),
        ))
    }

    fn connect(
        client_config: ClientConfig,
        server_config: ServerConfig,
    ) -> (
        ClientConnection,
        ServerConnection,
        Result<(), (Side, rustls::Error)>,
    ) {
        let mut client =
            ClientConnection::new(Arc::new(client_config), server_name().unwrap()).unwrap();
        let mut server = ServerConnection::new(Arc::new(server_config)).unwrap();
        let result = handshake(&mut client, &mut server);
        (client, server, result)
    }

    #[test]
    fn issued_certificate_builds_an_identity_with_its_server_id() {
        let ca = ClusterCa::generate("lab").unwrap();
        let identity = identity(&ca, 42);
        assert_eq!(identity.server_id, 42);
        assert_eq!(server_id_of(identity.certificate()), Some(42));
        assert_eq!(identity.ca_fingerprint(), ca.fingerprint());

        let (_, parsed) = x509_parser::parse_x509_certificate(identity.certificate()).unwrap();
        let names: Vec<String> = parsed
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|name| name.to_string())
            .collect();
        assert_eq!(
            names,
            ["DNSName(bootmesh-server)", "DNSName(server-42.bootmesh)"]
        );
        assert!(!parsed.is_ca());
    }

    #[test]
    fn ca_certificate_is_a_path_length_zero_ca() {
        let ca = ClusterCa::generate("lab").unwrap();
        let der = ca.cert_der();
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        let constraints = parsed.basic_constraints().unwrap().unwrap().value;
        assert!(constraints.ca);
        assert_eq!(constraints.path_len_constraint, Some(0));
        assert!(parsed.key_usage().unwrap().unwrap().value.key_cert_sign());
        assert_eq!(ca.fingerprint(), CaFingerprint::of(&der));
    }

    #[test]
    fn certificate_from_another_ca_is_refused() {
        let ca = ClusterCa::generate("lab").unwrap();
        let other = ClusterCa::generate("lab").unwrap();
        let key = ServerKey::generate().unwrap();
        let certificate = other
            .issue_server_certificate(1, &key.subject_public_key_info_der())
            .unwrap();
        let error = ServerIdentity::new(certificate, key, ca.cert_der()).unwrap_err();
        assert!(matches!(error, PkiError::NotIssuedByCa(_)), "{error}");
    }

    #[test]
    fn key_that_does_not_match_is_refused() {
        let ca = ClusterCa::generate("lab").unwrap();
        let key = ServerKey::generate().unwrap();
        let certificate = ca
            .issue_server_certificate(1, &key.subject_public_key_info_der())
            .unwrap();
        let wrong_key = ServerKey::generate().unwrap();
        let error = ServerIdentity::new(certificate, wrong_key, ca.cert_der()).unwrap_err();
        assert!(matches!(error, PkiError::KeyMismatch), "{error}");
    }

    #[test]
    fn ca_certificate_is_not_a_server_identity() {
        let ca = ClusterCa::generate("lab").unwrap();
        let key = ServerKey::from_pem(&ca.key_pem()).unwrap();
        assert!(ServerIdentity::new(ca.cert_der(), key, ca.cert_der()).is_err());
    }

    #[test]
    fn ca_round_trips_through_pem_and_keeps_issuing() {
        let ca = ClusterCa::generate("lab").unwrap();
        let loaded = ClusterCa::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(loaded.fingerprint(), ca.fingerprint());
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        // A certificate from the reloaded CA verifies under the original certificate.
        let identity = identity(&loaded, 7);
        assert_eq!(identity.server_id, 7);
    }

    #[test]
    fn ca_from_pem_refuses_mismatched_or_non_ca_input() {
        let ca = ClusterCa::generate("lab").unwrap();
        let other = ClusterCa::generate("lab").unwrap();
        assert!(matches!(
            ClusterCa::from_pem(&ca.cert_pem(), &other.key_pem()),
            Err(PkiError::KeyMismatch)
        ));
        let key = ServerKey::generate().unwrap();
        let leaf = ca
            .issue_server_certificate(3, &key.subject_public_key_info_der())
            .unwrap();
        assert!(matches!(
            ClusterCa::from_pem(&pem_encode("CERTIFICATE", &leaf), &key.to_pem()),
            Err(PkiError::NotACa)
        ));
        assert!(ClusterCa::from_pem("not pem", &ca.key_pem()).is_err());
        assert!(ClusterCa::from_pem(&ca.cert_pem(), "not pem").is_err());
    }

    #[test]
    fn debug_output_hides_private_keys() {
        let ca = ClusterCa::generate("lab").unwrap();
        let key = ServerKey::generate().unwrap();
        let key_pem = key.to_pem();
        let key_body = key_pem.lines().nth(1).unwrap();
        assert!(!format!("{key:?}").contains(key_body));
        let ca_body = ca.key_pem().lines().nth(1).unwrap().to_owned();
        assert!(!format!("{ca:?}").contains(&ca_body));
        assert!(format!("{ca:?}").contains("<redacted>"));
    }

    #[test]
    fn server_key_round_trips_through_pem() {
        let key = ServerKey::generate().unwrap();
        let loaded = ServerKey::from_pem(&key.to_pem()).unwrap();
        assert_eq!(
            loaded.subject_public_key_info_der(),
            key.subject_public_key_info_der()
        );
        assert!(ServerKey::from_pem("garbage").is_err());
    }

    #[test]
    fn pem_encoding_matches_rcgen() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let certificate = CertificateParams::new(vec!["x.example".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(
            pem_encode("CERTIFICATE", certificate.der()).replace("\r\n", "\n"),
            certificate.pem().replace("\r\n", "\n")
        );
        // Every padding case.
        assert!(pem_encode("X", b"a").contains("\nYQ==\n"));
        assert!(pem_encode("X", b"ab").contains("\nYWI=\n"));
        assert!(pem_encode("X", b"abc").contains("\nYWJj\n"));
    }

    #[test]
    fn issuing_refuses_bad_public_keys() {
        let ca = ClusterCa::generate("lab").unwrap();
        assert!(matches!(
            ca.issue_server_certificate(1, b"not der"),
            Err(PkiError::InvalidPublicKey(_))
        ));
        let ed25519 = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        assert!(matches!(
            ca.issue_server_certificate(1, &ed25519.subject_public_key_info()),
            Err(PkiError::InvalidPublicKey(_))
        ));
    }

    #[test]
    fn server_id_of_rejects_garbage_and_ambiguity() {
        assert_eq!(server_id_of(&CertificateDer::from(vec![1, 2, 3])), None);
        // The CA certificate names no server.
        let ca = ClusterCa::generate("lab").unwrap();
        assert_eq!(server_id_of(&ca.cert_der()), None);

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let with_names = |names: &[&str]| {
            let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
            let certificate = CertificateParams::new(names)
                .unwrap()
                .self_signed(&key)
                .unwrap();
            server_id_of(certificate.der())
        };
        assert_eq!(
            with_names(&["bootmesh-server", "server-9.bootmesh"]),
            Some(9)
        );
        assert_eq!(with_names(&["server-0.bootmesh"]), Some(0));
        assert_eq!(with_names(&["server-x.bootmesh"]), None);
        assert_eq!(with_names(&["server-09.bootmesh"]), None);
        assert_eq!(with_names(&["server-99999999999999999999.bootmesh"]), None);
        assert_eq!(
            with_names(&["server-1.bootmesh", "server-2.bootmesh"]),
            None
        );
        assert_eq!(with_names(&["bootmesh-server"]), None);
    }

    #[test]
    fn fingerprint_hex_round_trips() {
        let fingerprint = CaFingerprint([0xab; 32]);
        assert_eq!(fingerprint.to_hex(), "ab".repeat(32));
        assert_eq!(
            CaFingerprint::from_hex(&fingerprint.to_hex()).unwrap(),
            fingerprint
        );
        assert_eq!(
            CaFingerprint::from_hex(&"AB".repeat(32)).unwrap(),
            fingerprint
        );
        assert!(CaFingerprint::from_hex("ab").is_err());
        assert!(CaFingerprint::from_hex(&"zz".repeat(32)).is_err());
        assert!(CaFingerprint::from_hex(&"é".repeat(32)).is_err());
    }

    #[test]
    fn token_round_trips() {
        let ca = ClusterCa::generate("lab").unwrap();
        let token = JoinToken::generate(ca.fingerprint()).unwrap();
        let text = token.encode();
        assert!(text.starts_with("bmjoin1."));
        assert_eq!(text.len(), "bmjoin1.".len() + 64 + 1 + 32);
        assert_eq!(JoinToken::parse(&text).unwrap(), token);
        assert_eq!(JoinToken::parse(&format!("  {text}\n")).unwrap(), token);
        assert_eq!(
            JoinToken::parse(&text.to_uppercase().replace("BMJOIN1", "bmjoin1")).unwrap(),
            token
        );
        assert_eq!(JoinToken::from_parts(token.ca, *token.secret()), token);
        assert_ne!(JoinToken::generate(ca.fingerprint()).unwrap(), token);
    }

    #[test]
    fn garbled_tokens_are_refused() {
        let ca = "ab".repeat(32);
        let secret = "cd".repeat(16);
        assert!(JoinToken::parse(&format!("bmjoin1.{ca}.{secret}")).is_ok());
        let garbled = [
            String::new(),
            format!("bmjoin2.{ca}.{secret}"),
            format!("BMJOIN1.{ca}.{secret}"),
            format!("{ca}.{secret}"),
            format!("bmjoin1.{ca}.{secret}.extra"),
            format!("bmjoin1.{ca}{secret}"),
            format!("bmjoin1.{}.{secret}", "ab".repeat(31)),
            format!("bmjoin1.{}.{secret}", "ab".repeat(33)),
            format!("bmjoin1.{ca}.{}", "cd".repeat(15)),
            format!("bmjoin1.{ca}.{}", "cd".repeat(17)),
            format!("bmjoin1.{}.{secret}", "zz".repeat(32)),
            format!("bmjoin1.{ca}.{}", "gg".repeat(16)),
            format!("bmjoin1.{ca}.{}é", "cd".repeat(15)),
        ];
        for text in garbled {
            assert!(
                matches!(JoinToken::parse(&text), Err(PkiError::InvalidToken(_))),
                "{text:?} was accepted"
            );
        }
    }

    #[test]
    fn token_debug_redacts_the_secret() {
        let token = JoinToken::from_parts(CaFingerprint([1; 32]), [0x5a; 16]);
        let debug = format!("{token:?}");
        assert!(!debug.contains(&"5a".repeat(16)), "{debug}");
        assert!(!debug.contains("90"), "{debug}"); // 0x5a as decimal
        assert!(debug.contains("<redacted>"));
    }

    #[test]
    fn secret_matches_only_its_own_hash() {
        let token = JoinToken::generate(CaFingerprint([1; 32])).unwrap();
        let other = JoinToken::generate(CaFingerprint([1; 32])).unwrap();
        let stored = token.secret_hash();
        assert_eq!(stored.len(), 64);
        assert!(!stored.contains(&to_hex(token.secret())));
        assert!(token.secret_matches(&stored));
        assert!(token.secret_matches(&stored.to_uppercase()));
        assert!(!other.secret_matches(&stored));
        assert!(!token.secret_matches(""));
        assert!(!token.secret_matches(&stored[..62]));
        assert!(!token.secret_matches(&to_hex(token.secret())));
    }

    #[test]
    fn member_client_handshake_succeeds_and_server_learns_its_id() {
        let ca = ClusterCa::generate("lab").unwrap();
        let server_identity = identity(&ca, 1);
        let client_identity = identity(&ca, 2);
        let (client, server, result) = connect(
            client_identity.client_config(&[ALPN]).unwrap(),
            server_identity.server_config(&[ALPN]).unwrap(),
        );
        result.unwrap();
        assert_eq!(
            client.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        assert_eq!(server.alpn_protocol(), Some(ALPN));
        let client_certificates = server.peer_certificates().unwrap();
        assert_eq!(server_id_of(&client_certificates[0]), Some(2));
        let server_certificates = client.peer_certificates().unwrap();
        assert_eq!(server_id_of(&server_certificates[0]), Some(1));
    }

    #[test]
    fn joiner_with_the_right_pin_gets_the_ca() {
        let ca = ClusterCa::generate("lab").unwrap();
        let server_identity = identity(&ca, 1);
        let (config, pinned) = joiner_client_config(ca.fingerprint(), &[ALPN]).unwrap();
        assert_eq!(pinned.ca_certificate(), None);
        let (_client, server, result) =
            connect(config, server_identity.server_config(&[ALPN]).unwrap());
        result.unwrap();
        assert!(server.peer_certificates().is_none());
        assert_eq!(pinned.ca_certificate(), Some(ca.cert_der()));
    }

    #[test]
    fn joiner_with_a_wrong_pin_fails() {
        let ca = ClusterCa::generate("lab").unwrap();
        let server_identity = identity(&ca, 1);
        let other = ClusterCa::generate("lab").unwrap();
        let (config, pinned) = joiner_client_config(other.fingerprint(), &[ALPN]).unwrap();
        let (_, _, result) = connect(config, server_identity.server_config(&[ALPN]).unwrap());
        let (side, error) = result.unwrap_err();
        assert_eq!(side, Side::Client);
        let mismatch = match &error {
            rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
                other.0.downcast_ref::<PkiError>()
            }
            _ => None,
        };
        assert!(
            matches!(mismatch, Some(PkiError::CaFingerprintMismatch)),
            "{error}"
        );
        assert_eq!(pinned.ca_certificate(), None);
    }

    #[test]
    fn joiner_refuses_a_leaf_not_signed_by_the_pinned_ca() {
        // A server that presents the pinned CA but a leaf from elsewhere is an impostor.
        let ca = ClusterCa::generate("lab").unwrap();
        let impostor_ca = ClusterCa::generate("lab").unwrap();
        let impostor = identity(&impostor_ca, 1);
        let server_config = ServerConfig::builder_with_provider(ring_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![impostor.certificate().clone(), ca.cert_der()],
                impostor.key().private_key_der(),
            )
            .unwrap();
        let (config, pinned) = joiner_client_config(ca.fingerprint(), &[]).unwrap();
        let (_, _, result) = connect(config, server_config);
        assert_eq!(result.unwrap_err().0, Side::Client);
        assert_eq!(pinned.ca_certificate(), None);
    }

    #[test]
    fn server_rejects_a_client_certificate_from_another_ca() {
        let ca = ClusterCa::generate("lab").unwrap();
        let server_identity = identity(&ca, 1);
        let other = ClusterCa::generate("lab").unwrap();
        let stranger = identity(&other, 2);
        // The stranger trusts our CA, so the rejection must come from the server.
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der()).unwrap();
        let client_config = ClientConfig::builder_with_provider(ring_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![stranger.certificate().clone()],
                stranger.key().private_key_der(),
            )
            .unwrap();
        let (_, _, result) = connect(client_config, server_identity.server_config(&[]).unwrap());
        let (side, error) = result.unwrap_err();
        assert_eq!(side, Side::Server);
        assert!(
            matches!(error, rustls::Error::InvalidCertificate(_)),
            "{error}"
        );
    }

    #[test]
    fn member_refuses_a_server_from_another_ca() {
        let ca = ClusterCa::generate("lab").unwrap();
        let member = identity(&ca, 1);
        let other = ClusterCa::generate("lab").unwrap();
        let foreign_server = identity(&other, 2);
        let (_, _, result) = connect(
            member.client_config(&[]).unwrap(),
            foreign_server.server_config(&[]).unwrap(),
        );
        assert_eq!(result.unwrap_err().0, Side::Client);
    }
}
