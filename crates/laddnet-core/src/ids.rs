use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a string was not accepted as an identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} must be 1 to {max} characters of A-Z a-z 0-9 . _ -, got {got:?}")]
pub struct IdError {
    what: &'static str,
    max: usize,
    got: String,
}

fn check(what: &'static str, max: usize, s: &str, extra: &[char]) -> Result<(), IdError> {
    let ok = !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') || extra.contains(&c));
    if ok {
        Ok(())
    } else {
        let mut got: String = s.chars().take(max + 8).collect();
        if s.chars().count() > max + 8 {
            got.push('…');
        }
        Err(IdError { what, max, got })
    }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:literal, $extra:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                check($what, $max, &s, $extra)?;
                Ok(Self(s))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }
    };
}

id_type!(
    /// A charger's identity: the CN of its certificate (OCPP's
    /// chargeBoxIdentity allows 48 characters).
    ChargerId,
    "charger id",
    48,
    &[]
);
id_type!(
    /// A site's identifier.
    SiteId,
    "site id",
    64,
    &[]
);
id_type!(
    /// An operator's name as it stands in the CN of their certificate
    /// (spaces and @ allowed: "Ada Lovelace", "ada@cpo.example").
    OperatorName,
    "operator name",
    64,
    &[' ', '@']
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charger_ids_are_checked() {
        assert!(ChargerId::new("CP-0001").is_ok());
        assert!(ChargerId::new("").is_err());
        assert!(ChargerId::new("a/b").is_err());
        assert!(ChargerId::new("x".repeat(49)).is_err());
        let err = ChargerId::new("bad id").unwrap_err().to_string();
        assert!(err.contains("charger id"), "{err}");
    }

    #[test]
    fn operator_names_allow_spaces_and_at() {
        assert!(OperatorName::new("Ada Lovelace").is_ok());
        assert!(OperatorName::new("ada@cpo.example").is_ok());
        assert!(OperatorName::new("ada\n").is_err());
    }
}
