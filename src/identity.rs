//! Site identity and the TLS that rests on it.
//!
//! Every site owns a certificate authority (ECDSA P-256, made by rcgen at `init`) and an
//! agent certificate that CA signs. Links are mutual TLS 1.3 inside QUIC: the dialer pins the
//! peer's CA (learned from the token it redeemed) and the acceptor admits a client certificate
//! only when it chains to the CA of a site it has linked with ([`PeerTrust`]). Trust changes
//! at run time (a redemption adds a CA, `link remove` drops one), so the verifier reads a
//! shared, swappable set rather than a fixed root store. A client certificate that does not
//! chain to a trusted CA fails the handshake. A client may also present none: that is how a
//! redeemer connects, proving its certificate's key instead by signing the connection's TLS
//! exporter ([`SiteIdentity::sign`], [`verify_signature`]); such a connection can do nothing
//! but redeem, which the agent enforces after the handshake.

use crate::role::Role;
use std::sync::{Arc, RwLock};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName as TlsDn, RootCertStore, SignatureScheme};

use crate::state::{StateDir, StateError, write_new};

/// Errors creating or loading a site identity, or building TLS from it.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("generating certificates: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{what}: not a valid PEM certificate or key")]
    Pem { what: String },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error(
        "state dir {dir} already holds a site ({file} exists); refusing to overwrite it. \
         Use another --state, or remove the directory to start over"
    )]
    Exists { dir: String, file: String },
}

/// URI subject-alternative name that marks a **member** certificate: one a gateway hands to
/// its sidecars (`causeway sidecar credentials`). A member may link only to its own site's
/// gateway; it can neither issue tokens nor pass as its site towards other sites.
pub const MEMBER_URI: &str = "urn:causeway:role:member";

/// The crypto provider used everywhere: ring only, so that rustls never sees two providers.
///
/// Links prefer AES-128-GCM (QUIC's mandatory suite, and what `ssh` and Go's TLS pick first)
/// over ring's default first choice, AES-256-GCM: ten AES rounds per block instead of fourteen,
/// on a data path where every 1,452-byte packet is sealed and opened once. With ring's VAES
/// code the saving is small (AEAD fell from ~15% to ~14% of the agents' CPU in a bulk
/// transfer), but it is free. AES-256-GCM and ChaCha20-Poly1305 stay on offer after it.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

/// A site's own keys and certificates, loaded from its state directory.
pub struct SiteIdentity {
    /// The site id the agent certificate was issued for; peers verify it as the server name.
    pub site: String,
    /// The site CA certificate in PEM, as written into tokens.
    pub ca_pem: String,
    /// The site CA certificate in DER, to recognise our own members and to refuse self-links.
    pub ca_der: CertificateDer<'static>,
    /// The agent certificate in PEM, sent when redeeming.
    pub cert_pem: String,
    /// The agent certificate followed by the CA certificate: the chain presented on links.
    pub chain: Vec<CertificateDer<'static>>,
    /// The agent's private key (PKCS#8).
    pub key: PrivateKeyDer<'static>,
    /// What these credentials are for: a member certificate (issued by a gateway with
    /// `causeway sidecar credentials`) makes a sidecar.
    pub role: Role,
}

impl std::fmt::Debug for SiteIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteIdentity")
            .field("site", &self.site)
            .finish_non_exhaustive()
    }
}

impl Clone for SiteIdentity {
    fn clone(&self) -> Self {
        SiteIdentity {
            site: self.site.clone(),
            ca_pem: self.ca_pem.clone(),
            ca_der: self.ca_der.clone(),
            cert_pem: self.cert_pem.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            role: self.role,
        }
    }
}

