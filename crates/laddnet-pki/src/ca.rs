//! The certificate authority: files on disk (root and intermediate), and
//! every operation on issued certificates, recorded in the store.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, PublicKeyData, RevokedCertParams,
    SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use laddnet_core::{ChargerId, OperatorName, Role, SiteId};
use laddnet_store::{SharedStore, StoreExt, Transaction, keys};
use laddnet_vault::{KeySource, SealedBox, Secret};

use crate::audit::{self, AuditKind};
use crate::inspect::{CheckedCsr, check_csr};
use crate::records::{
    CertRecord, CertStatus, CrlRecord, Revocation, RevocationReason, TokenRecord, cert_key, crl_key,
    expiry_indexed_key, expiry_key, get_json, put_json, revoked_key, subject_key, token_key,
};
use crate::{KeyAlgorithm, PkiError, Policy, Profile};

const ROOT_CERT: &str = "root.crt";
const ROOT_KEY: &str = "root-key.sealed.json";
const INTERMEDIATE_CERT: &str = "intermediate.crt";
const INTERMEDIATE_KEY: &str = "intermediate-key.sealed.json";
const AAD_ROOT: &[u8] = b"laddnet/ca/root-key/v1";
const AAD_INTERMEDIATE: &[u8] = b"laddnet/ca/intermediate-key/v1";

/// A source of "now", in Unix seconds UTC. Tests move it.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The wall clock.
pub fn system_clock() -> Clock {
    Arc::new(|| OffsetDateTime::now_utc().unix_timestamp())
}

/// Where a CA's files live.
#[derive(Debug, Clone)]
pub struct CaFiles {
    pub dir: PathBuf,
}

impl CaFiles {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn root_cert(&self) -> PathBuf {
        self.dir.join(ROOT_CERT)
    }
    /// The sealed root key. A running node never reads it: move it offline.
    pub fn root_key(&self) -> PathBuf {
        self.dir.join(ROOT_KEY)
    }
    pub fn intermediate_cert(&self) -> PathBuf {
        self.dir.join(INTERMEDIATE_CERT)
    }
    pub fn intermediate_key(&self) -> PathBuf {
        self.dir.join(INTERMEDIATE_KEY)
    }
    pub fn exists(&self) -> bool {
        self.intermediate_key().exists()
    }
}

/// What `init` made.
#[derive(Debug, Clone)]
pub struct InitReport {
    pub root_serial: String,
    pub intermediate_serial: String,
    pub root_not_after: i64,
    pub intermediate_not_after: i64,
}

/// Who a certificate is for. The CA builds the certificate from this and
/// the policy alone.
#[derive(Debug, Clone)]
pub enum Subject {
    Charger {
        id: ChargerId,
        site: Option<SiteId>,
    },
    Operator {
        name: OperatorName,
        role: Role,
    },
    Node {
        name: String,
        sans: Vec<String>,
    },
    /// A driver app's credential: CN is the pseudonymous driver id.
    Driver {
        id: String,
    },
    /// The key firmware images are signed with: CN is its name.
    FirmwareSigning {
        name: String,
    },
}

impl Subject {
    pub fn profile(&self) -> Profile {
        match self {
            Subject::Charger { .. } => Profile::Charger,
            Subject::Operator { .. } => Profile::Operator,
            Subject::Node { .. } => Profile::Node,
            Subject::Driver { .. } => Profile::Driver,
            Subject::FirmwareSigning { .. } => Profile::FirmwareSigning,
        }
    }
    fn name(&self) -> String {
        match self {
            Subject::Charger { id, .. } => id.to_string(),
            Subject::Operator { name, .. } => name.to_string(),
            Subject::Node { name, .. } => name.clone(),
            Subject::Driver { id } => id.clone(),
            Subject::FirmwareSigning { name } => name.clone(),
        }
    }
}

/// An issued certificate with its chain.
#[derive(Debug, Clone)]
pub struct Issued {
    pub record: CertRecord,
    /// Leaf, then intermediate.
    pub chain_pem: String,
}

/// A freshly made enrollment token. `token` is shown once and stored only
/// as a hash.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub token: String,
    pub charger_id: ChargerId,
    pub expires_at: i64,
}

