//! Selectors: `type:value` facts about a node or a workload.

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest selector accepted (type and value together), in bytes.
pub const MAX_SELECTOR_LEN: usize = 1024;

/// Why a string is not a selector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
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
///
/// Held as one `type:value` string (one allocation; agents and servers hold
/// one per entry selector). Ordered by type, then value.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Selector {
    /// `type:value`; the type has no colon, so the first one splits them.
    text: Box<str>,
    /// Length of the type.
    kind_len: usize,
}

impl Ord for Selector {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.kind(), self.value()).cmp(&(other.kind(), other.value()))
    }
}

impl PartialOrd for Selector {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
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
            text: format!("{kind}:{value}").into_boxed_str(),
            kind_len: kind.len(),
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
        &self.text[..self.kind_len]
    }

    /// The value, e.g. `uid:1000`.
    pub fn value(&self) -> &str {
        &self.text[self.kind_len + 1..]
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
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
        s.text.into()
    }
}

impl std::str::FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, SelectorError> {
        Self::parse(s)
    }
}

/// A set of selectors, ordered so that equal sets compare and hash equal.
///
/// A sorted vector without duplicates: entries hold a few selectors each,
/// and a `BTreeSet` would allocate a node for eleven per entry.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(from = "Vec<Selector>", into = "Vec<Selector>")]
pub struct SelectorSet(Vec<Selector>);

impl SelectorSet {
    /// An empty set.
    pub const fn new() -> Self {
        Self(Vec::new())
    }

    /// Adds `selector`; false if it was already there.
    pub fn insert(&mut self, selector: Selector) -> bool {
        match self.0.binary_search(&selector) {
            Ok(_) => false,
            Err(at) => {
                self.0.insert(at, selector);
                true
            }
        }
    }

    /// Whether `selector` is in the set.
    pub fn contains(&self, selector: &Selector) -> bool {
        self.0.binary_search(selector).is_ok()
    }

    /// Whether every selector of `self` is in `other`.
    pub fn is_subset(&self, other: &SelectorSet) -> bool {
        // Both sorted: one merge walk.
        let mut theirs = other.0.iter();
        self.0
            .iter()
            .all(|s| theirs.by_ref().find(|t| *t >= s).is_some_and(|t| t == s))
    }

    /// The selectors, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Selector> {
        self.0.iter()
    }

    /// How many selectors there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SelectorSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(&self.0).finish()
    }
}

impl From<Vec<Selector>> for SelectorSet {
    fn from(mut v: Vec<Selector>) -> Self {
        v.sort_unstable();
        v.dedup();
        v.shrink_to_fit();
        Self(v)
    }
}

impl<const N: usize> From<[Selector; N]> for SelectorSet {
    fn from(a: [Selector; N]) -> Self {
        Vec::from(a).into()
    }
}

impl From<SelectorSet> for Vec<Selector> {
    fn from(s: SelectorSet) -> Self {
        s.0
    }
}

impl FromIterator<Selector> for SelectorSet {
    fn from_iter<I: IntoIterator<Item = Selector>>(iter: I) -> Self {
        iter.into_iter().collect::<Vec<_>>().into()
    }
}

impl Extend<Selector> for SelectorSet {
    fn extend<I: IntoIterator<Item = Selector>>(&mut self, iter: I) {
        let mut all = std::mem::take(&mut self.0);
        all.extend(iter);
        *self = all.into();
    }
}

impl IntoIterator for SelectorSet {
    type Item = Selector;
    type IntoIter = std::vec::IntoIter<Selector>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a SelectorSet {
    type Item = &'a Selector;
    type IntoIter = std::slice::Iter<'a, Selector>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

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
        assert!(!all_present(&set(&["unix:uid:1001"]), &have));
        assert!(!all_present(&set(&["unix:zzz:1"]), &have));
        assert!(all_present(&set(&[]), &have));
        assert!(!all_present(&have, &set(&["unix:uid:1000"])));
    }

    #[test]
    fn sets_are_sorted_without_duplicates_however_built() {
        let a = Selector::parse("unix:uid:1").unwrap();
        let b = Selector::parse("k8s:ns:x").unwrap();
        let c = Selector::parse("k8s_psat:cluster:c").unwrap();
        let collected: SelectorSet = [a.clone(), b.clone(), a.clone(), c.clone()]
            .into_iter()
            .collect();
        let mut inserted = SelectorSet::new();
        assert!(inserted.insert(c.clone()));
        assert!(inserted.insert(a.clone()));
        assert!(!inserted.insert(a.clone()));
        inserted.extend([b.clone(), c.clone()]);
        assert_eq!(collected, inserted);
        assert_eq!(collected.len(), 3);
        assert_eq!(collected.iter().collect::<Vec<_>>(), [&b, &c, &a]);
        assert!(collected.contains(&b) && !collected.contains(&Selector::parse("x:y").unwrap()));
        // The wire form is a list; one with duplicates or out of order
        // reads as the same set.
        let json = serde_json::to_string(&collected).unwrap();
        assert_eq!(json, r#"["k8s:ns:x","k8s_psat:cluster:c","unix:uid:1"]"#);
        let shuffled: SelectorSet =
            serde_json::from_str(r#"["unix:uid:1","k8s_psat:cluster:c","k8s:ns:x","unix:uid:1"]"#)
                .unwrap();
        assert_eq!(shuffled, collected);
    }

    #[test]
    fn selectors_order_by_type_then_value() {
        // As a string "a1:x" < "a:x" (':' sorts after digits); by type,
        // "a" comes first.
        let short = Selector::parse("a:x").unwrap();
        let long = Selector::parse("a1:x").unwrap();
        assert!(short < long);
        assert_eq!(short.kind(), "a");
        assert_eq!(long.value(), "x");
        assert_eq!(String::from(long), "a1:x");
    }
}