/// Creates the site CA and agent certificate in `state`, refusing to overwrite a site.
pub fn create(state: &StateDir, site: &str) -> Result<(), IdentityError> {
    for path in [state.ca_cert(), state.ca_key(), state.agent_cert(), state.agent_key()] {
        if path.exists() {
            return Err(IdentityError::Exists {
                dir: state.root.display().to_string(),
                file: path
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            });
        }
    }
    state.create()?;

    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name = dn(&format!("causeway site CA {site}"));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let agent_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let agent_cert = leaf_params(site, &format!("causeway agent {site}"))?.signed_by(&agent_key, &issuer)?;

    write_new(&state.ca_key(), ca_key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&state.ca_cert(), ca_cert.pem().as_bytes(), 0o600)?;
    write_new(&state.agent_key(), agent_key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&state.agent_cert(), agent_cert.pem().as_bytes(), 0o600)?;
    Ok(())
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "causeway");
    dn
}

/// Parameters of a certificate for an agent of `site`: its DNS SAN is the site id, which is
/// the server name peers verify, and it may serve and authenticate as a client.
fn leaf_params(site: &str, common_name: &str) -> Result<CertificateParams, IdentityError> {
    let mut params = CertificateParams::new(vec![site.to_string()])?;
    params.distinguished_name = dn(common_name);
    params.is_ca = IsCa::NoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    Ok(params)
}

/// Loads the identity from `state`.
pub fn load(state: &StateDir) -> Result<SiteIdentity, IdentityError> {
    let read = |path: std::path::PathBuf| -> Result<String, IdentityError> {
        std::fs::read_to_string(&path).map_err(|e| StateError::io(&path, e).into())
    };
    let ca_pem = read(state.ca_cert())?;
    let ca_der = parse_cert_pem(&ca_pem, "ca.crt")?;
    let cert_pem = read(state.agent_cert())?;
    let agent_der = parse_cert_pem(&cert_pem, "agent.crt")?;
    let key = PrivateKeyDer::from_pem_slice(read(state.agent_key())?.as_bytes()).map_err(|_| IdentityError::Pem {
        what: state.agent_key().display().to_string(),
    })?;
    let site = cert_dns_name(&agent_der).ok_or_else(|| IdentityError::Pem {
        what: format!("{} (no site name in the certificate)", state.agent_cert().display()),
    })?;
    let role = if is_member_cert(&agent_der) {
        Role::Sidecar
    } else {
        Role::Gateway
    };
    let chain = vec![agent_der, ca_der.clone()];
    Ok(SiteIdentity {
        site,
        ca_pem,
        ca_der,
        cert_pem,
        chain,
        key,
        role,
    })
}

/// A sidecar's credentials: the site CA certificate, and a member certificate and key it
/// signed. The same three files, under the same names, as a state directory holds.
pub struct MemberCredentials {
    pub site: String,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Issues member credentials from a gateway's state (which must hold the site CA key).
pub fn issue_member(state: &StateDir) -> Result<MemberCredentials, IdentityError> {
    let gateway = load(state)?;
    if gateway.role == Role::Sidecar {
        return Err(IdentityError::Tls(
            "this state holds member credentials: run `sidecar credentials` on the site's gateway".into(),
        ));
    }
    let ca_key_path = state.ca_key();
    let ca_key_pem = std::fs::read_to_string(&ca_key_path).map_err(|e| StateError::io(&ca_key_path, e))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&gateway.ca_pem, &ca_key)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = leaf_params(&gateway.site, &format!("causeway member {}", gateway.site))?;
    params
        .subject_alt_names
        .push(rcgen::SanType::URI(rcgen::string::Ia5String::try_from(MEMBER_URI)?));
    let cert = params.signed_by(&key, &issuer)?;
    Ok(MemberCredentials {
        site: gateway.site,
        ca_pem: gateway.ca_pem,
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Whether a certificate is a member (sidecar) certificate.
pub fn is_member_cert(der: &CertificateDer<'_>) -> bool {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
        return false;
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return false;
    };
    san.value
        .general_names
        .iter()
        .any(|n| matches!(n, x509_parser::extensions::GeneralName::URI(uri) if *uri == MEMBER_URI))
}

/// Parses one PEM certificate.
pub fn parse_cert_pem(pem: &str, what: &str) -> Result<CertificateDer<'static>, IdentityError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|_| IdentityError::Pem { what: what.to_string() })
}

/// The first DNS subject-alternative name of a certificate: for our certificates, the site id.
pub fn cert_dns_name(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(name) => Some(name.to_string()),
        _ => None,
    })
}

