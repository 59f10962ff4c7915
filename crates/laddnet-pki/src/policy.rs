use serde::{Deserialize, Serialize};

use crate::PkiError;

/// The policy compiled in: `pki/policy.toml`.
pub const DEFAULT_POLICY_TOML: &str = include_str!("../../../pki/policy.toml");

/// Certificate policy: what the CA issues, for how long, and when renewal
/// opens. Loaded from TOML; unknown fields are refused.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub ca: CaPolicy,
    pub csr: CsrPolicy,
    pub profiles: Profiles,
    pub enrollment: EnrollmentPolicy,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CaPolicy {
    pub key_algorithm: KeyAlgorithm,
    pub organisation: String,
    pub root_validity_days: u32,
    pub intermediate_validity_days: u32,
    pub crl_validity_hours: u32,
    pub clock_skew_seconds: u32,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum KeyAlgorithm {
    EcdsaP256,
    EcdsaP384,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CsrPolicy {
    pub min_rsa_bits: u32,
    pub allow_ed25519: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProfilePolicy {
    pub validity_days: u32,
    pub renewal_window_days: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Profiles {
    pub charger: ProfilePolicy,
    pub operator: ProfilePolicy,
    pub node: ProfilePolicy,
    /// Driver apps' credentials (absent in older policy files: 365/30).
    #[serde(default = "default_driver_profile")]
    pub driver: ProfilePolicy,
    /// The firmware-signing key's certificate (absent in older policy
    /// files: 730/60).
    #[serde(default = "default_firmware_profile")]
    pub firmware_signing: ProfilePolicy,
}

fn default_firmware_profile() -> ProfilePolicy {
    ProfilePolicy {
        validity_days: 730,
        renewal_window_days: 60,
    }
}

fn default_driver_profile() -> ProfilePolicy {
    ProfilePolicy {
        validity_days: 365,
        renewal_window_days: 30,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentPolicy {
    pub token_ttl_seconds: u32,
    pub max_token_ttl_seconds: u32,
    pub per_minute: u32,
    pub burst: u32,
}

/// The kinds of certificate the CA issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    Charger,
    Operator,
    Node,
    Driver,
    /// Signs firmware images (code-signing usage only: never a TLS client
    /// or server).
    FirmwareSigning,
}

impl Profile {
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Charger => "charger",
            Profile::Operator => "operator",
            Profile::Node => "node",
            Profile::Driver => "driver",
            Profile::FirmwareSigning => "firmware-signing",
        }
    }

    pub fn parse(s: &str) -> Result<Self, PkiError> {
        match s {
            "charger" => Ok(Profile::Charger),
            "operator" => Ok(Profile::Operator),
            "node" => Ok(Profile::Node),
            "driver" => Ok(Profile::Driver),
            "firmware-signing" => Ok(Profile::FirmwareSigning),
            other => Err(PkiError::Invalid(format!(
                "unknown profile {other:?}: expected charger, operator, node, driver or firmware-signing"
            ))),
        }
    }
}

impl Policy {
    /// Parses and validates a policy.
    pub fn from_toml(text: &str) -> Result<Self, PkiError> {
        let p: Policy = toml::from_str(text).map_err(|e| PkiError::Policy(e.to_string()))?;
        p.validate()?;
        Ok(p)
    }

    pub fn load(path: &std::path::Path) -> Result<Self, PkiError> {
        let text = std::fs::read_to_string(path).map_err(|e| PkiError::Policy(format!("{}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| PkiError::Policy(format!("{}: {e}", path.display())))
    }

    pub fn profile(&self, p: Profile) -> ProfilePolicy {
        match p {
            Profile::Charger => self.profiles.charger,
            Profile::Operator => self.profiles.operator,
            Profile::Node => self.profiles.node,
            Profile::Driver => self.profiles.driver,
            Profile::FirmwareSigning => self.profiles.firmware_signing,
        }
    }

    /// Checks that the numbers make sense together.
    pub fn validate(&self) -> Result<(), PkiError> {
        let bad = |m: String| Err(PkiError::Policy(m));
        if self.ca.organisation.trim().is_empty() {
            return bad("ca.organisation must not be empty".into());
        }
        if self.ca.intermediate_validity_days == 0 || self.ca.intermediate_validity_days > self.ca.root_validity_days {
            return bad("ca.intermediate_validity_days must be 1 to ca.root_validity_days".into());
        }
        if self.ca.crl_validity_hours == 0 {
            return bad("ca.crl_validity_hours must be at least 1".into());
        }
        if self.csr.min_rsa_bits < 2048 {
            return bad("csr.min_rsa_bits must be at least 2048".into());
        }
        for (name, p) in [
            ("charger", self.profiles.charger),
            ("operator", self.profiles.operator),
            ("node", self.profiles.node),
            ("driver", self.profiles.driver),
            ("firmware_signing", self.profiles.firmware_signing),
        ] {
            if p.validity_days == 0 {
                return bad(format!("profiles.{name}.validity_days must be at least 1"));
            }
            if p.renewal_window_days >= p.validity_days {
                return bad(format!(
                    "profiles.{name}.renewal_window_days must be less than validity_days"
                ));
            }
            if p.validity_days > self.ca.intermediate_validity_days {
                return bad(format!(
                    "profiles.{name}.validity_days must not outlive the intermediate"
                ));
            }
        }
        let e = &self.enrollment;
        if e.token_ttl_seconds == 0 || e.token_ttl_seconds > e.max_token_ttl_seconds {
            return bad("enrollment.token_ttl_seconds must be 1 to max_token_ttl_seconds".into());
        }
        if e.per_minute == 0 || e.burst == 0 {
            return bad("enrollment.per_minute and enrollment.burst must be at least 1".into());
        }
        Ok(())
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy::from_toml(DEFAULT_POLICY_TOML).expect("the compiled-in policy is valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_parses_and_bad_ones_name_the_field() {
        let p = Policy::default();
        assert_eq!(p.profiles.charger.validity_days, 365);
        let bad = DEFAULT_POLICY_TOML.replace(
            "renewal_window_days = 30\n\n[profiles.operator]",
            "renewal_window_days = 400\n\n[profiles.operator]",
        );
        let e = Policy::from_toml(&bad).unwrap_err().to_string();
        assert!(e.contains("profiles.charger.renewal_window_days"), "{e}");
        let e = Policy::from_toml(&format!("{DEFAULT_POLICY_TOML}\nsurprise = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("surprise"), "{e}");
    }
}
