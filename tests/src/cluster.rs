//! A cluster test harness: N real `laddnet node` processes (real gRPC on
//! loopback, real mutual TLS) over one shared store, each of which can be
//! killed, frozen (SIGSTOP), thawed or restarted.
//!
//! The store is `laddnet store serve` on the first data dir; or, when
//! `FDB_CLUSTER_FILE` is set, that FoundationDB cluster (the binaries must
//! then be built with `--features fdb`, see docs/operations.md).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{Creds, NodeProcess, bin};

/// The shared store's process.
struct StoreProcess {
    child: Child,
}

impl Drop for StoreProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub root_pem: String,
    pub admin: Creds,
    pub nodes: Vec<Option<NodeProcess>>,
    env: Vec<Vec<(String, String)>>,
    _store: Option<StoreProcess>,
}

fn copy_dir(from: &Path, to: &Path, skip: &[&str]) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if skip.iter().any(|s| name == *s) {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&src, &dst, &[]);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

fn run(dir: &Path, args: &[&str], env: &[(String, String)]) {
    let out = Command::new(bin("laddnet"))
        .args(args)
        .current_dir(dir)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env_remove("LADDNET_CA_PASSPHRASE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "laddnet {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Cluster {
    /// Starts `n` nodes (`node-1` …) with membership leases of `lease_ms`.
    pub fn start(n: usize, lease_ms: u64) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let fdb = std::env::var("FDB_CLUSTER_FILE").ok();
        // The shipped policy, except that a whole fleet enrolls from this
        // one test process (loopback) at once.
        let policy = include_str!("../../pki/policy.toml")
            .replace("per_minute = 30", "per_minute = 60000")
            .replace("burst = 10", "burst = 1000");
        let policy_path = dir.path().join("policy.toml");
        std::fs::write(&policy_path, policy).unwrap();
        let mut common: Vec<(String, String)> = vec![
            ("LADDNET_CLUSTER__LEASE_MS".into(), lease_ms.to_string()),
            ("LADDNET_CA__POLICY".into(), policy_path.display().to_string()),
        ];
        if let Some(f) = &fdb {
            common.push(("LADDNET_STORE__BACKEND".into(), "foundationdb".into()));
            common.push(("LADDNET_STORE__CLUSTER_FILE".into(), f.clone()));
            // Each cluster in its own subspace: tests run side by side.
            let run = dir
                .path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            common.push(("LADDNET_STORE__KEY_PREFIX".into(), format!("\"laddnet-test/{run}/\"")));
        }
        // One CA, one key-encryption key, one set of master keys for all
        // (init creates them; each node gets a copy of the data dir).
        run(dir.path(), &["init", "--data-dir", "s"], &common);
        let store = if fdb.is_none() {
            let mut args = vec![
                "store".to_string(),
                "serve".into(),
                "--config".into(),
                "s/laddnet.toml".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
            ];
            for i in 1..=n {
                args.push("--client".into());
                args.push(format!("node-{i}"));
            }
            let mut child = Command::new(bin("laddnet"))
                .args(&args)
                .current_dir(dir.path())
                .env_remove("LADDNET_CA_PASSPHRASE")
                .stdout(Stdio::piped())
                .stderr(
                    std::fs::File::create(dir.path().join("store.log"))
                        .map(Stdio::from)
                        .unwrap_or(Stdio::null()),
                )
                .spawn()
                .unwrap();
            let stdout = child.stdout.take().unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Some(a) = line.strip_prefix("store serving on ") {
                        let _ = tx.send(a.to_string());
                    }
                }
            });
            let addr = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("the store server printed its address");
            common.push(("LADDNET_STORE__BACKEND".into(), "shared".into()));
            common.push(("LADDNET_STORE__ENDPOINT".into(), format!("https://{addr}")));
            Some(StoreProcess { child })
        } else {
            None
        };
        let read = |p: &str| std::fs::read_to_string(dir.path().join(p)).unwrap();
        let root_pem = read("s/ca/root.crt");
        let admin = Creds {
            chain_pem: read("s/credentials/admin.crt"),
            key_pem: read("s/credentials/admin.key"),
            serial: String::new(),
        };
        let mut env = Vec::new();
        for i in 1..=n {
            let d = format!("n{i}");
            copy_dir(
                &dir.path().join("s"),
                &dir.path().join(&d),
                &["store.redb", "store-clients"],
            );
            let mut e = common.clone();
            e.push(("LADDNET_NODE__NAME".into(), format!("node-{i}")));
            if store.is_some() {
                let creds = dir.path().join("s/store-clients");
                e.push((
                    "LADDNET_STORE__CERT".into(),
                    creds.join(format!("node-{i}.crt")).display().to_string(),
                ));
                e.push((
                    "LADDNET_STORE__KEY".into(),
                    creds.join(format!("node-{i}.key")).display().to_string(),
                ));
            }
            env.push(e);
        }
        let mut c = Cluster {
            dir,
            root_pem,
            admin,
            nodes: (0..n).map(|_| None).collect(),
            env,
            _store: store,
        };
        for i in 0..n {
            c.start_node(i);
        }
        c
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("n{}", i + 1))
    }

    /// Starts (or restarts) node `i` (0-based).
    pub fn start_node(&mut self, i: usize) {
        let env: Vec<(&str, &str)> = self.env[i].iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let config = format!("n{}/laddnet.toml", i + 1);
        let log = format!("node-{}.log", i + 1);
        self.nodes[i] = Some(NodeProcess::start_in(self.dir.path(), &config, &log, &env));
        let _ = self.data_dir(i);
    }

    pub fn node(&self, i: usize) -> &NodeProcess {
        self.nodes[i].as_ref().expect("the node is running")
    }

    /// Every node's mutual-TLS endpoint (`https://…`), rotated to start at `first`.
    pub fn endpoints_from(&self, first: usize) -> Vec<String> {
        let n = self.nodes.len();
        (0..n)
            .filter_map(|k| self.nodes[(first + k) % n].as_ref())
            .map(|p| format!("https://{}", p.mtls))
            .collect()
    }

    /// SIGKILL: the node dies with no goodbye.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].take() {
            p.kill9();
        }
    }

    /// SIGSTOP: the process stays, its sockets stay open, nothing runs.
    pub fn freeze(&self, i: usize) {
        let pid = self.node(i).child.id().to_string();
        assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    }

    /// SIGCONT after a freeze.
    pub fn thaw(&self, i: usize) {
        let pid = self.node(i).child.id().to_string();
        assert!(Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    }

    /// A node's log so far (for failure messages).
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node-{}.log", i + 1))).unwrap_or_default()
    }

    /// A channel to node `i` as the admin operator.
    pub async fn admin_channel(&self, i: usize) -> tonic::transport::Channel {
        self.node(i).channel(&self.root_pem, &self.admin).await
    }

    /// Where a simulated charger finds the cluster, starting at node `first`.
    pub fn sim_endpoints(&self, first: usize) -> laddnet_sim::Endpoints {
        laddnet_sim::Endpoints {
            mtls: self.endpoints_from(first),
            enrollment: format!("https://{}", self.node(first).enrollment),
            server_name: "localhost".into(),
            root_pem: self.root_pem.clone(),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A frozen node cannot die of SIGKILL until it is continued.
        for p in self.nodes.iter().flatten() {
            let _ = Command::new("kill").args(["-CONT", &p.child.id().to_string()]).status();
        }
        // A failed test leaves the logs behind when asked to.
        if std::thread::panicking() && std::env::var_os("CLUSTER_TEST_KEEP").is_some() {
            let kept = std::env::temp_dir().join(format!("laddnet-cluster-{}", std::process::id()));
            if std::fs::rename(self.dir.path(), &kept).is_ok() {
                eprintln!("cluster data dirs and logs kept in {}", kept.display());
            }
        }
    }
}