/// A site whose CA this agent trusts, because a token was redeemed one way or the other.
struct TrustedPeer {
    /// The peer's site id, as recorded at redemption.
    site: String,
    /// Verifies client certificates against this one CA only, so that a verified peer is
    /// also identified.
    verifier: Arc<dyn ClientCertVerifier>,
}

/// The set of peer CAs this agent accepts links from, shared by the TLS verifier and the
/// link manager, and changed at run time.
pub struct PeerTrust {
    peers: RwLock<Vec<TrustedPeer>>,
    /// Our own site CA, for the member certificates of our sidecars (gateways only).
    own: RwLock<Option<TrustedPeer>>,
    provider: Arc<CryptoProvider>,
}

/// Who a verified client certificate belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertOwner {
    /// The gateway of a linked site.
    Site(String),
    /// A sidecar of our own site.
    Member,
}

impl std::fmt::Debug for PeerTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTrust").finish_non_exhaustive()
    }
}

impl PeerTrust {
    pub fn new() -> Arc<Self> {
        Arc::new(PeerTrust {
            peers: RwLock::new(Vec::new()),
            own: RwLock::new(None),
            provider: provider(),
        })
    }

    /// Replaces the trusted set with `(site, ca)` pairs.
    pub fn set(&self, peers: &[(String, CertificateDer<'static>)]) -> Result<(), IdentityError> {
        let mut built = Vec::with_capacity(peers.len());
        for (site, ca) in peers {
            built.push(TrustedPeer {
                site: site.clone(),
                verifier: self.single_root_verifier(ca)?,
            });
        }
        match self.peers.write() {
            Ok(mut guard) => *guard = built,
            Err(poisoned) => *poisoned.into_inner() = built,
        }
        Ok(())
    }

    pub fn single_root_verifier(
        &self,
        ca: &CertificateDer<'static>,
    ) -> Result<Arc<dyn ClientCertVerifier>, IdentityError> {
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone())
            .map_err(|e| IdentityError::Tls(format!("peer CA: {e}")))?;
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| IdentityError::Tls(e.to_string()))
    }

    /// Accepts member certificates signed by our own CA (`site`): a gateway's sidecars.
    pub fn set_own(&self, site: &str, ca: &CertificateDer<'static>) -> Result<(), IdentityError> {
        let own = TrustedPeer {
            site: site.to_string(),
            verifier: self.single_root_verifier(ca)?,
        };
        match self.own.write() {
            Ok(mut g) => *g = Some(own),
            Err(p) => *p.into_inner() = Some(own),
        }
        Ok(())
    }

    /// Who `leaf` belongs to: the linked site whose CA issued it (never for a member
    /// certificate, which cannot speak for its site), or one of our own members.
    pub fn identify(&self, leaf: &CertificateDer<'_>) -> Option<CertOwner> {
        self.identify_at(leaf, UnixTime::now())
    }

    fn identify_at(&self, leaf: &CertificateDer<'_>, now: UnixTime) -> Option<CertOwner> {
        let member = is_member_cert(leaf);
        if member {
            let own = match self.own.read() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            return own
                .as_ref()
                .filter(|o| o.verifier.verify_client_cert(leaf, &[], now).is_ok())
                .map(|_| CertOwner::Member);
        }
        let peers = match self.peers.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        peers
            .iter()
            .find(|p| p.verifier.verify_client_cert(leaf, &[], now).is_ok())
            .map(|p| CertOwner::Site(p.site.clone()))
    }
}

/// rustls' view of [`PeerTrust`].
#[derive(Debug)]
struct LinkClientVerifier {
    trust: Arc<PeerTrust>,
}

impl ClientCertVerifier for LinkClientVerifier {
    fn root_hint_subjects(&self) -> &[TlsDn] {
        &[]
    }

    /// Optional: a redeemer connects without a certificate (see the module doc).
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if self.trust.identify_at(end_entity, now).is_some() {
            return Ok(ClientCertVerified::assertion());
        }
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ))
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
            &self.trust.provider.signature_verification_algorithms,
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
            &self.trust.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The acceptor's client-certificate verifier: a certificate must chain to a CA in `trust`
