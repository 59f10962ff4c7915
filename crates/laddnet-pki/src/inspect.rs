//! Decoders for what peers send us: CSRs, certificates and CRLs. Each
//! returns a precise error on any input and never panics; each has a
//! `cargo fuzz` target (`fuzz/`).

use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION, OID_PKCS1_SHA256WITHRSA,
    OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA, OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384,
    OID_SIG_ECDSA_WITH_SHA512, OID_SIG_ED25519,
};
use x509_parser::prelude::*;
use x509_parser::public_key::PublicKey;

use crate::{CsrPolicy, PkiError};

/// A CSR that passed every check. Only its public key is kept: the
/// certificate is built from policy, never from what the CSR asked for.
#[derive(Debug, Clone)]
pub struct CheckedCsr {
    /// DER SubjectPublicKeyInfo.
    pub spki_der: Vec<u8>,
    /// "EC P-256", "RSA 3072", "Ed25519".
    pub key_description: String,
}

/// Parses a PEM or DER CSR and checks it against policy: a valid
/// self-signature, an accepted key (EC P-256/P-384, RSA ≥ the policy's
/// minimum, Ed25519 if allowed) and no SHA-1 or other weak signature.
pub fn check_csr(input: &[u8], policy: &CsrPolicy) -> Result<CheckedCsr, PkiError> {
    let der = decode_pem_or_der(input, "CERTIFICATE REQUEST")
        .map_err(|e| PkiError::BadCsr(format!("not a PEM or DER CSR: {e}")))?;
    let (rest, csr) =
        X509CertificationRequest::from_der(&der).map_err(|e| PkiError::BadCsr(format!("malformed CSR: {e}")))?;
    if !rest.is_empty() {
        return Err(PkiError::BadCsr("trailing bytes after the CSR".into()));
    }
    let sig = &csr.signature_algorithm.algorithm;
    let strong = [
        OID_SIG_ECDSA_WITH_SHA256,
        OID_SIG_ECDSA_WITH_SHA384,
        OID_SIG_ECDSA_WITH_SHA512,
        OID_PKCS1_SHA256WITHRSA,
        OID_PKCS1_SHA384WITHRSA,
        OID_PKCS1_SHA512WITHRSA,
        OID_SIG_ED25519,
    ];
    if !strong.contains(sig) {
        return Err(PkiError::BadCsr(format!(
            "signature algorithm {sig} is not accepted (SHA-1 and older are refused): sign with ECDSA/SHA-256+, RSA/SHA-256+ or Ed25519"
        )));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let key_oid = &spki.algorithm.algorithm;
    let key_description = if *key_oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| PkiError::BadCsr("EC key without a named curve".into()))?;
        if curve == OID_EC_P256 {
            "EC P-256".to_string()
        } else if curve == OID_NIST_EC_P384 {
            "EC P-384".to_string()
        } else {
            return Err(PkiError::BadCsr(format!(
                "EC curve {curve} is not accepted: use P-256 or P-384"
            )));
        }
    } else if *key_oid == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => rsa.key_size(),
            _ => return Err(PkiError::BadCsr("malformed RSA public key".into())),
        };
        if bits < policy.min_rsa_bits as usize {
            return Err(PkiError::BadCsr(format!(
                "RSA key of {bits} bits is too weak: at least {} required",
                policy.min_rsa_bits
            )));
        }
        format!("RSA {bits}")
    } else if *key_oid == OID_SIG_ED25519 {
        if !policy.allow_ed25519 {
            return Err(PkiError::BadCsr("Ed25519 keys are not accepted by policy".into()));
        }
        "Ed25519".to_string()
    } else {
        return Err(PkiError::BadCsr(format!(
            "key type {key_oid} is not accepted: use EC P-256/P-384 or RSA ≥ 2048"
        )));
    };
    csr.verify_signature()
        .map_err(|_| PkiError::BadCsr("the CSR's self-signature does not verify".into()))?;
    Ok(CheckedCsr {
        spki_der: spki.raw.to_vec(),
        key_description,
    })
}

/// What a peer's certificate says, as far as laddnet cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// Lowercase hex, no leading zero bytes stripped beyond DER's.
    pub serial: String,
    pub common_name: String,
    pub organisation: String,
    pub organisational_unit: String,
    pub not_before: i64,
    pub not_after: i64,
    pub is_ca: bool,
    pub client_auth: bool,
    pub server_auth: bool,
}