/// Filters for [`Ca::list`].
#[derive(Debug, Clone, Default)]
pub struct CertFilter {
    pub profile: Option<Profile>,
    pub subject: Option<String>,
    pub status: Option<String>,
}

fn key_alg(a: KeyAlgorithm) -> &'static rcgen::SignatureAlgorithm {
    match a {
        KeyAlgorithm::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        KeyAlgorithm::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
    }
}

fn ts(unix: i64) -> Result<OffsetDateTime, PkiError> {
    OffsetDateTime::from_unix_timestamp(unix).map_err(|e| PkiError::Invalid(format!("time out of range: {e}")))
}

/// `0x01` then 16 random bytes: 128 random bits, always a positive,
/// minimally encoded DER integer (so the hex we store is the hex on the wire).
fn random_serial() -> [u8; 17] {
    let mut s = [0u8; 17];
    s[0] = 1;
    rand::rngs::OsRng.fill_bytes(&mut s[1..]);
    s
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    use std::io::Write;
    let mut f = opts
        .open(path)
        .map_err(|e| PkiError::Files(format!("{}: {e}", path.display())))?;
    f.write_all(contents)
        .and_then(|_| f.sync_all())
        .map_err(|e| PkiError::Files(format!("{}: {e}", path.display())))
}

fn seal_to(path: &Path, source: &KeySource, aad: &[u8], key: &KeyPair) -> Result<(), PkiError> {
    let der = Secret::new(key.serialize_der());
    let sealed = laddnet_vault::seal(source, aad, &der)?;
    let json = serde_json::to_vec_pretty(&sealed).map_err(|e| PkiError::Files(e.to_string()))?;
    write_new(path, &json, 0o600)
}

fn unseal_from(path: &Path, source: &KeySource, aad: &[u8]) -> Result<KeyPair, PkiError> {
    let json = fs::read(path).map_err(|e| PkiError::Files(format!("{}: {e}", path.display())))?;
    let sealed: SealedBox =
        serde_json::from_slice(&json).map_err(|e| PkiError::Files(format!("{}: {e}", path.display())))?;
    let der = laddnet_vault::open(source, aad, &sealed)?;
    KeyPair::try_from(der.as_slice()).map_err(|e| PkiError::Key(format!("intermediate key does not load: {e}")))
}

fn read_pem_cert(path: &Path) -> Result<(String, CertificateDer<'static>), PkiError> {
    let text = fs::read_to_string(path).map_err(|e| PkiError::Files(format!("{}: {e}", path.display())))?;
    let p = pem::parse(&text).map_err(|e| PkiError::Files(format!("{}: {e}", path.display())))?;
    Ok((text, CertificateDer::from(p.into_contents())))
}

