//! A technician's day through the real binaries on a `laddnet up` node:
//! `laddctl firmware upload | campaign start | status | abort`,
//! `laddctl diagnostics request | get | list` and `laddctl sites load`.

use std::path::Path;
use std::time::{Duration, Instant};

use laddnet_tests::{bin, ctl, json, start_up, stop};

fn fails(dir: &Path, args: &[&str], says: &str) {
    let out = ctl(dir, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "laddctl {args:?} succeeded");
    assert!(err.contains(says), "laddctl {args:?}: {err:?} does not say {says:?}");
}

fn wait(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !ok() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn firmware_campaigns_diagnostics_and_site_load_through_laddctl() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    bin("laddnet");
    let up = start_up(d, &["--chargers", "2"]);
    let connected = |id: &str| {
        let out = ctl(d, &["chargers", "show", id, "-o", "json"]);
        out.status.success() && serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["connected"] == true
    };
    wait("the simulated chargers never connected", || {
        connected("SIM-0001") && connected("SIM-0002")
    });

    // Upload: the node signs the image.
    let image = d.join("fw-2.1.0.bin");
    std::fs::write(&image, vec![0xA5u8; 150_000]).unwrap();
    let img = json(&ctl(
        d,
        &[
            "firmware",
            "upload",
            image.to_str().unwrap(),
            "--version",
            "2.1.0",
            "-o",
            "json",
        ],
    ));
    assert_eq!(img["size"], 150_000);
    assert!(!img["signer_serial"].as_str().unwrap().is_empty());
    fails(
        d,
        &[
            "firmware",
            "upload",
            image.to_str().unwrap(),
            "--version",
            "bad version!",
        ],
        "firmware version",
    );
    fails(
        d,
        &["firmware", "upload", "/nonexistent.bin", "--version", "2.2.0"],
        "/nonexistent.bin",
    );
    fails(
        d,
        &["firmware", "campaign", "start", "--version", "9.9.9"],
        "no firmware 9.9.9",
    );

    // A campaign over both chargers: one canary, then the other.
    let c = json(&ctl(
        d,
        &[
            "firmware",
            "campaign",
            "start",
            "--version",
            "2.1.0",
            "--charger",
            "SIM-0001",
            "--charger",
            "SIM-0002",
            "--canary-percent",
            "50",
            "-o",
            "json",
        ],
    ));
    let id = c["id"].as_str().unwrap().to_string();
    let mut last = serde_json::Value::Null;
    wait("the campaign never completed", || {
        last = json(&ctl(d, &["firmware", "campaign", "status", &id, "-o", "json"]));
        last["state"] != "running"
    });
    assert_eq!(last["state"], "completed", "{last:#}");
    let shown = json(&ctl(d, &["chargers", "show", "SIM-0002", "-o", "json"]));
    assert_eq!(shown["firmware_version"], "2.1.0");
    fails(d, &["firmware", "campaign", "abort", &id], "not running");
    fails(
        d,
        &["firmware", "campaign", "status", "FW-999999"],
        "no campaign FW-999999",
    );
    let table = ctl(d, &["firmware", "campaign", "status", &id]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("SIM-0001") && table.contains("installed"), "{table}");

    // Diagnostics: asked for, uploaded over the stream, stored, fetched.
    let bundle = d.join("diag.log");
    let r = json(&ctl(
        d,
        &[
            "diagnostics",
            "request",
            "SIM-0001",
            "--out",
            bundle.to_str().unwrap(),
            "-o",
            "json",
        ],
    ));
    let text = std::fs::read_to_string(&bundle).unwrap();
    assert!(text.contains("charger SIM-0001"), "{text}");
    assert!(text.contains("firmware 2.1.0"), "{text}");
    assert_eq!(r["size"].as_u64().unwrap() as usize, text.len());
    let got = ctl(d, &["diagnostics", "get", "SIM-0001"]);
    assert!(got.status.success());
    assert_eq!(String::from_utf8_lossy(&got.stdout), text);
    let list = json(&ctl(d, &["diagnostics", "list", "SIM-0001", "-o", "json"]));
    assert_eq!(list["bundles"].as_array().unwrap().len(), 1);
    fails(d, &["diagnostics", "get", "SIM-0002"], "no diagnostics bundle");
    fails(d, &["diagnostics", "request", "NOPE-1"], "not connected");

    // The demo sites have grid limits: load management shows its plan.
    let load = json(&ctl(d, &["sites", "load", "central-garage", "-o", "json"]));
    assert_eq!(load["grid_limit_w"], 150_000);
    fails(d, &["sites", "load", "no-such-site"], "no site no-such-site");

    let (status, _) = stop(up);
    assert!(status.success());
}
