//! The support desk and the security team through the real binaries:
//! `laddctl drivers …` on a `laddnet up` node, then a master-key rotation
//! with `laddnet vault rotate`, the background rewrap seen through
//! `laddctl vault status`, and the old key file removed with every
//! driver's data still readable.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use laddnet_tests::{bin, ctl, json, start_up, stop};

fn fails(dir: &Path, args: &[&str], says: &str) {
    let out = ctl(dir, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "laddctl {args:?} succeeded");
    assert!(err.contains(says), "laddctl {args:?}: {err:?} does not say {says:?}");
}

fn vault_status(dir: &Path) -> serde_json::Value {
    json(&ctl(dir, &["vault", "status", "-o", "json"]))
}

fn personal_name(dir: &Path, id: &str) -> serde_json::Value {
    json(&ctl(dir, &["drivers", "show", id, "--personal", "-o", "json"]))["personal"]["name"].clone()
}

#[test]
fn drivers_and_vault_keys_through_laddctl_and_laddnet() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    bin("laddnet");
    let up = start_up(d, &["--chargers", "0"]);

    let created = json(&ctl(
        d,
        &[
            "drivers",
            "create",
            "--name",
            "Ada Lovelace",
            "--email",
            "ada@example.org",
            "--payment",
            "wallet",
            "-o",
            "json",
        ],
    ));
    let id = created["driver_id"].as_str().unwrap().to_string();
    assert_eq!(created["status"], "active");
    assert_eq!(created["personal_fields"], serde_json::json!(["email", "name"]));
    assert_eq!(
        created["personal"],
        serde_json::json!({}),
        "personal data shown unasked"
    );

    // Bad input is named, and nothing is written.
    fails(d, &["drivers", "create", "--payment", "bitcoin"], "bitcoin");
    fails(d, &["drivers", "show", "drv-00000000000000ff"], "not found");
    fails(d, &["drivers", "erase", &id], "--yes");
    fails(d, &["drivers", "topup", &id, "ten"], "ten");
    fails(d, &["drivers", "prefs", &id, "--target-soc", "150"], "150");
    fails(d, &["drivers", "watch", &id, "moon:1"], "moon:1");
    assert_eq!(
        json(&ctl(d, &["drivers", "list", "-o", "json"]))["drivers"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let tok = json(&ctl(d, &["drivers", "tokens", "add", &id, "04AB12CD", "-o", "json"]));
    assert_eq!(
        (tok["kind"].as_str(), tok["status"].as_str()),
        (Some("rfid"), Some("active"))
    );
    assert!(!tok["token_ref"].as_str().unwrap().to_lowercase().contains("04ab12cd"));
    fails(d, &["drivers", "tokens", "add", &id, "04ab12cd"], "already exists");
    let tid = tok["token_id"].as_str().unwrap();
    let blocked = json(&ctl(d, &["drivers", "tokens", "block", tid, "-o", "json"]));
    assert_eq!(blocked["status"], "blocked");
    let wallet = json(&ctl(d, &["drivers", "topup", &id, "25.50", "-o", "json"]));
    assert_eq!(wallet["wallet_balance"], "25.50");
    let prefs = json(&ctl(
        d,
        &[
            "drivers",
            "prefs",
            &id,
            "--target-soc",
            "80",
            "--max-price-per-kwh",
            "0.60",
            "-o",
            "json",
        ],
    ));
    assert_eq!(prefs["preferences"]["target_soc_percent"], 80);
    assert_eq!(prefs["preferences"]["max_price_per_kwh"], "0.60");
    let watched = json(&ctl(d, &["drivers", "watch", &id, "site:central-garage", "-o", "json"]));
    assert_eq!(watched["watches"], serde_json::json!(["site:central-garage"]));
    assert_eq!(personal_name(d, &id), "Ada Lovelace");
    let export = ctl(d, &["drivers", "export", &id]);
    let export: serde_json::Value = serde_json::from_slice(&export.stdout).expect("export is JSON");
    let text = export.to_string();
    assert!(text.contains("ada@example.org") && text.contains("04AB12CD"), "{text}");
    assert!(ctl(d, &["drivers", "insights", &id]).status.success());
    let util = ctl(d, &["sites", "utilisation", "central-garage"]);
    assert!(util.status.success(), "{}", String::from_utf8_lossy(&util.stderr));
    let util: serde_json::Value = serde_json::from_slice(&util.stdout).expect("utilisation is JSON");
    assert!(util.to_string().contains("central-garage"), "{util}");
    let access = json(&ctl(
        d,
        &[
            "sites",
            "access",
            "harbour-depot",
            "--private",
            "--group",
            "fleet",
            "-o",
            "json",
        ],
    ));
    assert_eq!(
        (access["private"].as_bool(), access["groups"].clone()),
        (Some(true), serde_json::json!(["fleet"]))
    );
    fails(
        d,
        &[
            "maintenance",
            "schedule",
            "--site",
            "central-garage",
            "--from",
            "2030-01-02T00:00:00Z",
            "--to",
            "2030-01-01T00:00:00Z",
            "--reason",
            "x",
        ],
        "ends_at must be after starts_at",
    );
    fails(
        d,
        &[
            "maintenance",
            "schedule",
            "--site",
            "central-garage",
            "--from",
            "tomorrow",
            "--to",
            "2030-01-01T00:00:00Z",
            "--reason",
            "x",
        ],
        "tomorrow",
    );
    let planned = ctl(
        d,
        &[
            "maintenance",
            "schedule",
            "--site",
            "central-garage",
            "--from",
            "2030-01-01T08:00:00Z",
            "--to",
            "2030-01-01T10:00:00Z",
            "--reason",
            "transformer service",
        ],
    );
    assert!(planned.status.success(), "{}", String::from_utf8_lossy(&planned.stderr));

    // Billing: a plan, a subscription, this month's invoice as HTML.
    let plan = json(&ctl(
        d,
        &[
            "plans", "create", "commuter", "--name", "Commuter", "--fee", "9.90", "--vat", "25", "-o", "json",
        ],
    ));
    assert_eq!(plan["monthly_fee"], "9.90");
    fails(
        d,
        &["plans", "create", "gold", "--name", "Gold", "--vat", "150"],
        "vat_percent 150",
    );
    fails(d, &["plans", "subscribe", &id, "platinum"], "plan platinum not found");
    let sub = json(&ctl(d, &["plans", "subscribe", &id, "commuter", "-o", "json"]));
    assert_eq!(
        (sub["plan_id"].as_str(), sub["until"].as_str()),
        (Some("commuter"), Some(""))
    );
    let month = time::OffsetDateTime::now_utc();
    let period = format!("{:04}-{:02}", month.year(), u8::from(month.month()));
    fails(d, &["invoices", "run", "--period", "2026-13"], "2026-13");
    let run = json(&ctl(d, &["invoices", "run", "--period", &period, "-o", "json"]));
    let inv = &run["invoices"][0];
    assert_eq!(inv["driver"], id.as_str(), "{run}");
    assert_eq!(inv["lines"][0]["kind"], "subscription");
    let number = inv["number"].as_str().unwrap().to_string();
    assert!(number.starts_with(&format!("INV-{}-", month.year())));
    let show = ctl(d, &["invoices", "show", &number, "--html", "invoice.html"]);
    assert!(show.status.success(), "{}", String::from_utf8_lossy(&show.stderr));
    let html = std::fs::read_to_string(d.join("invoice.html")).unwrap();
    assert!(
        html.contains(&number) && html.contains("Subscription Commuter"),
        "{html}"
    );
    assert!(!html.contains("Ada"), "personal data on an invoice page");
    let listed = json(&ctl(d, &["invoices", "list", "--driver", &id, "-o", "json"]));
    assert_eq!(listed["invoices"].as_array().unwrap().len(), 1);
    assert_eq!(json(&ctl(d, &["ledger", "verify", "-o", "json"]))["ok"], true);

    // The security team rotates the master key on the node's host.
    let status = vault_status(d);
    assert_eq!(status["current_master"], 1);
    assert_eq!(status["rewrap_finished"], true);
    let (code, log) = stop(up);
    assert!(code.success(), "{log}");
    let rotate = Command::new(bin("laddnet"))
        .args(["vault", "rotate", "--config", "laddnet-data/laddnet.toml"])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(rotate.status.success(), "{}", String::from_utf8_lossy(&rotate.stderr));
    assert!(String::from_utf8_lossy(&rotate.stdout).contains("master key version 2"));

    // Restarted, the node rewraps every data key under version 2.
    let up = start_up(d, &["--chargers", "0"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut status = vault_status(d);
    while status["by_master"]
        != serde_json::json!([{"version": 2, "wrapped_keys": status["by_master"][0]["wrapped_keys"]}])
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
        status = vault_status(d);
    }
    assert_eq!(status["current_master"], 2);
    assert_eq!(status["by_master"].as_array().unwrap().len(), 1, "{status}");
    assert_eq!(status["by_master"][0]["version"], 2, "{status}");
    assert_eq!(status["rewrap_finished"], true);
    assert_eq!(personal_name(d, &id), "Ada Lovelace");
    let (code, log) = stop(up);
    assert!(code.success(), "{log}");
    assert!(log.contains("rewrap finished"), "{log}");

    // Nothing needs the old key any more: it goes, and the data stays.
    std::fs::remove_file(d.join("laddnet-data/keys/master-v1.key")).unwrap();
    let up = start_up(d, &["--chargers", "0"]);
    assert_eq!(personal_name(d, &id), "Ada Lovelace");

    // Erasure, through the CLI.
    let erased = json(&ctl(d, &["drivers", "erase", &id, "--yes", "-o", "json"]));
    assert_eq!(erased["status"], "erased");
    assert_eq!(personal_name(d, &id), serde_json::Value::Null);
    let export = String::from_utf8_lossy(&ctl(d, &["drivers", "export", &id]).stdout).into_owned();
    assert!(!export.contains("Ada") && !export.contains("04AB12CD"), "{export}");
    let (code, log) = stop(up);
    assert!(code.success(), "{log}");
}
