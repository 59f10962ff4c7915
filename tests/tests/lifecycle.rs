//! RELIABILITY.md 3–8 and 11: enrollment, CSR policy, what gets issued,
//! serials, renewal, revocation and the CRL — over the real listeners.

use std::process::Command;
use std::time::Duration;

use laddnet_proto::v1;
use laddnet_proto::v1::charger_service_client::ChargerServiceClient;
use laddnet_tests::*;

fn openssl(args: &[&str], dir: &std::path::Path) -> std::process::Output {
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed (.ci/run installs it)")
}

/// A CSR made by openssl, an implementation independent of ours.
fn openssl_csr(dir: &std::path::Path, name: &str, args: &[&str]) -> String {
    let mut all = vec!["req", "-new", "-nodes", "-keyout", "k.pem", "-out", "r.csr", "-subj"];
    let subj = format!("/CN={name}");
    all.push(&subj);
    all.extend_from_slice(args);
    let out = openssl(&all, dir);
    assert!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(dir.join("r.csr")).unwrap()
}

async fn enroll_with(
    node: &TestNode,
    id: &str,
    token: String,
    csr: String,
) -> Result<v1::EnrollResponse, tonic::Status> {
    node.enrollment()
        .await
        .enroll(v1::EnrollRequest {
            charger_id: id.into(),
            token,
            csr_pem: csr,
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn tokens_are_single_use_bound_to_one_charger_and_expire() {
    let node = TestNode::start().await;
    let token = node.token("CP-1").await;
    let (_, csr) = laddnet_pki::new_key_and_csr("CP-1").unwrap();
    let err = enroll_with(&node, "CP-2", token.clone(), csr.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("another charger"), "{}", err.message());
    enroll_with(&node, "CP-1", token.clone(), csr.clone()).await.unwrap();
    let err = enroll_with(&node, "CP-1", token, csr.clone()).await.unwrap_err();
    assert!(err.message().contains("already been used"), "{}", err.message());

    let late = node.token("CP-3").await;
    node.clock.advance_days(2);
    let err = enroll_with(&node, "CP-3", late, csr.clone()).await.unwrap_err();
    assert!(err.message().contains("expired"), "{}", err.message());
    let err = enroll_with(&node, "CP-3", "ldt_guess".into(), csr).await.unwrap_err();
    assert!(err.message().contains("unknown"), "{}", err.message());
}

#[tokio::test]
async fn enrollment_is_rate_limited_per_address() {
    let node = TestNode::start().await;
    let mut client = node.enrollment().await;
    let burst = laddnet_pki::Policy::default().enrollment.burst;
    let mut codes = Vec::new();
    for _ in 0..burst + 3 {
        let r = client
            .enroll(v1::EnrollRequest {
                charger_id: "CP-X".into(),
                token: "ldt_wrong".into(),
                csr_pem: String::new(),
            })
            .await;
        codes.push(r.unwrap_err().code());
    }
    assert!(
        codes[..burst as usize]
            .iter()
            .all(|c| *c != tonic::Code::ResourceExhausted),
        "{codes:?}"
    );
    assert_eq!(*codes.last().unwrap(), tonic::Code::ResourceExhausted, "{codes:?}");
}

#[tokio::test]
async fn weak_or_broken_csrs_are_not_signed() {
    let node = TestNode::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("rsa 1024", vec!["-newkey", "rsa:1024"], "too weak"),
        ("sha1", vec!["-newkey", "rsa:2048", "-sha1"], "SHA-1"),
        (
            "secp256k1",
            vec!["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp256k1"],
            "curve",
        ),
    ];
    for (what, args, expect) in cases {
        let csr = openssl_csr(dir.path(), "CP-W", &args);
        let token = node.token("CP-W").await;
        let err = enroll_with(&node, "CP-W", token, csr).await.expect_err(what);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}: {err:?}");
        assert!(err.message().contains(expect), "{what}: {}", err.message());
    }
    // A CSR whose self-signature is broken.
    let (_, csr) = laddnet_pki::new_key_and_csr("CP-W").unwrap();
    let mut der = pem::parse(&csr).unwrap().into_contents();
    let n = der.len();
    der[n - 3] ^= 0x55;
    let broken = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
    let token = node.token("CP-W").await;
    let err = enroll_with(&node, "CP-W", token, broken).await.unwrap_err();
    assert!(err.message().contains("CSR"), "{}", err.message());
    // And RSA 2048 from openssl is fine.
    let csr = openssl_csr(dir.path(), "CP-W", &["-newkey", "rsa:2048"]);
    let token = node.token("CP-W").await;
    enroll_with(&node, "CP-W", token, csr).await.unwrap();
}

#[tokio::test]
async fn issued_certificate_comes_from_policy_not_from_the_csr() {
    let node = TestNode::start().await;
    let dir = tempfile::tempdir().unwrap();
    let csr = openssl_csr(
        dir.path(),
        "CP-OTHER",
        &[
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "subjectAltName=DNS:evil.example,IP:10.0.0.1",
            "-addext",
            "extendedKeyUsage=serverAuth,codeSigning",
            "-addext",
            "keyUsage=keyCertSign,cRLSign",
        ],
    );
    let token = node.token("CP-REAL").await;
    let r = enroll_with(&node, "CP-REAL", token, csr).await.unwrap();
    let leaf = pem::parse(&r.chain_pem).unwrap().into_contents();
    let s = laddnet_pki::summarize_certificate(&leaf).unwrap();
    assert_eq!(s.common_name, "CP-REAL");
    assert!(!s.is_ca);
    assert!(s.client_auth && !s.server_auth);
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    assert!(
        cert.subject_alternative_name().unwrap().is_none(),
        "no SAN from the CSR"
    );
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(!eku.code_signing && eku.other.is_empty());
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(!ku.key_cert_sign() && !ku.crl_sign());
    // Validity from policy: 365 days for chargers.
    assert_eq!((s.not_after - s.not_before + 300) / 86_400, 365);

    // And an independent verifier accepts it against the CA chain.
    std::fs::write(
        dir.path().join("leaf.pem"),
        pem::encode(&pem::Pem::new("CERTIFICATE", leaf)),
    )
    .unwrap();
    std::fs::write(dir.path().join("root.pem"), &node.root_pem).unwrap();
    std::fs::write(dir.path().join("int.pem"), node.intermediate_pem()).unwrap();
    let out = openssl(
        &[
            "verify",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "int.pem",
            "-purpose",
            "sslclient",
            "leaf.pem",
        ],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = openssl(
        &[
            "verify",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "int.pem",
            "-purpose",
            "sslserver",
            "leaf.pem",
        ],
        dir.path(),
    );
    assert!(
        !out.status.success(),
        "a charger certificate must not pass as a server certificate"
    );
}

#[tokio::test]
async fn serials_are_128_random_bits_and_unique() {
    let node = TestNode::start().await;
    let mut seen = std::collections::HashSet::new();
    // The same key re-signed gets a new serial each time.
    let (key, csr) = laddnet_pki::new_key_and_csr("CP-S").unwrap();
    drop(key);
    for _ in 0..7 {
        let token = node.token("CP-S").await;
        let r = enroll_with(&node, "CP-S", token, csr.clone()).await.unwrap();
        let serial = r.certificate.unwrap().serial;
        assert_eq!(serial.len(), 34, "0x01 + 16 random bytes");
        assert!(seen.insert(serial));
    }
    // A generator that repeats an existing serial is caught by the store check.
    let ca = node.node().state.ca.clone();
    let existing: [u8; 17] = hex::decode(seen.iter().next().unwrap()).unwrap().try_into().unwrap();
    let mut calls = 0;
    ca.set_serial_source(move || {
        calls += 1;
        if calls == 1 { existing } else { [7u8; 17] }
    });
    let token = node.token("CP-S").await;
    let r = enroll_with(&node, "CP-S", token, csr.clone()).await.unwrap();
    assert_eq!(r.certificate.unwrap().serial, hex::encode([7u8; 17]));
    // A generator stuck on used serials fails loudly instead of reusing one.
    ca.set_serial_source(move || existing);
    let token = node.token("CP-S").await;
    assert!(enroll_with(&node, "CP-S", token, csr).await.is_err());
}

#[tokio::test]
async fn renewal_opens_in_the_window_overlaps_and_never_for_revoked() {
    let node = TestNode::start().await;
    // Enroll 340 days ago: today is inside the 30-day renewal window of the
    // 365-day certificate, and both certificates are valid by the real clock.
    node.clock.advance_days(-340);
    let old = node.enroll("CP-R").await;
    node.clock.advance_days(340);
    node.clock.advance_days(-100);
    let renew = |creds: Creds| {
        let node = &node;
        async move {
            let (key, csr) = laddnet_pki::new_key_and_csr("CP-R").unwrap();
            let r = ChargerServiceClient::new(node.channel(&creds).await.unwrap())
                .renew_certificate(v1::RenewCertificateRequest { csr_pem: csr })
                .await?
                .into_inner();
            Ok::<_, tonic::Status>(Creds {
                chain_pem: r.chain_pem,
                key_pem: key.to_string(),
                serial: r.certificate.unwrap().serial,
            })
        }
    };
    let err = renew(old.clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("renewal window"), "{}", err.message());

    node.clock.advance_days(100);
    let new = renew(old.clone()).await.unwrap();
    assert_ne!(new.serial, old.serial);
    // Both work during the overlap, and only one stream at a time.
    assert!(served(&node, &old).await);
    assert!(served(&node, &new).await);
    let info = node
        .pki()
        .await
        .get_certificate(v1::GetCertificateRequest {
            serial: new.serial.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.renewed_from, old.serial);
    let old_info = node
        .pki()
        .await
        .get_certificate(v1::GetCertificateRequest {
            serial: old.serial.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(old_info.status, "valid", "renewal never revokes the predecessor");

    // A security admin may renew early, outside the window, for a new key.
    let (_, csr) = laddnet_pki::new_key_and_csr("CP-R").unwrap();
    let early = node
        .pki()
        .await
        .renew_certificate(v1::PkiRenewRequest {
            serial: new.serial.clone(),
            csr_pem: csr,
        })
        .await
        .unwrap()
        .into_inner();
    let early = early.certificate.unwrap();
    assert_eq!((early.subject.as_str(), early.profile.as_str()), ("CP-R", "charger"));
    assert_eq!(early.renewed_from, new.serial);

    // A revoked certificate cannot renew, by any door.
    node.revoke(&new.serial).await;
    assert!(renew(new.clone()).await.is_err());
    let (_, csr) = laddnet_pki::new_key_and_csr("CP-R").unwrap();
    let err = node
        .pki()
        .await
        .renew_certificate(v1::PkiRenewRequest {
            serial: new.serial.clone(),
            csr_pem: csr,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("revoked"), "{}", err.message());
}

#[tokio::test]
async fn a_revocation_written_by_another_node_applies_through_the_store_watch() {
    // The safety-net re-read is an hour away: only the watch can deliver it.
    let node = TestNode::start_with(|c| c.tls.crl_poll_ms = 3_600_000).await;
    let creds = node.enroll("CP-W").await;
    let mut live = attach(node.channel(&creds).await.unwrap(), "CP-W").await.unwrap();
    live.heartbeat().await.unwrap();
    let state = node.node().state.clone();
    let before = state.crl_number();
    // As another node sharing the store would: the revocation and the new
    // CRL are written to the store, and this node's service is not told.
    let (ca, serial) = (state.ca.clone(), creds.serial.clone());
    tokio::task::spawn_blocking(move || {
        ca.revoke(&serial, laddnet_pki::RevocationReason::KeyCompromise, "another-node")
    })
    .await
    .unwrap()
    .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = live.rx.message().await {}
    })
    .await;
    assert!(ended.is_ok(), "the revoked charger's stream stayed open");
    assert!(state.crl_number() > before, "the new CRL was not applied");
    assert!(!served(&node, &creds).await, "the next handshake must fail");
}

#[tokio::test]
async fn revocation_closes_the_live_stream_and_refuses_the_next_handshake() {
    let node = TestNode::start().await;
    let creds = node.enroll("CP-V").await;
    let bystander = node.enroll("CP-B").await;
    let mut live = attach(node.channel(&creds).await.unwrap(), "CP-V").await.unwrap();
    let mut other = attach(node.channel(&bystander).await.unwrap(), "CP-B").await.unwrap();
    live.heartbeat().await.unwrap();

    let before = node
        .pki()
        .await
        .get_crl(v1::GetCrlRequest {})
        .await
        .unwrap()
        .into_inner();
    node.revoke(&creds.serial).await;
    let started = tokio::time::Instant::now();
    // The stream ends (with a Closing notice or an error) within 5 s.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match live.rx.message().await {
                Ok(Some(v1::CentralMessage {
                    payload: Some(v1::central_message::Payload::Closing(_)),
                    ..
                })) => continue,
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the revoked charger's stream stayed open");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!served(&node, &creds).await, "the next handshake must fail");
    other.heartbeat().await.expect("other chargers are unaffected");

    let after = node
        .pki()
        .await
        .get_crl(v1::GetCrlRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(after.crl_number > before.crl_number);
    let summary = laddnet_pki::summarize_crl(after.crl_pem.as_bytes()).unwrap();
    assert!(summary.revoked_serials.contains(&creds.serial));
    let err = node
        .pki()
        .await
        .revoke_certificate(v1::RevokeCertificateRequest {
            serial: creds.serial.clone(),
            reason: "".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let err = node
        .pki()
        .await
        .revoke_certificate(v1::RevokeCertificateRequest {
            serial: bystander.serial.clone(),
            reason: "bored".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("bored"));
}

#[tokio::test]
async fn crl_number_only_grows_and_next_update_is_refreshed() {
    let node = TestNode::start().await;
    let ca = node.node().state.ca.clone();
    let first = ca.crl_record().unwrap().unwrap();
    let mut last = first.number;
    for i in 0..3 {
        let c = node.enroll(&format!("CP-{i}")).await;
        node.pki()
            .await
            .revoke_certificate(v1::RevokeCertificateRequest {
                serial: c.serial,
                reason: String::new(),
            })
            .await
            .unwrap();
        let n = ca.crl_record().unwrap().unwrap().number;
        assert!(n > last);
        last = n;
    }
    // Past half its validity, the poller signs a fresh CRL with a later next-update.
    node.clock.advance_days(1);
    let refreshed = eventually(Duration::from_secs(10), || {
        let ca = ca.clone();
        async move { ca.crl_record().unwrap().unwrap().number > last }
    })
    .await;
    assert!(refreshed);
    let now = ca.crl_record().unwrap().unwrap();
    assert!(now.next_update > first.next_update + 86_000);
    let served_crl = node
        .enrollment()
        .await
        .get_crl(v1::GetCrlRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        served_crl.crl_number >= now.number,
        "the CRL is served to whoever verifies"
    );
}

#[tokio::test]
async fn a_stopped_node_has_closed_its_store_when_shutdown_returns() {
    // The CRL watch thread, streams and actors all hold the store; the
    // node's shutdown must not return before the last of them let go and
    // the store is closed, or a restart on the same data dir finds it
    // locked (the watch thread, letting go last, raced with the reopen).
    let mut node = TestNode::start().await;
    for round in 0..5 {
        let creds = node.enroll(&format!("CP-R{round}")).await;
        let mut live = attach(node.channel(&creds).await.unwrap(), &format!("CP-R{round}"))
            .await
            .unwrap();
        live.heartbeat().await.unwrap();
        node.stop().await;
        let path = node.data_dir().join("store.redb");
        let reopened = laddnet_store::RedbStore::open(&path);
        assert!(
            reopened.is_ok(),
            "round {round}: the store is still open after shutdown returned"
        );
        drop(reopened);
        node.restart().await;
    }
}
