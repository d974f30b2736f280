//! The `run_id` of an instance, validated once: a [`RunId`] exists only if its text is safe in
//! paths, container names and job names, so nothing that holds one checks it again.
//!
//! Below everything else (it imports nothing of the crate): the API parses request fields
//! into it, the service keys its table by it, the journal names its files after it, and an
//! environment names its sandbox after it.

use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;

/// The longest a `run_id` may be.
pub const MAX_LEN: usize = 128;

/// `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`; derefs to its text.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct RunId(String);

/// Why a text is not a `run_id`: the field it came from and the text.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidRunId {
    pub field: String,
    pub text: String,
}

impl fmt::Display for InvalidRunId {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "{} '{}' is not allowed: use 1 to {MAX_LEN} of A-Z a-z 0-9 _ . -, starting with a letter or digit",
            self.field,
            self.text.escape_debug()
        )
    }
}

impl RunId {
    /// `text` as a `run_id` read from `field` (a body key, or a header such as `X-Run-Id`).
    pub fn parse(text: &str, field: &str) -> Result<RunId, InvalidRunId> {
        if is_valid(text) {
            Ok(RunId(text.to_string()))
        } else {
            Err(InvalidRunId {
                field: field.to_string(),
                text: text.to_string(),
            })
        }
    }

    /// The identity of a pooled sandbox (`_pool-<hex>`): a name in the paths and sandbox
    /// names of instances that no request can give (a `run_id` starts with a letter or digit),
    /// so a pooled sandbox never collides with a run's. It keeps it when a run takes it.
    pub fn pool_member(seq: u64) -> RunId {
        RunId(format!("{POOL_PREFIX}{seq:x}"))
    }

    /// Whether this names a pooled sandbox (see [`RunId::pool_member`]).
    pub fn is_pool_member(&self) -> bool {
        is_pool_member(&self.0)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// Whether `text` fits the rules of a `run_id`.
pub fn is_valid(text: &str) -> bool {
    let bytes = text.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_LEN
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The prefix of [`RunId::pool_member`] names.
const POOL_PREFIX: &str = "_pool-";

fn is_pool_member(text: &str) -> bool {
    text.strip_prefix(POOL_PREFIX).is_some_and(|hex| {
        (1..=16).contains(&hex.len()) && hex.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

impl std::ops::Deref for RunId {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for RunId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for RunId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<std::path::Path> for RunId {
    fn as_ref(&self) -> &std::path::Path {
        self.0.as_ref()
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for RunId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for RunId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// Read back (from a journal record) only if valid (or a pooled sandbox's name): a record
/// naming anything else is not one arservice wrote.
impl<'de> Deserialize<'de> for RunId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<RunId, D::Error> {
        let text = String::deserialize(deserializer)?;
        if is_pool_member(&text) {
            return Ok(RunId(text));
        }
        RunId::parse(&text, "run_id").map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_members_are_no_request_s_run_id() {
        let member = RunId::pool_member(0x1f);
        assert_eq!(member.as_str(), "_pool-1f");
        assert!(member.is_pool_member());
        assert!(RunId::parse("_pool-1f", "run_id").is_err());
        let back: RunId = serde_json::from_str("\"_pool-1f\"").unwrap();
        assert_eq!(back, member);
        for bad in ["\"_pool-\"", "\"_pool-xyz\"", "\"_pool-1/..\""] {
            assert!(serde_json::from_str::<RunId>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_rules() {
        for good in ["eval-run-001", "a", "A_1.b-2", &"a".repeat(128)] {
            assert_eq!(RunId::parse(good, "run_id").unwrap().as_str(), good);
        }
        for bad in [
            "",
            "-a",
            ".a",
            "_a",
            "a/b",
            "../x",
            "a b",
            "ä",
            &"a".repeat(129),
            "a\n",
        ] {
            assert!(RunId::parse(bad, "run_id").is_err(), "{bad:?} passed");
        }
    }

    #[test]
    fn the_message_names_the_field_and_escapes_the_text() {
        let err = RunId::parse("a\nb", "X-Run-Id").unwrap_err();
        assert_eq!(
            err.to_string(),
            "X-Run-Id 'a\\nb' is not allowed: use 1 to 128 of A-Z a-z 0-9 _ . -, starting with a letter or digit"
        );
    }

    #[test]
    fn deserializing_validates() {
        let id: RunId = serde_json::from_str("\"r-1\"").unwrap();
        assert_eq!(id, "r-1");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"r-1\"");
        assert!(serde_json::from_str::<RunId>("\"../x\"").is_err());
    }
}