/// Creates a root CA and an issuing intermediate (path length 0) in `files`,
/// both keys sealed under `source`. Refuses to overwrite an existing CA.
pub fn init(
    files: &CaFiles,
    policy: &Policy,
    source: &KeySource,
    store: &SharedStore,
    clock: &Clock,
) -> Result<InitReport, PkiError> {
    if files.exists() || files.root_cert().exists() {
        return Err(PkiError::Files(format!(
            "a CA already exists in {}",
            files.dir.display()
        )));
    }
    fs::create_dir_all(&files.dir).map_err(|e| PkiError::Files(format!("{}: {e}", files.dir.display())))?;
    let now = clock();
    let alg = key_alg(policy.ca.key_algorithm);
    let org = &policy.ca.organisation;

    let root_key = KeyPair::generate_for(alg)?;
    let root_serial = random_serial();
    let mut root = CertificateParams::default();
    root.serial_number = Some(SerialNumber::from_slice(&root_serial));
    root.distinguished_name = DistinguishedName::new();
    root.distinguished_name
        .push(DnType::CommonName, format!("{org} Root CA"));
    root.distinguished_name.push(DnType::OrganizationName, org.as_str());
    root.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    root.not_before = ts(now - i64::from(policy.ca.clock_skew_seconds))?;
    let root_not_after = now + i64::from(policy.ca.root_validity_days) * 86_400;
    root.not_after = ts(root_not_after)?;
    root.key_identifier_method = KeyIdMethod::Sha256;
    let root_cert = root.self_signed(&root_key)?;
    let root_issuer = Issuer::new(root.clone(), &root_key);

    let int_key = KeyPair::generate_for(alg)?;
    let int_serial = random_serial();
    let mut int = CertificateParams::default();
    int.serial_number = Some(SerialNumber::from_slice(&int_serial));
    int.distinguished_name = DistinguishedName::new();
    int.distinguished_name
        .push(DnType::CommonName, format!("{org} Issuing CA"));
    int.distinguished_name.push(DnType::OrganizationName, org.as_str());
    int.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    int.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    int.not_before = ts(now - i64::from(policy.ca.clock_skew_seconds))?;
    let int_not_after = now + i64::from(policy.ca.intermediate_validity_days) * 86_400;
    int.not_after = ts(int_not_after)?;
    int.use_authority_key_identifier_extension = true;
    let int_cert = int.signed_by(&int_key, &root_issuer)?;

    seal_to(&files.root_key(), source, AAD_ROOT, &root_key)?;
    seal_to(&files.intermediate_key(), source, AAD_INTERMEDIATE, &int_key)?;
    write_new(&files.root_cert(), root_cert.pem().as_bytes(), 0o644)?;
    write_new(&files.intermediate_cert(), int_cert.pem().as_bytes(), 0o644)?;

    let report = InitReport {
        root_serial: hex::encode(root_serial),
        intermediate_serial: hex::encode(int_serial),
        root_not_after,
        intermediate_not_after: int_not_after,
    };
    store.transact(|tx| {
        audit::append(
            tx,
            now,
            AuditKind::PkiInit,
            "system",
            &report.intermediate_serial,
            &format!(
                "root {} intermediate {}",
                report.root_serial, report.intermediate_serial
            ),
        )
        .map(|_| ())?;
        // A new CA has no certificate to index.
        tx.set(&expiry_indexed_key(), b"")?;
        Ok::<(), PkiError>(())
    })?;
    tracing::info!(root = %report.root_serial, intermediate = %report.intermediate_serial, "CA created");
    Ok(report)
}

type SerialSource = Box<dyn FnMut() -> [u8; 17] + Send>;

/// A running CA: the intermediate's key in memory, records in the store.
pub struct Ca {
    store: SharedStore,
    policy: Policy,
    clock: Clock,
    root_pem: String,
    root_der: CertificateDer<'static>,
    intermediate_pem: String,
    issuer: Issuer<'static, KeyPair>,
    serials: Mutex<SerialSource>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("backend", &self.store.backend())
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Opens the CA in `files`: reads both certificates and unseals the
    /// intermediate key. The root key is not read.
    pub fn open(
        files: &CaFiles,
        policy: Policy,
        source: &KeySource,
        store: SharedStore,
        clock: Clock,
    ) -> Result<Self, PkiError> {
        let (root_pem, root_der) = read_pem_cert(&files.root_cert())?;
        let (intermediate_pem, intermediate_der) = read_pem_cert(&files.intermediate_cert())?;
        let key = unseal_from(&files.intermediate_key(), source, AAD_INTERMEDIATE)?;
        let issuer = Issuer::from_ca_cert_der(&intermediate_der, key)
            .map_err(|e| PkiError::Files(format!("intermediate certificate: {e}")))?;
        let ca = Ca {
            store,
            policy,
            clock,
            root_pem,
            root_der,
            intermediate_pem,
            issuer,
            serials: Mutex::new(Box::new(random_serial)),
        };
        // A CA always has a CRL to serve, from its first start.
        if ca.crl_record()?.is_none() {
            ca.refresh_crl("system")?;
        }
        ca.index_expiry_once()?;
        Ok(ca)
    }