/// Parses a DER certificate into a [`CertSummary`].
pub fn summarize_certificate(der: &[u8]) -> Result<CertSummary, PkiError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| PkiError::BadCertificate(format!("malformed certificate: {e}")))?;
    if !rest.is_empty() {
        return Err(PkiError::BadCertificate("trailing bytes after the certificate".into()));
    }
    let first = |it: &mut dyn Iterator<Item = &AttributeTypeAndValue>| {
        it.next().and_then(|a| a.as_str().ok()).unwrap_or_default().to_string()
    };
    let subject = cert.subject();
    let eku = cert
        .extended_key_usage()
        .map_err(|e| PkiError::BadCertificate(format!("extended key usage: {e}")))?;
    let (client_auth, server_auth) = eku
        .map(|e| (e.value.client_auth, e.value.server_auth))
        .unwrap_or((false, false));
    let is_ca = cert
        .basic_constraints()
        .map_err(|e| PkiError::BadCertificate(format!("basic constraints: {e}")))?
        .map(|b| b.value.ca)
        .unwrap_or(false);
    Ok(CertSummary {
        serial: hex::encode(cert.raw_serial()),
        common_name: first(&mut subject.iter_common_name()),
        organisation: first(&mut subject.iter_organization()),
        organisational_unit: first(&mut subject.iter_organizational_unit()),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        is_ca,
        client_auth,
        server_auth,
    })
}

/// What a CRL says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlSummary {
    pub number: u64,
    pub this_update: i64,
    pub next_update: Option<i64>,
    pub revoked_serials: Vec<String>,
}

/// Parses a PEM or DER CRL into a [`CrlSummary`].
pub fn summarize_crl(input: &[u8]) -> Result<CrlSummary, PkiError> {
    let der =
        decode_pem_or_der(input, "X509 CRL").map_err(|e| PkiError::BadCrl(format!("not a PEM or DER CRL: {e}")))?;
    let (rest, crl) = x509_parser::parse_x509_crl(&der).map_err(|e| PkiError::BadCrl(format!("malformed CRL: {e}")))?;
    if !rest.is_empty() {
        return Err(PkiError::BadCrl("trailing bytes after the CRL".into()));
    }
    let number = match crl.crl_number() {
        None => return Err(PkiError::BadCrl("CRL has no CRL number".into())),
        Some(n) => {
            let bytes = n.to_bytes_be();
            if bytes.len() > 8 {
                return Err(PkiError::BadCrl("CRL number above 2^64".into()));
            }
            bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
        }
    };
    Ok(CrlSummary {
        number,
        this_update: crl.last_update().timestamp(),
        next_update: crl.next_update().map(|t| t.timestamp()),
        revoked_serials: crl
            .iter_revoked_certificates()
            .map(|r| hex::encode(r.raw_serial()))
            .collect(),
    })
}

/// Accepts PEM (with the given label) or raw DER.
pub(crate) fn decode_pem_or_der(input: &[u8], label: &str) -> Result<Vec<u8>, String> {
    let trimmed = input.trim_ascii_start();
    if trimmed.starts_with(b"-----BEGIN") {
        let p = ::pem::parse(trimmed).map_err(|e| e.to_string())?;
        if p.tag() != label && !(label == "CERTIFICATE REQUEST" && p.tag() == "NEW CERTIFICATE REQUEST") {
            return Err(format!("PEM block is {:?}, expected {label:?}", p.tag()));
        }
        Ok(p.into_contents())
    } else if input.is_empty() {
        Err("empty input".into())
    } else {
        Ok(input.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData;

    fn policy() -> CsrPolicy {
        crate::Policy::default().csr
    }

    fn csr_for(key: &rcgen::KeyPair) -> String {
        let params = rcgen::CertificateParams::new(vec![]).unwrap();
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    #[test]
    fn accepts_p256_and_p384() {
        for alg in [&rcgen::PKCS_ECDSA_P256_SHA256, &rcgen::PKCS_ECDSA_P384_SHA384] {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let c = check_csr(csr_for(&key).as_bytes(), &policy()).unwrap();
            assert!(c.key_description.starts_with("EC P-"));
            assert_eq!(c.spki_der, key.subject_public_key_info());
        }
    }

    #[test]
    fn refuses_garbage_and_broken_signature() {
        assert!(matches!(check_csr(b"", &policy()), Err(PkiError::BadCsr(_))));
        assert!(matches!(
            check_csr(b"\x30\x03\x02\x01\x00", &policy()),
            Err(PkiError::BadCsr(_))
        ));
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![]).unwrap();
        let mut der = params.serialize_request(&key).unwrap().der().to_vec();
        // Flip a bit in the signature (the last byte).
        let n = der.len();
        der[n - 1] ^= 1;
        let e = check_csr(&der, &policy()).unwrap_err().to_string();
        assert!(e.contains("self-signature"), "{e}");
    }

    #[test]
    fn summarizers_never_panic_on_truncations() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().to_vec();
        for n in 0..der.len() {
            assert!(summarize_certificate(&der[..n]).is_err());
            let _ = summarize_crl(&der[..n]);
        }
        assert!(summarize_certificate(&der).is_ok());
    }
}
