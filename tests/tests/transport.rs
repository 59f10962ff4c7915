//! RELIABILITY.md 9, 10, 13–16 and the node's plumbing: protocol versions,
//! one stream per charger, slow handshakes, size limits, keys at rest, the
//! audit chain over gRPC, a bad CRL, health, reflection and paging.

use std::sync::Arc;
use std::time::Duration;

use laddnet_proto::v1;
use laddnet_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn tls12_only_with_aead_suites_and_nothing_older() {
    let node = TestNode::start().await;
    let creds = node.enroll("CP-T").await;
    // A TLS 1.2-only client still gets in, with an ECDHE + AEAD suite.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        for c in laddnet_pki::tls::certs_from_pem(&node.root_pem).unwrap() {
            r.add(c).unwrap();
        }
        r
    };
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            laddnet_pki::tls::certs_from_pem(&creds.chain_pem).unwrap(),
            laddnet_pki::tls::key_from_pem(&creds.key_pem).unwrap(),
        )
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(node.node().mtls_addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(rustls_pki_types::ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let suite = format!("{:?}", tls.get_ref().1.negotiated_cipher_suite().unwrap().suite());
    assert!(
        suite.contains("ECDHE") && (suite.contains("GCM") || suite.contains("CHACHA20")),
        "{suite}"
    );

    // openssl, independently: no static-RSA or CBC suite, no TLS 1.1 ...
    let addr = node.node().mtls_addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.pem"), &creds.chain_pem).unwrap();
    std::fs::write(dir.path().join("k.pem"), &creds.key_pem).unwrap();
    // ... while the same client with an ECDHE + AEAD suite gets through (the control).
    let mut cmd = std::process::Command::new("openssl");
    cmd.args([
        "s_client",
        "-connect",
        &addr,
        "-servername",
        "localhost",
        "-tls1_2",
        "-cipher",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
    ])
    .arg("-cert")
    .arg(dir.path().join("c.pem"))
    .arg("-key")
    .arg(dir.path().join("k.pem"))
    .stdin(std::process::Stdio::null());
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("openssl installed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("ECDHE-ECDSA-AES128-GCM-SHA256") && !text.contains("Cipher is (NONE)"),
        "control failed: {text}"
    );
    for args in [
        vec!["-tls1_2", "-cipher", "AES128-SHA"],
        vec!["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA"],
        vec!["-tls1_1"],
    ] {
        let mut cmd = std::process::Command::new("openssl");
        cmd.args(["s_client", "-connect", &addr, "-servername", "localhost"])
            .args(&args);
        cmd.arg("-cert")
            .arg(dir.path().join("c.pem"))
            .arg("-key")
            .arg(dir.path().join("k.pem"));
        cmd.stdin(std::process::Stdio::null());
        // The node runs on this test's runtime: wait for openssl off it.
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .unwrap()
            .expect("openssl installed");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !out.status.success() || text.contains("Cipher is (NONE)") || text.contains("Cipher    : 0000"),
            "openssl {args:?} negotiated: {text}"
        );
    }
}

#[tokio::test]
async fn one_live_stream_per_charger_and_the_first_keeps_it() {
    let node = TestNode::start().await;
    let creds = node.enroll("CP-1").await;
    let mut first = attach(node.channel(&creds).await.unwrap(), "CP-1").await.unwrap();
    // A second connection with the same certificate (a stolen key, or a
    // confused charger) cannot take the place.
    let err = attach(node.channel(&creds).await.unwrap(), "CP-1").await.err().unwrap();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    first.heartbeat().await.expect("the first stream is untouched");
    assert_eq!(node.node().state.chargers.len(), 1);
    // Once the first goes away, the charger may come back.
    drop(first);
    let back = eventually(Duration::from_secs(10), || {
        let node = &node;
        let creds = creds.clone();
        async move { attach(node.channel(&creds).await.unwrap(), "CP-1").await.is_ok() }
    })
    .await;
    assert!(back);
}