    /// Replaces the serial generator. For tests of the uniqueness check.
    pub fn set_serial_source(&self, f: impl FnMut() -> [u8; 17] + Send + 'static) {
        *self.serials.lock().unwrap_or_else(|p| p.into_inner()) = Box::new(f);
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }
    pub fn store(&self) -> &SharedStore {
        &self.store
    }
    pub fn now(&self) -> i64 {
        (self.clock)()
    }
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }
    pub fn root_der(&self) -> &CertificateDer<'static> {
        &self.root_der
    }
    pub fn intermediate_pem(&self) -> &str {
        &self.intermediate_pem
    }

    fn next_serial(&self) -> [u8; 17] {
        (self.serials.lock().unwrap_or_else(|p| p.into_inner()))()
    }

    /// Builds the certificate for `subject` from policy and signs `spki`.
    fn sign(
        &self,
        subject: &Subject,
        spki_der: &[u8],
        serial: &[u8],
        now: i64,
    ) -> Result<(CertRecord, String), PkiError> {
        let profile = subject.profile();
        let pp = self.policy.profile(profile);
        let org = self.policy.ca.organisation.clone();
        let mut p = CertificateParams::default();
        p.serial_number = Some(SerialNumber::from_slice(serial));
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, subject.name());
        p.distinguished_name.push(DnType::OrganizationName, org.as_str());
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.use_authority_key_identifier_extension = true;
        let not_before = now - i64::from(self.policy.ca.clock_skew_seconds);
        let not_after = now + i64::from(pp.validity_days) * 86_400;
        p.not_before = ts(not_before)?;
        p.not_after = ts(not_after)?;
        let (mut role, mut site_id) = (None, None);
        match subject {
            Subject::Charger { site, .. } => {
                p.distinguished_name.push(DnType::OrganizationalUnitName, "charger");
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
                site_id = site.as_ref().map(|s| s.to_string());
            }
            Subject::Operator { role: r, .. } => {
                p.distinguished_name.push(DnType::OrganizationalUnitName, r.as_str());
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
                role = Some(r.as_str().to_string());
            }
            Subject::Driver { .. } => {
                p.distinguished_name.push(DnType::OrganizationalUnitName, "driver");
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
            Subject::FirmwareSigning { .. } => {
                p.distinguished_name
                    .push(DnType::OrganizationalUnitName, "firmware-signing");
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
            }
            Subject::Node { sans, .. } => {
                p.distinguished_name.push(DnType::OrganizationalUnitName, "node");
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
                for san in sans {
                    p.subject_alt_names.push(match san.parse::<std::net::IpAddr>() {
                        Ok(ip) => SanType::IpAddress(ip),
                        Err(_) => SanType::DnsName(
                            san.clone()
                                .try_into()
                                .map_err(|_| PkiError::Invalid(format!("{san:?} is not a DNS name or IP address")))?,
                        ),
                    });
                }
            }
        }
        let public = SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| PkiError::BadCsr(format!("public key not usable: {e}")))?;
        let cert = p.signed_by(&public, &self.issuer)?;
        let pem = cert.pem();
        let record = CertRecord {
            serial: hex::encode(serial),
            profile,
            subject: subject.name(),
            organisation: org,
            role,
            site_id,
            not_before,
            not_after,
            issued_at: now,
            certificate_pem: pem.clone(),
            renewed_from: None,
            revoked: None,
        };
        Ok((record, format!("{pem}{}", self.intermediate_pem)))
    }

    /// Allocates a serial unused in the store and issues inside `tx`.
    fn issue_in(
        &self,
        tx: &mut dyn Transaction,
        subject: &Subject,
        spki_der: &[u8],
        now: i64,
        renewed_from: Option<&str>,
    ) -> Result<Issued, PkiError> {
        let mut serial = None;
        for _ in 0..8 {
            let candidate = self.next_serial();
            if tx.get(&cert_key(&hex::encode(candidate)))?.is_none() {
                serial = Some(candidate);
                break;
            }
            tracing::warn!("serial collision; drawing another");
        }
        let serial = serial
            .ok_or_else(|| PkiError::Corrupted("no unused serial after 8 draws: the serial source is broken".into()))?;
        let (mut record, chain_pem) = self.sign(subject, spki_der, &serial, now)?;
        record.renewed_from = renewed_from.map(str::to_string);
        put_json(tx, &cert_key(&record.serial), &record)?;
        tx.set(&subject_key(record.profile, &record.subject, &record.serial), b"")?;
        tx.set(&expiry_key(record.not_after, &record.serial), b"")?;
        Ok(Issued { record, chain_pem })
    }

    /// Issues a certificate for `subject` from a CSR (only its public key
    /// is used).
    pub fn issue(&self, subject: &Subject, csr: &[u8], actor: &str) -> Result<Issued, PkiError> {
        let checked = check_csr(csr, &self.policy.csr)?;
        self.issue_checked(subject, &checked, actor)
    }

    fn issue_checked(&self, subject: &Subject, checked: &CheckedCsr, actor: &str) -> Result<Issued, PkiError> {
        let now = self.now();
        let issued = self.store.transact(|tx| {
            let issued = self.issue_in(tx, subject, &checked.spki_der, now, None)?;
            audit::append(
                tx,
                now,
                AuditKind::Issue,
                actor,
                &issued.record.subject,
                &format!(
                    "{} serial {} key {}",
                    issued.record.profile.as_str(),
                    issued.record.serial,
                    checked.key_description
                ),
            )?;
            Ok::<_, PkiError>(issued)
        })?;
        tracing::info!(serial = %issued.record.serial, profile = issued.record.profile.as_str(), "certificate issued");
        Ok(issued)
    }

    /// Issues a certificate for a key generated here, returning the key as
    /// PKCS#8 PEM. For the node's own certificate and bootstrap credentials.
    pub fn issue_with_new_key(&self, subject: &Subject, actor: &str) -> Result<(Issued, Secret<String>), PkiError> {
        let key = KeyPair::generate_for(key_alg(self.policy.ca.key_algorithm))?;
        let checked = CheckedCsr {
            spki_der: key.subject_public_key_info(),
            key_description: "generated by the CA".into(),
        };
        let issued = self.issue_checked(subject, &checked, actor)?;
        Ok((issued, Secret::new(key.serialize_pem())))
    }

    /// Creates a one-time enrollment token for `charger_id`.
    pub fn create_token(
        &self,
        charger_id: &ChargerId,
        site: Option<&SiteId>,
        ttl_seconds: u32,
        actor: &str,
    ) -> Result<NewToken, PkiError> {
        let e = &self.policy.enrollment;
        let ttl = if ttl_seconds == 0 {
            e.token_ttl_seconds
        } else {
            ttl_seconds
        };
        if ttl > e.max_token_ttl_seconds {
            return Err(PkiError::Invalid(format!(
                "ttl_seconds {ttl} exceeds the policy maximum of {}",
                e.max_token_ttl_seconds
            )));
        }
        let mut raw = [0u8; 24];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let token = format!("ldt_{}", hex::encode(raw));
        let now = self.now();
        let record = TokenRecord {
            charger_id: charger_id.to_string(),
            site_id: site.map(|s| s.to_string()),
            created_at: now,
            expires_at: now + i64::from(ttl),
            created_by: actor.into(),
            used_at: None,
        };
        self.store.transact(|tx| {
            put_json(tx, &token_key(&sha256_hex(token.as_bytes())), &record)?;
            audit::append(
                tx,
                now,
                AuditKind::TokenCreate,
                actor,
                charger_id.as_str(),
                &format!("ttl {ttl}s"),
            )?;
            Ok::<_, PkiError>(())
        })?;
        Ok(NewToken {
            token,
            charger_id: charger_id.clone(),
            expires_at: record.expires_at,
        })
    }

    /// Enrolls a new charger: checks the token (single use, unexpired, made
    /// for this charger id) and the CSR, then issues from policy. Every
    /// refusal is audited; the token is spent only by a success.
    pub fn enroll(&self, charger_id: &str, token: &str, csr: &[u8], peer: &str) -> Result<Issued, PkiError> {
        let result = self.try_enroll(charger_id, token, csr, peer);
        if let Err(e) = &result {
            let detail = format!("enrollment from {peer}: {e}");
            let subject: String = charger_id.chars().take(64).collect();
            self.record(AuditKind::AuthRefused, "anonymous", &subject, &detail)?;
            tracing::warn!(peer = %peer, error = %e, "enrollment refused");
        }
        result
    }

    fn try_enroll(&self, charger_id: &str, token: &str, csr: &[u8], peer: &str) -> Result<Issued, PkiError> {
        let id = ChargerId::new(charger_id).map_err(|e| PkiError::Invalid(e.to_string()))?;
        let checked = check_csr(csr, &self.policy.csr)?;
        let key = token_key(&sha256_hex(token.as_bytes()));
        let now = self.now();
        let issued = self.store.transact(|tx| {
            let mut rec: TokenRecord =
                get_json(tx, &key)?.ok_or_else(|| PkiError::Enrollment("unknown enrollment token".into()))?;
            if rec.charger_id != id.as_str() {
                return Err(PkiError::Enrollment("the token was made for another charger id".into()));
            }
            if rec.used_at.is_some() {
                return Err(PkiError::Enrollment("the token has already been used".into()));
            }
            if now >= rec.expires_at {
                return Err(PkiError::Enrollment("the token has expired".into()));
            }
            rec.used_at = Some(now);
            put_json(tx, &key, &rec)?;
            let site = rec
                .site_id
                .as_deref()
                .map(SiteId::new)
                .transpose()
                .map_err(|e| PkiError::Corrupted(e.to_string()))?;
            let subject = Subject::Charger { id: id.clone(), site };
            let issued = self.issue_in(tx, &subject, &checked.spki_der, now, None)?;
            audit::append(
                tx,
                now,
                AuditKind::Enroll,
                &format!("charger:{id}"),
                id.as_str(),
                &format!(
                    "serial {} key {} from {peer}",
                    issued.record.serial, checked.key_description
                ),
            )?;
            Ok(issued)
        })?;
        tracing::info!(charger_id = %id, serial = %issued.record.serial, "charger enrolled");
        Ok(issued)
    }

    /// Issues a successor of certificate `serial` for the key in `csr`:
    /// same profile and subject, fresh validity. The predecessor stays valid
    /// until it expires. A revoked certificate never renews; with
    /// `enforce_window`, renewal opens only in the profile's renewal window.
    pub fn renew(&self, serial: &str, csr: &[u8], actor: &str, enforce_window: bool) -> Result<Issued, PkiError> {
        let checked = check_csr(csr, &self.policy.csr)?;
        let now = self.now();
        let issued = self.store.transact(|tx| {
            let old: CertRecord =
                get_json(tx, &cert_key(serial))?.ok_or_else(|| PkiError::NotFound(serial.to_string()))?;
            match old.status(now) {
                CertStatus::Revoked => return Err(PkiError::Renewal(format!("certificate {serial} is revoked"))),
                CertStatus::Expired => {
                    return Err(PkiError::Renewal(format!(
                        "certificate {serial} has expired: enroll again"
                    )));
                }
                _ => {}
            }
            let window = i64::from(self.policy.profile(old.profile).renewal_window_days) * 86_400;
            if enforce_window && now < old.not_after - window {
                let opens = OffsetDateTime::from_unix_timestamp(old.not_after - window)
                    .map(|t| t.to_string())
                    .unwrap_or_default();
                return Err(PkiError::Renewal(format!("renewal window opens at {opens}")));
            }
            let subject = subject_of(&old)?;
            let issued = self.issue_in(tx, &subject, &checked.spki_der, now, Some(serial))?;
            audit::append(
                tx,
                now,
                AuditKind::Renew,
                actor,
                &old.subject,
                &format!("serial {} renewed as {}", serial, issued.record.serial),
            )?;
            Ok(issued)
        })?;
        tracing::info!(old = %serial, new = %issued.record.serial, "certificate renewed");
        Ok(issued)
    }

    /// Revokes `serial` and signs a new CRL in the same transaction.
    pub fn revoke(&self, serial: &str, reason: RevocationReason, actor: &str) -> Result<CertRecord, PkiError> {
        let now = self.now();
        let rec = self.store.transact(|tx| {
            let mut rec: CertRecord =
                get_json(tx, &cert_key(serial))?.ok_or_else(|| PkiError::NotFound(serial.to_string()))?;
            if rec.revoked.is_some() {
                return Err(PkiError::AlreadyRevoked(serial.to_string()));
            }
            rec.revoked = Some(Revocation { at: now, reason });
            put_json(tx, &cert_key(serial), &rec)?;
            tx.set(&revoked_key(serial), b"")?;
            audit::append(
                tx,
                now,
                AuditKind::Revoke,
                actor,
                &rec.subject,
                &format!("serial {serial} reason {}", reason.as_str()),
            )?;
            self.sign_crl_in(tx, now)?;
            Ok(rec)
        })?;
        tracing::info!(serial = %serial, reason = reason.as_str(), "certificate revoked");
        Ok(rec)
    }

    fn sign_crl_in(&self, tx: &mut dyn Transaction, now: i64) -> Result<CrlRecord, PkiError> {
        let prev: Option<CrlRecord> = get_json(tx, &crl_key())?;
        let number = prev.map(|p| p.number).unwrap_or(0) + 1;
        let (b, e) = keys::tuple_range(&("pki", "revoked"));
        let mut revoked = Vec::new();
        for (k, _) in tx.get_range(&b, &e, 0, false)? {
            let (_, _, serial): (String, String, String) =
                keys::unpack(&k).map_err(|e| PkiError::Corrupted(format!("revoked index: {e:?}")))?;
            let rec: CertRecord = get_json(tx, &cert_key(&serial))?
                .ok_or_else(|| PkiError::Corrupted(format!("revoked {serial} has no record")))?;
            // An expired certificate fails validation anyway; RFC 5280
            // lets the CRL drop it, which keeps the CRL small.
            if rec.not_after < now {
                continue;
            }
            let rev = rec
                .revoked
                .as_ref()
                .ok_or_else(|| PkiError::Corrupted(format!("{serial} indexed as revoked")))?;
            revoked.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(
                    &hex::decode(&serial).map_err(|e| PkiError::Corrupted(e.to_string()))?,
                ),
                revocation_time: ts(rev.at)?,
                reason_code: Some(rev.reason.to_rcgen()),
                invalidity_date: None,
            });
        }
        let next_update = now + i64::from(self.policy.ca.crl_validity_hours) * 3600;
        let params = CertificateRevocationListParams {
            this_update: ts(now)?,
            next_update: ts(next_update)?,
            crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer)?;
        let record = CrlRecord {
            number,
            this_update: now,
            next_update,
            pem: crl.pem()?,
        };
        put_json(tx, &crl_key(), &record)?;
        Ok(record)
    }

    /// Signs a new CRL (new number, fresh next-update).
    pub fn refresh_crl(&self, actor: &str) -> Result<CrlRecord, PkiError> {
        let now = self.now();
        self.store.transact(|tx| {
            let rec = self.sign_crl_in(tx, now)?;
            audit::append(tx, now, AuditKind::Crl, actor, "crl", &format!("number {}", rec.number))?;
            Ok(rec)
        })
    }

    /// The current CRL as stored, if any.
    pub fn crl_record(&self) -> Result<Option<CrlRecord>, PkiError> {
        self.store.snapshot(|tx| get_json(tx, &crl_key()))
    }

    pub fn get(&self, serial: &str) -> Result<CertRecord, PkiError> {
        self.store
            .snapshot(|tx| get_json::<CertRecord>(tx, &cert_key(serial)))?
            .ok_or_else(|| PkiError::NotFound(serial.to_string()))
    }

    /// Certificates in serial order after `after` (exclusive), matching
    /// `filter`, at most `limit`. Returns the rows and whether more remain.
    pub fn list(
        &self,
        filter: &CertFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<CertRecord>, bool), PkiError> {
        let now = self.now();
        let (begin, end) = keys::tuple_range(&("pki", "cert"));
        let mut from = match after {
            Some(s) => {
                let mut k = cert_key(s);
                k.push(0);
                k
            }
            None => begin,
        };
        let mut out = Vec::new();
        loop {
            let rows = self
                .store
                .snapshot(|tx| tx.get_range(&from, &end, 256, false).map_err(PkiError::from))?;
            let exhausted = rows.len() < 256;
            for (k, v) in rows {
                let rec: CertRecord = serde_json::from_slice(&v).map_err(|e| PkiError::Corrupted(e.to_string()))?;
                from = k;
                from.push(0);
                let keep = filter.profile.is_none_or(|p| p == rec.profile)
                    && filter.subject.as_deref().is_none_or(|s| s == rec.subject)
                    && filter.status.as_deref().is_none_or(|s| s == rec.status(now).as_str());
                if keep {
                    if out.len() == limit {
                        return Ok((out, true));
                    }
                    out.push(rec);
                }
            }
            if exhausted {
                return Ok((out, false));
            }
        }
    }

    /// Adds the certificates stored before the expiry index to it, once (a
    /// start cut short does it again: the entries are idempotent), 500 a
    /// transaction. Returns how many were indexed (0 when already done). A
    /// record that does not decode is passed over and logged: it could not
    /// be listed as expiring anyway.
    pub fn index_expiry_once(&self) -> Result<usize, PkiError> {
        let done = laddnet_store::backfill_once(
            self.store.as_ref(),
            &expiry_indexed_key(),
            keys::tuple_range(&("pki", "cert")),
            500,
            |tx, _, v| match serde_json::from_slice::<CertRecord>(v) {
                Ok(rec) => tx.set(&expiry_key(rec.not_after, &rec.serial), b"").map(|()| true),
                Err(_) => Ok(false),
            },
        )?;
        let Some(done) = done else { return Ok(0) };
        if done.unreadable > 0 {
            tracing::warn!(
                unreadable = done.unreadable,
                "certificate records that do not decode were not indexed by expiry"
            );
        }
        if done.indexed > 0 {
            tracing::info!(certificates = done.indexed, "certificates indexed by expiry");
        }
        Ok(done.indexed)
    }

    /// Certificates whose `not_after` is in `[from, to)`, by expiry (a
    /// range of the expiry index: what a scrape or a check reads does not
    /// grow with the certificates outside the window).
    pub fn expiring_between(&self, from: i64, to: i64) -> Result<Vec<CertRecord>, PkiError> {
        let (b, e) = (
            keys::pack(&("pki", "by-expiry", from)),
            keys::pack(&("pki", "by-expiry", to)),
        );
        self.store.snapshot(|tx| {
            let mut out = Vec::new();
            for (k, _) in tx.get_range(&b, &e, 0, false)? {
                let (_, _, _, serial): (String, String, i64, String) =
                    keys::unpack(&k).map_err(|e| PkiError::Corrupted(format!("expiry index: {e:?}")))?;
                if let Some(rec) = get_json::<CertRecord>(tx, &cert_key(&serial))? {
                    out.push(rec);
                }
            }
            Ok(out)
        })
    }

    /// Serials of every revoked certificate, for the node's live check.
    pub fn revoked_serials(&self) -> Result<Vec<String>, PkiError> {
        let (b, e) = keys::tuple_range(&("pki", "revoked"));
        self.store.snapshot(|tx| {
            tx.get_range(&b, &e, 0, false)?
                .into_iter()
                .map(|(k, _)| {
                    keys::unpack::<(String, String, String)>(&k)
                        .map(|t| t.2)
                        .map_err(|e| PkiError::Corrupted(format!("revoked index: {e:?}")))
                })
                .collect()
        })
    }

    /// Appends a security event to the audit log in its own transaction.
    pub fn record(&self, kind: AuditKind, actor: &str, subject: &str, detail: &str) -> Result<(), PkiError> {
        let now = self.now();
        self.store
            .transact(|tx| audit::append(tx, now, kind, actor, subject, detail).map(|_| ()))
    }
}

