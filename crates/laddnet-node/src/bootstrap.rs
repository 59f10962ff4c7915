//! Making a data directory from nothing: the CA, the key-encryption key,
//! the store, a first admin's credentials, the node's config and a
//! `laddctl.toml` that reaches the node with no further flags.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
pub use laddnet_client::CtlConfig;
use laddnet_core::{OperatorName, Role};
use laddnet_pki::{Ca, CaFiles, Subject};
use laddnet_vault::KeySource;

use crate::config::NodeConfig;
use crate::node::{key_source, load_policy, open_store};

/// What [`init_data_dir`] made.
#[derive(Debug, Clone)]
pub struct InitOutput {
    pub config_path: PathBuf,
    pub ctl_config_path: PathBuf,
    pub root_serial: String,
    pub admin_serial: String,
}

pub(crate) fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents)?;
    f.sync_all()?;
    Ok(())
}

/// Writes a `laddctl.toml` for a node on `config` with the given credentials.
pub fn write_ctl_config(path: &Path, config: &NodeConfig, cert: &Path, key: &Path) -> anyhow::Result<()> {
    let host = config.listen.mtls.ip();
    let host = if host.is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        host.to_string()
    };
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    let abs = |p: &Path| fs::canonicalize(p).with_context(|| format!("{}", p.display()));
    let ctl = CtlConfig {
        endpoint: format!("https://{host}:{}", config.listen.mtls.port()),
        server_name: config
            .tls
            .server_names
            .first()
            .cloned()
            .unwrap_or_else(|| "localhost".into()),
        ca_cert: abs(&config.ca_dir().join("root.crt"))?,
        cert: abs(cert)?,
        key: abs(key)?,
    };
    fs::write(path, toml::to_string_pretty(&ctl)?).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Creates the CA and first admin in `config.data_dir`, and writes
/// `laddnet.toml` and `laddctl.toml` there. The key-encryption key is a new
/// key file unless `LADDNET_CA_PASSPHRASE` is set. Refuses to touch an
/// existing CA.
pub fn init_data_dir(config: &NodeConfig, admin: &OperatorName) -> anyhow::Result<InitOutput> {
    config.validate()?;
    let policy = load_policy(config)?;
    fs::create_dir_all(&config.data_dir).with_context(|| format!("creating {}", config.data_dir.display()))?;
    let files = CaFiles::new(config.ca_dir());
    if files.exists() {
        anyhow::bail!(
            "a CA already exists in {}; refusing to overwrite it",
            files.dir.display()
        );
    }
    let source = key_source(config);
    if let KeySource::KeyFile(path) = &source
        && !path.exists()
    {
        laddnet_vault::create_key_file(path)?;
    }
    // The master keys for personal data: created now, so a data dir is
    // complete (the nodes of a cluster get copies of it).
    laddnet_vault::LocalMasterKeys::load(&config.master_key_dir(), true)?;
    let store = open_store(config)?;
    let clock = laddnet_pki::system_clock();
    let report = laddnet_pki::init(&files, &policy, &source, &store, &clock)?;
    let ca = Arc::new(Ca::open(&files, policy, &source, store, clock)?);
    let (issued, key) = ca.issue_with_new_key(
        &Subject::Operator {
            name: admin.clone(),
            role: Role::Admin,
        },
        "system",
    )?;
    let cred_dir = config.data_dir.join("credentials");
    fs::create_dir_all(&cred_dir)?;
    let cert_path = cred_dir.join("admin.crt");
    let key_path = cred_dir.join("admin.key");
    fs::write(&cert_path, &issued.chain_pem)?;
    write_private(&key_path, key.as_bytes())?;

    let config_path = config.data_dir.join("laddnet.toml");
    let mut on_disk = config.clone();
    // Paths in the file are relative to it, so the data dir can move.
    on_disk.data_dir = PathBuf::from(".");
    on_disk.ca = Default::default();
    fs::write(
        &config_path,
        format!(
            "# laddnet node configuration; see docs/architecture.md\n{}",
            on_disk.to_toml()
        ),
    )?;
    let ctl_config_path = config.data_dir.join("laddctl.toml");
    write_ctl_config(&ctl_config_path, config, &cert_path, &key_path)?;
    Ok(InitOutput {
        config_path,
        ctl_config_path,
        root_serial: report.root_serial,
        admin_serial: issued.record.serial,
    })
}
