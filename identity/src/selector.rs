//! Selectors: `type:value` facts about a node or a workload.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest selector accepted (type and value together), in bytes.
pub const MAX_SELECTOR_LEN: usize = 1024;

/// Why a string is not a selector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error(
        "selector {0:?} has no ':' between type and value (expected TYPE:VALUE, e.g. unix:uid:1000)"
    )]
    MissingColon(String),
    #[error("selector type is empty (expected TYPE:VALUE)")]
    EmptyType,
    #[error("selector type {0:?} may only hold a-z, 0-9 and '_'")]
    BadType(String),
    #[error("selector value is empty (expected TYPE:VALUE)")]
    EmptyValue,
    #[error("selector value contains a control character")]
    ControlChar,
    #[error("selector is longer than {MAX_SELECTOR_LEN} bytes")]
    TooLong,
}

/// One selector, e.g. type `unix`, value `uid:1000`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Selector {
    kind: String,
    value: String,
}

impl Selector {
    /// Builds a selector from its two parts, checking both.
    pub fn new(kind: &str, value: &str) -> Result<Self, SelectorError> {
        if kind.is_empty() {
            return Err(SelectorError::EmptyType);
        }
        if !kind
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
        {
            return Err(SelectorError::BadType(kind.to_owned()));
        }
        if value.is_empty() {
            return Err(SelectorError::EmptyValue);
        }
        if value.chars().any(char::is_control) {
            return Err(SelectorError::ControlChar);
        }
        if kind.len() + 1 + value.len() > MAX_SELECTOR_LEN {
            return Err(SelectorError::TooLong);
        }
        Ok(Self {
            kind: kind.to_owned(),
            value: value.to_owned(),
        })
    }

    /// Parses `type:value`, splitting at the first colon.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let (kind, value) = s
            .split_once(':')
            .ok_or_else(|| SelectorError::MissingColon(s.to_owned()))?;
        Self::new(kind, value)
    }

    /// The selector type, e.g. `unix`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The value, e.g. `uid:1000`.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Selector({self})")
    }
}

impl TryFrom<String> for Selector {
    type Error = SelectorError;
    fn try_from(s: String) -> Result<Self, SelectorError> {
        Self::parse(&s)
    }
}

impl From<Selector> for String {
    fn from(s: Selector) -> String {
        s.to_string()
    }
}

impl std::str::FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, SelectorError> {
        Self::parse(s)
    }
}

/// A set of selectors, ordered so that equal sets compare and hash equal.
pub type SelectorSet = BTreeSet<Selector>;

/// Whether every selector of `required` is among `have`.
pub fn all_present(required: &SelectorSet, have: &SelectorSet) -> bool {
    required.is_subset(have)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_first_colon() {
        let s = Selector::parse("unix:uid:1000").unwrap();
        assert_eq!(s.kind(), "unix");
        assert_eq!(s.value(), "uid:1000");
        assert_eq!(s.to_string(), "unix:uid:1000");
    }

    #[test]
    fn rejects_bad_selectors() {
        assert!(matches!(
            Selector::parse("unix"),
            Err(SelectorError::MissingColon(_))
        ));
        assert_eq!(Selector::parse(":x"), Err(SelectorError::EmptyType));
        assert_eq!(Selector::parse("unix:"), Err(SelectorError::EmptyValue));
        assert!(matches!(
            Selector::parse("Unix:uid:1"),
            Err(SelectorError::BadType(_))
        ));
        assert_eq!(
            Selector::parse("unix:uid:\n1"),
            Err(SelectorError::ControlChar)
        );
        let long = format!("k8s:{}", "v".repeat(MAX_SELECTOR_LEN));
        assert_eq!(Selector::parse(&long), Err(SelectorError::TooLong));
    }

    #[test]
    fn subset_matching() {
        let set = |v: &[&str]| {
            v.iter()
                .map(|s| Selector::parse(s).unwrap())
                .collect::<SelectorSet>()
        };
        let have = set(&["unix:uid:1000", "unix:gid:1000", "unix:user:alice"]);
        assert!(all_present(&set(&["unix:uid:1000"]), &have));
        assert!(all_present(
            &set(&["unix:uid:1000", "unix:gid:1000"]),
            &have
        ));
        assert!(!all_present(&set(&["unix:uid:1000", "unix:gid:0"]), &have));
    }
}
