//! The README's first command as a newcomer runs it: `laddnet up` in an
//! empty directory, then `laddctl` from the same directory with no flags.

use std::process::Command;
use std::time::Duration;

use laddnet_tests::{bin, ctl, json, laddnet_init, start_up, stop, stop_with};

#[test]
fn up_then_laddctl_from_the_same_directory() {
    let dir = tempfile::tempdir().unwrap();
    // Find (or build) the binaries before the clock starts.
    bin("laddnet");
    bin("laddctl");
    let started = std::time::Instant::now();
    let up = start_up(dir.path(), &[]);
    assert!(up.ctl_config.ends_with("laddnet-data/laddctl.toml"));

    // The simulated fleet charges within 15 s, and laddctl beside it sees it.
    let mut sessions = Vec::new();
    while started.elapsed() < Duration::from_secs(15) {
        let out = ctl(dir.path(), &["sessions", "list", "--output", "json"]);
        if out.status.success() {
            sessions = json(&out)["sessions"].as_array().cloned().unwrap_or_default();
            if !sessions.is_empty() {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(!sessions.is_empty(), "no session within 15 s of `laddnet up`");
    assert!(sessions[0]["charger_id"].as_str().unwrap().starts_with("SIM-"));
    let table = ctl(dir.path(), &["sessions", "list"]);
    assert!(table.status.success(), "{}", String::from_utf8_lossy(&table.stderr));
    assert!(String::from_utf8_lossy(&table.stdout).starts_with("TRANSACTION"));
    let table = ctl(
        dir.path(),
        &[
            "tariffs",
            "preview",
            "--tariff",
            "demo-standard",
            "--stretch",
            "60:22",
            "--stretch",
            "30:0",
        ],
    );
    assert!(table.status.success(), "{}", String::from_utf8_lossy(&table.stderr));
    let bad = ctl(
        dir.path(),
        &["tariffs", "preview", "--tariff", "demo-standard", "--stretch", "bogus"],
    );
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("MINUTES:KWH"));
    for args in [
        &["cdrs", "list"][..],
        &["ledger", "verify"],
        &["revenue", "report", "--by", "charger"],
        &["sites", "list"],
        &["chargers", "show", "SIM-0001"],
        &["incidents", "list"],
        &["drivers", "list"],
        &["invoices", "list"],
    ] {
        let out = ctl(dir.path(), args);
        assert!(
            out.status.success(),
            "laddctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let chargers = json(&ctl(dir.path(), &["chargers", "list", "-o", "json"]));
    assert!(!chargers["chargers"].as_array().unwrap().is_empty());
    let sites = json(&ctl(dir.path(), &["sites", "list", "-o", "json"]));
    assert_eq!(sites["sites"].as_array().unwrap().len(), 3);

    let who = json(&ctl(dir.path(), &["whoami", "--output", "json"]));
    assert_eq!(who["role"], "admin");
    let token = json(&ctl(
        dir.path(),
        &["pki", "token", "create", "CP-9", "--site", "depot-1", "-o", "json"],
    ));
    assert!(token["token"].as_str().unwrap().starts_with("ldt_"));
    let list = json(&ctl(dir.path(), &["pki", "list", "-o", "json"]));
    assert!(
        list["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["subject"] == "admin" && c["role"] == "admin")
    );
    let table = ctl(dir.path(), &["pki", "list"]);
    assert!(String::from_utf8_lossy(&table.stdout).starts_with("SERIAL"));

    let issued = json(&ctl(
        dir.path(),
        &[
            "operators",
            "issue",
            "Op One",
            "--role",
            "operator",
            "--out-dir",
            "ops",
            "-o",
            "json",
        ],
    ));
    assert_eq!(issued["role"], "operator");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ops/Op_One.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let audit = json(&ctl(dir.path(), &["pki", "audit", "verify", "-o", "json"]));
    assert_eq!(audit["ok"], true);
    let crl = json(&ctl(dir.path(), &["pki", "crl", "-o", "json"]));
    assert!(crl["crl_number"].as_u64().unwrap() >= 1);

    // Errors name the problem and exit non-zero.
    let bad = ctl(dir.path(), &["pki", "revoke", "not-a-serial"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not-a-serial"));
    let bad = ctl(dir.path(), &["operators", "issue", "X", "--role", "root"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown role"));
    let elsewhere = tempfile::tempdir().unwrap();
    let lost = ctl(elsewhere.path(), &["whoami"]);
    assert!(!lost.status.success());
    assert!(String::from_utf8_lossy(&lost.stderr).contains("no laddctl config"));
    // LADDCTL_CONFIG from anywhere.
    let from_env = Command::new(bin("laddctl"))
        .args(["whoami", "-o", "json"])
        .current_dir(elsewhere.path())
        .env("LADDCTL_CONFIG", &up.ctl_config)
        .output()
        .unwrap();
    assert_eq!(json(&from_env)["name"], "admin");
    // LADDCTL_ENDPOINT overrides the file's endpoint (a load balancer):
    // a bad one is named, a wrong one fails to connect.
    let with_endpoint = |e: &str| {
        Command::new(bin("laddctl"))
            .args(["whoami", "-o", "json"])
            .current_dir(dir.path())
            .env("LADDCTL_ENDPOINT", e)
            .output()
            .unwrap()
    };
    let bad = with_endpoint("http://127.0.0.1:1");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("LADDCTL_ENDPOINT must be https://host:port"));
    assert!(!with_endpoint("https://127.0.0.1:1").status.success());
    // The node is a cluster of one: itself, alive.
    let members = json(&ctl(dir.path(), &["cluster", "members", "-o", "json"]));
    let members = members.as_array().expect("a list of members");
    assert_eq!(members.len(), 1, "{members:?}");
    assert_eq!(members[0]["alive"], true);
    assert_eq!(members[0]["incarnation"], 1);
    let completions = ctl(dir.path(), &["completions", "bash"]);
    assert!(String::from_utf8_lossy(&completions.stdout).contains("laddctl"));

    // Ctrl-C stops cleanly; running again resumes from the same data.
    let (status, stderr) = stop(up);
    assert!(status.success(), "{stderr}");
    let key = std::fs::read_to_string(dir.path().join("laddnet-data/credentials/admin.key")).unwrap();
    let key_body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(
        !stderr.contains("PRIVATE KEY") && !stderr.contains(&key_body[..32]),
        "key material in the log"
    );
    assert!(
        !stderr.contains(token["token"].as_str().unwrap()),
        "a token value in the log"
    );

    let again = start_up(dir.path(), &[]);
    let who = json(&ctl(dir.path(), &["whoami", "-o", "json"]));
    assert_eq!(who["name"], "admin");
    let list = json(&ctl(
        dir.path(),
        &["pki", "list", "--profile", "operator", "-o", "json"],
    ));
    assert_eq!(
        list["certificates"].as_array().unwrap().len(),
        2,
        "admin and Op One survive the restart"
    );
    // SIGTERM (systemd, containers) stops it as cleanly as Ctrl-C.
    let (status, stderr) = stop_with(again, "-TERM");
    assert!(status.success());
    assert!(stderr.contains("node stopped"), "{stderr}");
    assert!(stderr.contains("resuming"));
}

#[test]
fn validate_names_the_bad_field() {
    let dir = tempfile::tempdir().unwrap();
    laddnet_init(dir.path());
    let ok = Command::new(bin("laddnet"))
        .args(["validate", "--config", "d/laddnet.toml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let bad = Command::new(bin("laddnet"))
        .args(["validate", "--config", "d/laddnet.toml"])
        .env("LADDNET_GRPC__MAX_CONCURRENT_STREAMS", "0")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("grpc.max_concurrent_streams"));
    // A second init never overwrites the CA.
    let again = Command::new(bin("laddnet"))
        .args(["init", "--data-dir", "d"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
}

/// A newcomer who stops `laddnet up` while its simulated fleet is still
/// enrolling gets a clean, prompt stop: the enrolling task held the CA
/// (and through it the store), and the node waited 10 s for it, then
/// stopped with the store still open.
/// How many chargers `laddctl chargers list` shows (0 while the node is
/// not answering yet).
fn chargers_listed(dir: &std::path::Path) -> usize {
    let out = ctl(dir, &["chargers", "list", "--output", "json"]);
    if out.status.success() {
        json(&out)["chargers"].as_array().map_or(0, Vec::len)
    } else {
        0
    }
}

#[test]
fn the_demo_fleet_enrolls_at_the_listeners_pace_without_tripping_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    bin("laddnet");
    bin("laddctl");
    // The policy allows a burst of 10 enrollments per address, then 30 a
    // minute: 13 chargers need the paced part too.
    let up = start_up(dir.path(), &["--chargers", "13"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let listed = chargers_listed(dir.path());
        if listed == 13 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{listed} of 13 chargers enrolled within 90 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, stderr) = stop(up);
    assert!(status.success(), "{stderr}");
    assert!(
        !stderr.contains("enrollment rate limit reached"),
        "the demo fleet tripped the enrollment limit:\n{stderr}"
    );
}

#[test]
fn stopping_while_the_fleet_still_enrolls_closes_the_store() {
    let dir = tempfile::tempdir().unwrap();
    bin("laddnet");
    bin("laddctl");
    // 200 chargers: the enrollment listener's rate limit spreads their
    // enrollment over far longer than this test runs.
    let up = start_up(dir.path(), &["--chargers", "200"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if chargers_listed(dir.path()) > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no charger enrolled within 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, stderr) = stop_with(up, "-TERM");
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("node stopped"), "{stderr}");
    assert!(
        !stderr.contains("tasks still hold the store"),
        "the store was still held at shutdown:\n{stderr}"
    );
    // And the data dir is free for the next run at once.
    let again = start_up(dir.path(), &["--chargers", "0"]);
    let (status, stderr) = stop(again);
    assert!(status.success(), "{stderr}");
}