/// (or none may be presented: a redeemer, see the module doc).
pub fn link_client_verifier(trust: Arc<PeerTrust>) -> Arc<dyn ClientCertVerifier> {
    Arc::new(LinkClientVerifier { trust })
}

/// A dialer's server-certificate verifier pinned to one peer CA: the server must present a
/// certificate `peer_ca` signed, for the name dialed (the peer's site id).
///
/// Errors: `peer_ca` is not a usable CA certificate ([`IdentityError::Tls`]).
pub fn pinned_server_verifier(peer_ca: &CertificateDer<'static>) -> Result<Arc<dyn ServerCertVerifier>, IdentityError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(peer_ca.clone())
        .map_err(|e| IdentityError::Tls(format!("peer CA: {e}")))?;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| IdentityError::Tls(e.to_string()))?;
    Ok(verifier)
}

impl SiteIdentity {
    /// The key of this agent's QUIC stateless resets (RFC 9000 §10.3), derived from the agent
    /// key so that it survives a restart: a restarted agent answers packets of its previous
    /// incarnation's connections with resets the peer can verify, and the peer redials at once
    /// instead of waiting out `links.idle_timeout`.
    pub fn stateless_reset_key(&self) -> ring::hmac::Key {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"causeway stateless reset v1\0");
        ctx.update(self.key.secret_der());
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, ctx.finish().as_ref())
    }

    /// Signs `msg` with the agent key (ECDSA P-256, ASN.1 signature).
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, IdentityError> {
        use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
        let rng = ring::rand::SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, self.key.secret_der(), &rng)
            .map_err(|e| IdentityError::Tls(format!("agent key: {e}")))?;
        key.sign(&rng, msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|e| IdentityError::Tls(format!("signing: {e}")))
    }
}

/// Whether `sig` is a valid ECDSA P-256 signature of `msg` by the key of certificate `cert`.
pub fn verify_signature(cert: &CertificateDer<'_>, msg: &[u8], sig: &[u8]) -> bool {
    use ring::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return false;
    };
    let point = parsed.public_key().subject_public_key.data.as_ref();
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, point)
        .verify(msg, sig)
        .is_ok()
}

