use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The one role an operator certificate carries.
///
/// Roles are not a ladder: `billing` may read money but not run chargers,
/// `security-admin` runs the PKI but not chargers. `admin` may do all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Viewer,
    Operator,
    Billing,
    SecurityAdmin,
    /// Customer support: manages drivers and may read their personal data.
    Support,
    Admin,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::Viewer,
        Role::Operator,
        Role::Billing,
        Role::SecurityAdmin,
        Role::Support,
        Role::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Billing => "billing",
            Role::SecurityAdmin => "security-admin",
            Role::Support => "support",
            Role::Admin => "admin",
        }
    }

    /// May run the PKI: tokens, issuance, revocation, the audit log.
    pub fn can_manage_pki(self) -> bool {
        matches!(self, Role::SecurityAdmin | Role::Admin)
    }

    /// May change tariffs, approve and refund CDRs.
    pub fn can_bill(self) -> bool {
        matches!(self, Role::Billing | Role::Admin)
    }

    /// May read money: tariffs, CDRs, the ledger.
    pub fn can_read_billing(self) -> bool {
        matches!(self, Role::Billing | Role::Admin | Role::Operator)
    }

    /// May create and change driver accounts and tokens (not read their
    /// personal data).
    pub fn can_manage_drivers(self) -> bool {
        matches!(self, Role::Operator | Role::Support | Role::Admin)
    }

    /// May read, export and erase drivers' personal data (audited).
    pub fn can_read_personal_data(self) -> bool {
        matches!(self, Role::Support | Role::Admin)
    }

    /// May send commands to chargers and change the network.
    pub fn can_operate(self) -> bool {
        matches!(self, Role::Operator | Role::Admin)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| {
            format!("unknown role {s:?}: expected one of viewer, operator, billing, security-admin, support, admin")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_and_unknown_is_named() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        assert!("root".parse::<Role>().unwrap_err().contains("root"));
        assert!(Role::SecurityAdmin.can_manage_pki());
        assert!(!Role::Operator.can_manage_pki());
        assert!(!Role::SecurityAdmin.can_operate());
    }
}
