//! Typed identifiers. Each has one textual form, checked on parse, so a malformed ID
//! is rejected at the API edge and never reaches a path, a command line or SQL.

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Why a string is not a valid identifier or name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("invalid {kind} {value:?}: {reason}")]
    Invalid {
        kind: &'static str,
        value: String,
        reason: &'static str,
    },
}

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

fn random_suffix(len: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

fn truncate_for_error(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Defines a prefixed random ID such as `sb-k3j9x0aq2mfz7c1w`.
macro_rules! prefixed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $kind:literal, $len:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;
            const SUFFIX_LEN: usize = $len;

            /// A new random ID.
            pub fn generate() -> Self {
                Self(format!("{}{}", $prefix, random_suffix(Self::SUFFIX_LEN)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                let invalid = |reason| IdError::Invalid {
                    kind: $kind,
                    value: truncate_for_error(s),
                    reason,
                };
                let suffix = s
                    .strip_prefix($prefix)
                    .ok_or_else(|| invalid(concat!("must start with \"", $prefix, "\"")))?;
                if suffix.len() != Self::SUFFIX_LEN {
                    return Err(invalid(concat!(
                        "must be \"", $prefix, "\" followed by ", stringify!($len),
                        " lowercase letters or digits"
                    )));
                }
                if !suffix.bytes().all(|b| ALPHABET.contains(&b)) {
                    return Err(invalid("may contain only lowercase letters and digits"));
                }
                Ok(Self(s.to_owned()))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

prefixed_id!(
    /// A sandbox: `sb-` and 16 lowercase letters or digits. Also names its host
    /// resources (run directory, network namespace), so it must stay path-safe.
    SandboxId, "sb-", "sandbox ID", 16
);
prefixed_id!(
    /// A host agent: `host-` and 12 lowercase letters or digits.
    HostId, "host-", "host ID", 12
);
prefixed_id!(
    /// The public, non-secret half of an API key: `key-` and 12 characters.
    ApiKeyId, "key-", "API key ID", 12
);
prefixed_id!(
    /// A user (a person who signs in to the dashboard): `usr-` and 12 characters.
    UserId, "usr-", "user ID", 12
);
prefixed_id!(
    /// A team's webhook: `wh-` and 12 characters.
    WebhookId, "wh-", "webhook ID", 12
);

/// A team. Teams are UUIDs; the platform team (owner of built-in templates) is the
/// all-zeros UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TeamId(pub Uuid);

impl TeamId {
    pub const PLATFORM: TeamId = TeamId(Uuid::nil());

    pub fn generate() -> Self {
        Self(Uuid::new_v4())
    }

    pub fn is_platform(&self) -> bool {
        self.0.is_nil()
    }
}

impl FromStr for TeamId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Uuid::parse_str(s)
            .map(TeamId)
            .map_err(|_| IdError::Invalid {
                kind: "team ID",
                value: truncate_for_error(s),
                reason: "must be a UUID",
            })
    }
}

impl fmt::Display for TeamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A template name such as `minimal` or `my-python_3`: 1 to 63 characters of
/// lowercase letters, digits, `-` and `_`, starting with a letter or digit. No `/`,
/// no `.`, so a name can never walk out of the templates directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TemplateName(String);

impl TemplateName {
    pub const MAX_LEN: usize = 63;

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TemplateName {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let invalid = |reason| IdError::Invalid {
            kind: "template name",
            value: truncate_for_error(s),
            reason,
        };
        if s.is_empty() {
            return Err(invalid("must not be empty"));
        }
        if s.len() > Self::MAX_LEN {
            return Err(invalid("must be at most 63 characters"));
        }
        if s.contains('/') || s.contains("..") || s.contains('.') {
            return Err(invalid("must not contain '/' or '.'"));
        }
        let first = s.as_bytes()[0];
        if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
            return Err(invalid("must start with a lowercase letter or digit"));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(invalid(
                "may contain only lowercase letters, digits, '-' and '_'",
            ));
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for TemplateName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for TemplateName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TemplateName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn generated_ids_parse_back() {
        for _ in 0..100 {
            let id = SandboxId::generate();
            assert_eq!(id.as_str().parse::<SandboxId>().unwrap(), id);
            let h = HostId::generate();
            assert_eq!(h.as_str().parse::<HostId>().unwrap(), h);
        }
    }

    #[test]
    fn malformed_sandbox_ids_are_rejected() {
        for bad in [
            "",
            "sb-",
            "sb-short",
            "SB-abcdefghijklmnop",
            "sb-ABCDEFGHIJKLMNOP",
            "sb-abcdefghijklmno/",
            "sb-../../etc/passwd1",
            "tpl-abcdefghijklmnop",
            "sb-abcdefghijklmnopq",
        ] {
            assert!(bad.parse::<SandboxId>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn template_names() {
        for good in ["minimal", "debian", "a", "py-3_11", "0abc"] {
            assert!(good.parse::<TemplateName>().is_ok(), "{good:?} rejected");
        }
        for bad in [
            "",
            "../etc",
            "a/b",
            "..",
            "a.b",
            "-lead",
            "_lead",
            "Upper",
            "sp ace",
            &"x".repeat(64),
        ] {
            let err = bad.parse::<TemplateName>().unwrap_err();
            assert!(err.to_string().contains("template name"), "{err}");
        }
    }

    #[test]
    fn platform_team_is_nil_uuid() {
        assert!(TeamId::PLATFORM.is_platform());
        assert!(!TeamId::generate().is_platform());
        assert!("not-a-uuid".parse::<TeamId>().is_err());
    }

    proptest! {
        #[test]
        fn any_valid_template_name_is_path_safe(s in "\\PC{0,80}") {
            if let Ok(name) = s.parse::<TemplateName>() {
                let p = std::path::Path::new("/base").join(name.as_str());
                prop_assert_eq!(p.parent(), Some(std::path::Path::new("/base")));
            }
        }

        #[test]
        fn any_valid_sandbox_id_is_path_safe(s in "sb-[a-z0-9./]{14,18}") {
            if let Ok(id) = s.parse::<SandboxId>() {
                prop_assert!(!id.as_str().contains('/') && !id.as_str().contains('.'));
            }
        }
    }
}