fn subject_of(rec: &CertRecord) -> Result<Subject, PkiError> {
    let corrupt = |e: String| PkiError::Corrupted(e);
    Ok(match rec.profile {
        Profile::Charger => Subject::Charger {
            id: ChargerId::new(rec.subject.clone()).map_err(|e| corrupt(e.to_string()))?,
            site: rec
                .site_id
                .clone()
                .map(SiteId::new)
                .transpose()
                .map_err(|e| corrupt(e.to_string()))?,
        },
        Profile::Operator => Subject::Operator {
            name: OperatorName::new(rec.subject.clone()).map_err(|e| corrupt(e.to_string()))?,
            role: rec.role.as_deref().unwrap_or("viewer").parse().map_err(corrupt)?,
        },
        Profile::Driver => Subject::Driver {
            id: rec.subject.clone(),
        },
        Profile::FirmwareSigning => Subject::FirmwareSigning {
            name: rec.subject.clone(),
        },
        Profile::Node => {
            let der = pem::parse(&rec.certificate_pem).map_err(|e| corrupt(e.to_string()))?;
            let (_, cert) = x509_parser::parse_x509_certificate(der.contents()).map_err(|e| corrupt(e.to_string()))?;
            let sans = cert
                .subject_alternative_name()
                .ok()
                .flatten()
                .map(|s| {
                    s.value
                        .general_names
                        .iter()
                        .filter_map(|g| match g {
                            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                            x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                                4 => Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).ok()?).to_string()),
                                16 => Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).ok()?).to_string()),
                                _ => None,
                            },
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            Subject::Node {
                name: rec.subject.clone(),
                sans,
            }
        }
    })
}