#[tokio::test]
async fn half_open_handshakes_time_out_and_do_not_delay_others() {
    let node = TestNode::start_with(|c| {
        c.tls.handshake_timeout_ms = 500;
        c.tls.max_pending_handshakes = 64;
    })
    .await;
    let creds = node.enroll("CP-1").await;
    // Twenty slowloris connections: TCP open, a partial ClientHello, then silence.
    let mut idle = Vec::new();
    for _ in 0..20 {
        let mut s = tokio::net::TcpStream::connect(node.node().mtls_addr).await.unwrap();
        s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await.unwrap();
        idle.push(s);
    }
    // A legitimate handshake meanwhile completes promptly.
    let started = std::time::Instant::now();
    assert!(served(&node, &creds).await);
    assert!(
        started.elapsed() < Duration::from_millis(450),
        "took {:?}",
        started.elapsed()
    );
    // Each slow connection is closed by the server after the deadline.
    for mut s in idle {
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        match r {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            other => panic!("slow handshake not closed: {other:?}"),
        }
    }
}

#[tokio::test]
async fn message_size_limits_hold_both_ways() {
    let node = TestNode::start_with(|c| c.grpc.max_message_bytes = 4096).await;
    let mut pki = node.pki().await;
    let err = pki
        .create_enrollment_token(v1::CreateEnrollmentTokenRequest {
            charger_id: "x".repeat(10_000),
            ttl_seconds: 0,
            site_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    // A response over the limit is refused by the server too: a listing of
    // certificates (each ~700 bytes of PEM) larger than 4 KiB.
    for i in 0..8 {
        node.enroll(&format!("CP-{i}")).await;
    }
    let err = pki
        .list_certificates(v1::ListCertificatesRequest {
            page: Some(v1::PageRequest {
                page_size: 100,
                page_token: String::new(),
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted | tonic::Code::Internal
        ),
        "{err:?}"
    );
    // Small pages still work.
    pki.list_certificates(v1::ListCertificatesRequest {
        page: Some(v1::PageRequest {
            page_size: 1,
            page_token: String::new(),
        }),
        ..Default::default()
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn lists_paginate() {
    let node = TestNode::start().await;
    for i in 0..5 {
        node.enroll(&format!("CP-{i}")).await;
    }
    let mut pki = node.pki().await;
    let mut token = String::new();
    let mut serials = Vec::new();
    let mut pages = 0;
    loop {
        let r = pki
            .list_certificates(v1::ListCertificatesRequest {
                page: Some(v1::PageRequest {
                    page_size: 2,
                    page_token: token.clone(),
                }),
                profile: "charger".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.certificates.len() <= 2);
        serials.extend(r.certificates.into_iter().map(|c| c.serial));
        pages += 1;
        token = r.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(serials.len(), 5);
    assert_eq!(pages, 3);
    let mut sorted = serials.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 5, "no row twice");
    let err = pki
        .list_certificates(v1::ListCertificatesRequest {
            page: Some(v1::PageRequest {
                page_size: 2,
                page_token: "not-a-token".into(),
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = pki
        .list_certificates(v1::ListCertificatesRequest {
            status: "sleepy".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("sleepy"));
}

#[tokio::test]
async fn health_and_reflection_answer_authenticated_peers() {
    let node = TestNode::start().await;
    let ch = node.channel(&node.admin).await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "laddnet.v1.PkiService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // Reflection lists the services, as `grpcurl … list` asks for them.
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, server_reflection_request::MessageRequest};
    let ch = node.channel(&node.admin).await.unwrap();
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(ch)
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let reply = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("{reply:?}")
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "laddnet.v1.ChargerService",
        "laddnet.v1.PkiService",
        "laddnet.v1.OperatorService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let node = TestNode::start_with(|c| c.grpc.max_header_list_bytes = 2048).await;
    let mut pki = node.pki().await;
    let mut req = tonic::Request::new(v1::GetCrlRequest {});
    req.metadata_mut()
        .insert("x-padding", "a".repeat(8192).parse().unwrap());
    assert!(pki.get_crl(req).await.is_err());
    pki.get_crl(v1::GetCrlRequest {}).await.expect("normal headers pass");
    // The control: the same header passes under the default 16 KiB limit.
    let roomy = TestNode::start().await;
    let mut req = tonic::Request::new(v1::GetCrlRequest {});
    req.metadata_mut()
        .insert("x-padding", "a".repeat(8192).parse().unwrap());
    roomy
        .pki()
        .await
        .get_crl(req)
        .await
        .expect("8 KiB of headers fit in 16 KiB");
}

#[tokio::test]
async fn intermediate_key_is_sealed_and_the_root_key_is_not_needed() {
    let mut node = TestNode::start().await;
    let files = laddnet_pki::CaFiles::new(node.config.ca_dir());
    let sealed = std::fs::read_to_string(files.intermediate_key()).unwrap();
    assert!(sealed.contains("AES-256-GCM") && !sealed.contains("PRIVATE KEY"));
    let raw = node.raw_issuer().key().serialize_der();
    let b64 = laddnet_vault_b64(&raw);
    assert!(!sealed.contains(&b64[..40]), "the key's bytes are not in the file");
    // Without the root key, the node starts and serves.
    node.stop().await;
    std::fs::remove_file(files.root_key()).unwrap();
    let restarted = laddnet_node::RunningNode::start(node.config.clone()).await.unwrap();
    let ch = laddnet_node::client::connect(
        &format!("https://{}", restarted.mtls_addr),
        "localhost",
        node.tls(Some(&node.admin)),
    )
    .await
    .unwrap();
    laddnet_proto::v1::operator_service_client::OperatorServiceClient::new(ch)
        .who_am_i(v1::WhoAmIRequest {})
        .await
        .unwrap();
    restarted.shutdown().await;
    // With the wrong key-encryption key it does not start, and says why.
    std::fs::remove_file(node.config.key_file()).unwrap();
    laddnet_vault::create_key_file(&node.config.key_file()).unwrap();
    let err = laddnet_node::RunningNode::start(node.config.clone())
        .await
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("wrong key"), "{err:#}");
}

fn laddnet_vault_b64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[tokio::test]
async fn audit_tampering_is_detected_over_grpc() {
    let node = TestNode::start().await;
    node.enroll("CP-1").await;
    let mut pki = node.pki().await;
    let v = pki.verify_audit(v1::VerifyAuditRequest {}).await.unwrap().into_inner();
    assert!(v.ok && v.entries >= 4, "{v:?}");
    // Someone with write access to the store edits entry 3.
    let store = node.node().state.store.clone();
    use laddnet_store::StoreExt;
    store
        .transact(|tx| {
            let key = laddnet_store::keys::pack(&("pki", "audit", 3u64));
            let mut e: serde_json::Value = serde_json::from_slice(&tx.get(&key)?.unwrap()).unwrap();
            e["actor"] = serde_json::json!("nobody");
            tx.set(&key, &serde_json::to_vec(&e).unwrap())
        })
        .unwrap();
    let v = pki.verify_audit(v1::VerifyAuditRequest {}).await.unwrap().into_inner();
    assert!(!v.ok);
    assert_eq!(v.first_bad_seq, 3);
}

#[tokio::test]
async fn a_malformed_crl_in_the_store_does_not_take_the_node_down() {
    let node = TestNode::start().await;
    let creds = node.enroll("CP-1").await;
    let state = node.node().state.clone();
    let number = state.crl_number();
    use laddnet_store::StoreExt;
    state
        .store
        .transact(|tx| {
            let key = laddnet_store::keys::pack(&("pki", "crl"));
            let mut c: serde_json::Value = serde_json::from_slice(&tx.get(&key)?.unwrap()).unwrap();
            c["number"] = serde_json::json!(number + 1);
            c["pem"] = serde_json::json!("-----BEGIN X509 CRL-----\nMAMCAQA=\n-----END X509 CRL-----\n");
            tx.set(&key, &serde_json::to_vec(&c).unwrap())
        })
        .unwrap();
    state.apply_revocations().await;
    assert_eq!(state.crl_number(), number, "the last good CRL stays in force");
    assert!(served(&node, &creds).await);
}
