//! Drivers over the real protocol: authorization with reasons at the
//! charger, offline starts reconciled after the fact, personal data behind
//! a role.

use std::time::Duration;

use laddnet_core::Role;
use laddnet_proto::v1;
use laddnet_proto::v1::TransactionEventType as T;
use laddnet_proto::v1::driver_admin_service_client::DriverAdminServiceClient;
use laddnet_tests::*;

async fn authorize(cp: &mut Attached, token: &str) -> v1::AuthorizeResult {
    let r = cp
        .request(v1::charger_message::Payload::Authorize(v1::Authorize {
            id_token: token.into(),
            token_type: v1::TokenType::Rfid as i32,
            connector_id: 1,
        }))
        .await
        .unwrap();
    match r.payload {
        Some(v1::central_message::Payload::AuthorizeResult(a)) => a,
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn authorization_answers_with_reasons_and_offline_starts_reconcile() {
    let node = TestNode::start().await;
    let mut admin = DriverAdminServiceClient::new(node.channel(&node.admin).await.unwrap());
    let d = admin
        .create_driver(v1::CreateDriverRequest {
            name: "Ada Lovelace".into(),
            email: "ada@example.org".into(),
            payment: "card".into(),
            max_concurrent_sessions: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let tok = admin
        .add_token(v1::AddTokenRequest {
            driver_id: d.driver_id.clone(),
            kind: "rfid".into(),
            value: "04A1B2C3".into(),
            expires_at: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let (_, mut cp) = node.charger("CP-1").await;

    let ok = authorize(&mut cp, "04a1b2c3").await;
    assert!(ok.accepted, "{ok:?}");
    assert_eq!(ok.status, v1::AuthorizationStatus::Accepted as i32);
    let unknown = authorize(&mut cp, "DEADBEEF").await;
    assert!(!unknown.accepted);
    assert_eq!(unknown.status, v1::AuthorizationStatus::Unknown as i32);
    assert_eq!(unknown.reason, "rfid token is not known");

    admin
        .set_token_status(v1::SetTokenStatusRequest {
            token_id: tok.token_id.clone(),
            status: "blocked".into(),
        })
        .await
        .unwrap();
    let blocked = authorize(&mut cp, "04A1B2C3").await;
    assert_eq!(
        (blocked.status, blocked.reason.as_str()),
        (v1::AuthorizationStatus::Blocked as i32, "token is blocked")
    );

    // The charger was offline and let the (now blocked) card start from its
    // old list; on reconnect the start is authorized after the fact:
    // flagged, and the charger is told to stop it.
    let mut e = tx_event("tx-offline", 0, T::Started, 1_000, 0);
    e.id_token = "04A1B2C3".into();
    e.offline = true;
    cp.tx
        .send(v1::ChargerMessage {
            msg_id: 9_001,
            payload: Some(v1::charger_message::Payload::Transaction(e)),
        })
        .await
        .unwrap();
    let stop = tokio::time::timeout(Duration::from_secs(10), async {
        let (mut acked, mut stopped) = (false, None);
        while !(acked && stopped.is_some()) {
            let m = cp.rx.message().await.unwrap().unwrap();
            match m.payload {
                Some(v1::central_message::Payload::TransactionAck(_)) if m.msg_id == 9_001 => acked = true,
                Some(v1::central_message::Payload::Command(v1::Command {
                    kind: Some(v1::command::Kind::RemoteStop(s)),
                    ..
                })) => stopped = Some(s.transaction_id),
                _ => {}
            }
        }
        stopped.unwrap_or_default()
    })
    .await
    .expect("a remote stop for the unauthorized start");
    assert_eq!(stop, "tx-offline");
    let s = node.session("tx-offline").await.unwrap();
    assert!(s.flags.contains(&"unauthorized-start".to_string()), "{:?}", s.flags);

    // Unblocked, an offline start is attributed to the driver.
    admin
        .set_token_status(v1::SetTokenStatusRequest {
            token_id: tok.token_id.clone(),
            status: "active".into(),
        })
        .await
        .unwrap();
    let mut e = tx_event("tx-ok", 0, T::Started, 1_000, 0);
    e.id_token = "04A1B2C3".into();
    e.offline = true;
    assert!(cp.event(e).await.unwrap());
    let s = node.session("tx-ok").await.unwrap();
    assert!(s.flags.is_empty(), "{:?}", s.flags);
    let export = admin
        .export_driver(v1::ExportDriverRequest {
            driver_id: d.driver_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .json;
    assert!(
        export.contains("\"tx-ok\"") && export.contains("Ada Lovelace"),
        "{export}"
    );
    let shown = admin
        .get_driver(v1::GetDriverRequest {
            driver_id: d.driver_id.clone(),
            with_personal: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        shown.open_sessions, 2,
        "both starts are the driver's (the refused one until the charger stops it)"
    );
    assert!(shown.personal.is_empty());

    // Personal data needs the support or admin role.
    let op = node.operator("ops", Role::Operator).await;
    let mut as_op = DriverAdminServiceClient::new(node.channel(&op).await.unwrap());
    let e = as_op
        .get_driver(v1::GetDriverRequest {
            driver_id: d.driver_id.clone(),
            with_personal: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(
        as_op
            .export_driver(v1::ExportDriverRequest {
                driver_id: d.driver_id.clone()
            })
            .await
            .is_err()
    );
}