/// The TLS server name a peer's agent certificate is issued for: its site id.
pub fn server_name(site: &str) -> Result<ServerName<'static>, IdentityError> {
    ServerName::try_from(site.to_string()).map_err(|e| IdentityError::Tls(format!("site name {site:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(dir: &std::path::Path, name: &str) -> SiteIdentity {
        let state = StateDir::new(dir.join(name));
        create(&state, name).unwrap();
        load(&state).unwrap()
    }

    #[test]
    fn create_load_and_refuse_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let id = site(dir.path(), "london");
        assert_eq!(id.site, "london");
        assert_eq!(id.chain.len(), 2);
        let err = create(&StateDir::new(dir.path().join("london")), "london").unwrap_err();
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        use std::os::unix::fs::PermissionsExt;
        for f in ["ca.key", "agent.key", "ca.crt", "agent.crt"] {
            let m = std::fs::metadata(dir.path().join("london").join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(m & 0o777, 0o600, "{f}");
        }
    }

    #[test]
    fn trust_identifies_only_trusted_sites() {
        let dir = tempfile::tempdir().unwrap();
        let london = site(dir.path(), "london");
        let paris = site(dir.path(), "paris");
        let trust = PeerTrust::new();
        assert_eq!(trust.identify(&paris.chain[0]), None);
        trust.set(&[("paris".into(), paris.ca_der.clone())]).unwrap();
        assert_eq!(trust.identify(&paris.chain[0]), Some(CertOwner::Site("paris".into())));
        assert_eq!(trust.identify(&london.chain[0]), None);

        let v = LinkClientVerifier { trust: trust.clone() };
        assert!(
            v.verify_client_cert(&paris.chain[0], &paris.chain[1..], UnixTime::now())
                .is_ok()
        );
        assert!(
            v.verify_client_cert(&london.chain[0], &london.chain[1..], UnixTime::now())
                .is_err()
        );
        // Presenting a trusted CA beside an untrusted leaf does not help.
        assert!(
            v.verify_client_cert(&london.chain[0], &paris.chain[1..], UnixTime::now())
                .is_err()
        );
        trust.set(&[]).unwrap();
        assert!(
            v.verify_client_cert(&paris.chain[0], &paris.chain[1..], UnixTime::now())
                .is_err()
        );
    }

    #[test]
    fn signatures_prove_the_certificate_key() {
        let dir = tempfile::tempdir().unwrap();
        let london = site(dir.path(), "london");
        let paris = site(dir.path(), "paris");
        let sig = london.sign(b"exporter").unwrap();
        assert!(verify_signature(&london.chain[0], b"exporter", &sig));
        assert!(!verify_signature(&london.chain[0], b"other", &sig));
        assert!(!verify_signature(&paris.chain[0], b"exporter", &sig));
        assert!(!verify_signature(&london.chain[0], b"exporter", b"garbage"));
    }

    #[test]
    fn handshakes_negotiate_aes_128_gcm() {
        let dir = tempfile::tempdir().unwrap();
        let london = site(dir.path(), "london");
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(london.chain.clone(), london.key.clone_key())
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(london.ca_der.clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut c = rustls::ClientConnection::new(Arc::new(client), server_name("london").unwrap()).unwrap();
        let mut s = rustls::ServerConnection::new(Arc::new(server)).unwrap();
        for _ in 0..4 {
            let mut wire = Vec::new();
            c.write_tls(&mut wire).unwrap();
            s.read_tls(&mut &wire[..]).unwrap();
            s.process_new_packets().unwrap();
            wire.clear();
            s.write_tls(&mut wire).unwrap();
            c.read_tls(&mut &wire[..]).unwrap();
            c.process_new_packets().unwrap();
        }
        assert!(!c.is_handshaking() && !s.is_handshaking());
        for suite in [c.negotiated_cipher_suite(), s.negotiated_cipher_suite()] {
            assert_eq!(
                suite.map(|s| s.suite()),
                Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
            );
        }
    }

    #[test]
    fn site_name_is_in_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let id = site(dir.path(), "tokyo-1");
        assert_eq!(cert_dns_name(&id.chain[0]).as_deref(), Some("tokyo-1"));
        assert!(server_name("tokyo-1").is_ok());
    }
}

#[cfg(test)]
mod member_tests {
    use super::*;

    #[test]
    fn members_are_trusted_only_by_their_own_gateway_and_never_as_a_site() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("london"));
        create(&state, "london").unwrap();
        let gw = load(&state).unwrap();
        assert_eq!(gw.role, Role::Gateway);
        let creds = issue_member(&state).unwrap();
        let mstate = StateDir::new(dir.path().join("member"));
        mstate.create().unwrap();
        std::fs::write(mstate.ca_cert(), &creds.ca_pem).unwrap();
        std::fs::write(mstate.agent_cert(), &creds.cert_pem).unwrap();
        std::fs::write(mstate.agent_key(), &creds.key_pem).unwrap();
        let member = load(&mstate).unwrap();
        assert_eq!(member.role, Role::Sidecar);
        assert_eq!(member.site, "london");
        assert!(issue_member(&mstate).is_err(), "a member cannot mint members");

        let trust = PeerTrust::new();
        assert_eq!(trust.identify(&member.chain[0]), None);
        trust.set_own("london", &gw.ca_der).unwrap();
        assert_eq!(trust.identify(&member.chain[0]), Some(CertOwner::Member));
        // The gateway's own agent certificate is not a member.
        assert_eq!(trust.identify(&gw.chain[0]), None);
        // Another site that trusts london's CA does not take a member for london.
        let other = PeerTrust::new();
        other.set(&[("london".into(), gw.ca_der.clone())]).unwrap();
        assert_eq!(other.identify(&member.chain[0]), None);
        assert_eq!(other.identify(&gw.chain[0]), Some(CertOwner::Site("london".into())));
    }
}
