//! rustls configurations for every listener and client, built in one place
//! so the protocol choices are the same everywhere:
//!
//! - TLS 1.3, and TLS 1.2 with ECDHE + AEAD suites only (rustls offers no
//!   others: no static RSA, no CBC, no compression, no renegotiation);
//! - the ring provider;
//! - ALPN `h2`, as gRPC needs.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::PkiError;

/// ring, with AES-128-GCM over SHA-256 first. With the listener's own
/// order (`ignore_client_order`) every handshake runs its key schedule on
/// SHA-256, which this class of CPU does in hardware, where ring's
/// SHA-384 runs in software: a resumed handshake spent 7 % of its server
/// time in it. AES-128-GCM is TLS 1.3's mandatory suite; the other suites
/// stay offered, after it.
fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 2,
        _ if s.version() == &rustls::version::TLS13 => 1,
        _ => 3,
    });
    Arc::new(p)
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Parses every certificate in a PEM bundle.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| PkiError::Tls(format!("certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(PkiError::Tls("no certificate in PEM".into()));
    }
    Ok(certs)
}

/// Parses a PKCS#8 / SEC1 / PKCS#1 private key from PEM.
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::Tls(format!("private key PEM: {e}")))
}

fn roots(root_pem: &str) -> Result<Arc<RootCertStore>, PkiError> {
    let mut store = RootCertStore::empty();
    for c in certs_from_pem(root_pem)? {
        store.add(c).map_err(|e| PkiError::Tls(format!("trust anchor: {e}")))?;
    }
    Ok(Arc::new(store))
}

/// The CRL, as PEM, into DER for the verifier.
pub fn crl_from_pem(pem: &str) -> Result<CertificateRevocationListDer<'static>, PkiError> {
    CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::BadCrl(e.to_string()))
}

/// The mutual-TLS listener: a client certificate chaining to `root_pem` is
/// required, and the end-entity certificate is checked against `crl`
/// (unknown status is refused).
///
/// With `tickets`, the listener issues session tickets sealed by those
/// keys and resumes clients presenting one; without, it never resumes (no
/// server-side session cache either way).
/// A resumed connection skips the chain and CRL check, so whoever accepts
/// it must check the certificate the ticket carries (the node's identity
/// check does: issued, not revoked, not expired).
pub fn mtls_server_config(
    root_pem: &str,
    crl: CertificateRevocationListDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    tickets: Option<Arc<crate::tickets::TicketKeys>>,
) -> Result<Arc<ServerConfig>, PkiError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(root_pem)?, provider())
        .with_crls([crl])
        // The CRL is the issuing intermediate's and covers end entities;
        // the intermediate itself is pinned by the root.
        .only_check_end_entity_revocation()
        .build()
        .map_err(|e| PkiError::Tls(format!("client verifier: {e}")))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| PkiError::Tls(format!("server certificate: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg.ignore_client_order = true;
    // Resumption only through `tickets`: no server-side session cache.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    match tickets {
        // One ticket per connection (rustls sends two by default): a
        // charger holds one connection and presents one ticket when it
        // comes back, and the next connection gives it a fresh one. Each
        // ticket is a seal and a socket write in every handshake.
        Some(tickets) => {
            cfg.ticketer = tickets;
            cfg.send_tls13_tickets = 1;
        }
        None => cfg.send_tls13_tickets = 0,
    }
    Ok(Arc::new(cfg))
}

/// The enrollment listener: server authentication only.
pub fn server_only_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, PkiError> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| PkiError::Tls(format!("server certificate: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// A client of a laddnet node: trusts `root_pem`, presents `identity`
/// (chain PEM, key PEM) when given.
pub fn client_config(root_pem: &str, identity: Option<(&str, &str)>) -> Result<Arc<ClientConfig>, PkiError> {
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(root_pem)?, provider())
        .build()
        .map_err(|e| PkiError::Tls(format!("server verifier: {e}")))?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_webpki_verifier(verifier);
    let mut cfg = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(certs_from_pem(chain)?, key_from_pem(key)?)
            .map_err(|e| PkiError::Tls(format!("client certificate: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}
