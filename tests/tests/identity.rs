//! RELIABILITY.md 1, 2, 12 and role checks: who may connect and speak.

use std::time::Duration;

use laddnet_core::Role;
use laddnet_proto::v1;
use laddnet_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn audit_has(node: &TestNode, kind: &str, needle: &str) -> bool {
    let entries = node
        .pki()
        .await
        .list_audit_entries(v1::ListAuditEntriesRequest {
            page: Some(v1::PageRequest {
                page_size: 1000,
                page_token: String::new(),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    entries
        .iter()
        .any(|e| e.kind == kind && (e.detail.contains(needle) || e.subject.contains(needle)))
}

#[tokio::test]
async fn charger_claiming_another_id_is_refused_and_recorded() {
    let node = TestNode::start().await;
    let a = node.enroll("CP-A").await;
    node.enroll("CP-B").await;
    let err = attach(node.channel(&a).await.unwrap(), "CP-B")
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("CP-A"), "{}", err.message());
    assert!(audit_has(&node, "security-event", "CP-B").await);
    // Speaking for itself works on the same certificate.
    let mut ok = attach(node.channel(&a).await.unwrap(), "CP-A").await.unwrap();
    ok.heartbeat().await.unwrap();
}

#[tokio::test]
async fn foreign_ca_is_refused() {
    let node = TestNode::start().await;
    // A complete CA of its own, with a perfectly formed charger certificate.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&key).unwrap();
    let issuer = rcgen::Issuer::new(ca, &key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = charger_params("CP-A").signed_by(&leaf_key, &issuer).unwrap();
    let creds = Creds {
        chain_pem: format!("{}{}", leaf.pem(), ca_cert.pem()),
        key_pem: leaf_key.serialize_pem(),
        serial: String::new(),
    };
    assert!(!served(&node, &creds).await);
    let genuine = node.enroll("CP-A").await;
    assert!(served(&node, &genuine).await, "the control case must be served");
}

#[tokio::test]
async fn expired_and_not_yet_valid_certificates_are_refused() {
    let node = TestNode::start().await;
    let mut expired = charger_params("CP-OLD");
    let now = time::OffsetDateTime::now_utc();
    expired.not_before = now - time::Duration::days(400);
    expired.not_after = now - time::Duration::days(35);
    assert!(!served(&node, &forge(&node, expired)).await);
    let mut future = charger_params("CP-NEW");
    future.not_before = now + time::Duration::days(2);
    future.not_after = now + time::Duration::days(300);
    assert!(!served(&node, &forge(&node, future)).await);
}

#[tokio::test]
async fn server_auth_only_and_ca_true_leaves_are_refused() {
    let node = TestNode::start().await;
    let mut server_only = charger_params("CP-S");
    server_only.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    assert!(!served(&node, &forge(&node, server_only)).await);
    let mut ca_leaf = charger_params("CP-CA");
    ca_leaf.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_leaf.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyCertSign,
    ];
    assert!(!served(&node, &forge(&node, ca_leaf)).await);
}

#[tokio::test]
async fn certificate_the_ca_never_recorded_is_refused() {
    // Signed by the real intermediate key, valid in every way a TLS
    // verifier checks, but not in the CA's records: refused after the handshake.
    let node = TestNode::start().await;
    let forged = forge(&node, charger_params("CP-FORGED"));
    assert!(!served(&node, &forged).await);
    assert!(
        eventually(Duration::from_secs(5), || audit_has(
            &node,
            "auth-refused",
            "not issued by this CA"
        ))
        .await
    );
}

#[tokio::test]
async fn no_client_certificate_gets_nothing() {
    let node = TestNode::start().await;
    let tcp = tokio::net::TcpStream::connect(node.node().mtls_addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(node.tls(None));
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    // TLS 1.3 lets the client finish its side before the server refuses.
    let got = match connector.connect(name, tcp).await {
        Err(_) => Vec::new(),
        Ok(mut tls) => {
            let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            let mut buf = vec![0u8; 1024];
            match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
                Ok(Ok(n)) => buf[..n].to_vec(),
                Ok(Err(_)) => Vec::new(),
                Err(_) => panic!("the server neither refused nor closed"),
            }
        }
    };
    assert!(
        got.is_empty(),
        "the server sent {} bytes of application data to a client without a certificate",
        got.len()
    );
}

#[tokio::test]
async fn roles_are_enforced() {
    let node = TestNode::start().await;
    let viewer = node.operator("Vera Viewer", Role::Viewer).await;
    let mut pki = laddnet_proto::v1::pki_service_client::PkiServiceClient::new(node.channel(&viewer).await.unwrap());
    let err = pki
        .create_enrollment_token(v1::CreateEnrollmentTokenRequest {
            charger_id: "CP-1".into(),
            ttl_seconds: 0,
            site_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("viewer"), "{}", err.message());

    let security = node.operator("Sam Security", Role::SecurityAdmin).await;
    let mut pki = laddnet_proto::v1::pki_service_client::PkiServiceClient::new(node.channel(&security).await.unwrap());
    pki.create_enrollment_token(v1::CreateEnrollmentTokenRequest {
        charger_id: "CP-1".into(),
        ttl_seconds: 0,
        site_id: String::new(),
    })
    .await
    .unwrap();

    // A charger's certificate opens no operator door.
    let charger = node.enroll("CP-1").await;
    let mut pki = laddnet_proto::v1::pki_service_client::PkiServiceClient::new(node.channel(&charger).await.unwrap());
    let err = pki
        .list_certificates(v1::ListCertificatesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    // And an operator cannot attach as a charger.
    let err = attach(node.channel(&viewer).await.unwrap(), "Vera Viewer")
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
}
