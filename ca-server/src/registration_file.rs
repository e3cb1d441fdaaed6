//! Registration files: registration entries kept as code.
//!
//! A registration file is TOML. Each `[[entry]]` table is one workload
//! entry and each `[[node]]` table one node alias entry (parented to the
//! server, selecting agents by node selectors); every table has a `name`
//! chosen by its author, unique in the file, by which `entry apply`
//! matches it to the stored entry it manages:
//!
//! ```toml
//! [[node]]
//! name = "prod-nodes"
//! spiffe_id = "spiffe://example.org/node/prod"
//! selectors = ["join_token:id:..."]
//!
//! [[entry]]
//! name = "web"
//! spiffe_id = "spiffe://example.org/web"
//! parent_id = "spiffe://example.org/node/prod"   # an agent or a node alias
//! selectors = ["unix:uid:1000"]
//! x509_svid_ttl = "1h"                            # optional from here on
//! jwt_svid_ttl = "5m"
//! dns_names = ["web.example.org"]
//! federates_with = ["partner.org"]
//! admin = false
//! admin_role = "read"                             # with admin = true: read, revoke or admin
//! hint = "blue"
//! expires_at = "2027-01-01T00:00:00Z"
//! ```
//!
//! [`parse`] checks everything it can without the server (syntax, unknown
//! keys, IDs, selectors, durations, duplicate names and registrations) and
//! reports each problem with file, line and entry name; [`render`] writes
//! entries back in the same format (`entry export`). [`fields`] is the
//! field-by-field view that plans are made of.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Deserializer};
use sigil_identity::clock::unix_seconds;
use sigil_identity::entry::is_valid_name;
use sigil_identity::{AdminRole, DnsName, RegistrationEntry, Selector, SpiffeId, TrustDomain};
use toml::Spanned;

use crate::datastore::entry_key;

/// One problem in a registration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line.
    pub line: usize,
    /// The entry's name, when known.
    pub name: Option<String>,
    /// What is wrong.
    pub message: String,
}

/// Every problem found in one file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct FileErrors {
    /// The file, as named to the user.
    pub file: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for FileErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} has {} problem(s); nothing was sent to the server",
            self.file,
            self.problems.len()
        )?;
        for p in &self.problems {
            write!(f, "\n  {}:{}: ", self.file, p.line)?;
            if let Some(name) = &p.name {
                write!(f, "entry {name:?}: ")?;
            }
            f.write_str(&p.message)?;
        }
        Ok(())
    }
}

/// An entry declared in a file, with where it was declared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    /// Line of its `[[entry]]` or `[[node]]` header.
    pub line: usize,
    /// The entry, with `name` set, a fresh id and no owner.
    pub entry: RegistrationEntry,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    #[serde(default)]
    entry: Vec<Spanned<FileEntry>>,
    #[serde(default)]
    node: Vec<Spanned<FileEntry>>,
}

/// The same document without any check but TOML syntax: where each table
/// is and what it is called, to name the entry an error is in.
#[derive(Deserialize)]
struct LooseDoc {
    #[serde(default)]
    entry: Vec<Spanned<toml::Table>>,
    #[serde(default)]
    node: Vec<Spanned<toml::Table>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    name: String,
    spiffe_id: SpiffeId,
    #[serde(default)]
    parent_id: Option<SpiffeId>,
    selectors: Vec<Selector>,
    #[serde(default, deserialize_with = "opt_duration")]
    x509_svid_ttl: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    jwt_svid_ttl: Option<Duration>,
    #[serde(default)]
    dns_names: Vec<DnsName>,
    #[serde(default)]
    federates_with: Vec<TrustDomain>,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    admin_role: Option<AdminRole>,
    #[serde(default)]
    hint: String,
    #[serde(default, deserialize_with = "opt_time")]
    expires_at: Option<SystemTime>,
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    sigil_identity::duration::serde_human::deserialize(d).map(Some)
}

fn opt_time<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
    let s = String::deserialize(d)?;
    sigil_identity::clock::parse_rfc3339(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// Maps byte offsets of one text to 1-based lines (by binary search: a
/// scan per entry made a 10,000-entry file quadratic).
struct Lines(Vec<usize>);

impl Lines {
    fn new(text: &str) -> Self {
        Self(text.match_indices('\n').map(|(i, _)| i).collect())
    }

    /// The line of byte `offset`.
    fn of(&self, offset: usize) -> usize {
        self.0.partition_point(|&nl| nl < offset) + 1
    }
}

/// Parses and checks registration file `text` (named `file` in errors).
/// With `td`, also checks every entry against that trust domain's rules.
pub fn parse(
    file: &str,
    text: &str,
    td: Option<&TrustDomain>,
) -> Result<Vec<Declared>, FileErrors> {
    let fail = |problems| FileErrors {
        file: file.to_owned(),
        problems,
    };
    let lines = Lines::new(text);
    let doc: Doc = match toml::from_str(text) {
        Ok(d) => d,
        Err(e) => {
            let offset = e.span().map_or(0, |s| s.start);
            let problem = Problem {
                line: lines.of(offset),
                name: name_at(text, offset),
                message: e.message().trim().to_owned(),
            };
            return Err(fail(vec![problem]));
        }
    };
    let mut problems = Vec::new();
    let mut out = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut keys: HashMap<Vec<u8>, (usize, String)> = HashMap::new();
    let tables = doc
        .entry
        .into_iter()
        .map(|t| (false, t))
        .chain(doc.node.into_iter().map(|t| (true, t)));
    for (node, table) in tables {
        let line = lines.of(table.span().start);
        let f = table.into_inner();
        let name = f.name.clone();
        let mut problem = |message: String| {
            problems.push(Problem {
                line,
                name: Some(name.clone()),
                message,
            })
        };
        if !is_valid_name(&f.name) {
            problem(
                "name must be 1 to 128 characters of a-z, A-Z, 0-9, '-', '_', '.' or '/'".into(),
            );
        }
        if let Some(first) = names.insert(f.name.clone(), line) {
            problem(format!("name is also used by the entry on line {first}"));
        }
        let parent = match (node, &f.parent_id) {
            (true, None) => SpiffeId::server(&f.spiffe_id.trust_domain()),
            (false, Some(p)) => p.clone(),
            (true, Some(_)) => {
                problem("a [[node]] entry is parented to the server; remove parent_id".into());
                continue;
            }
            (false, None) => {
                problem("parent_id is required (an agent or a node alias ID)".into());
                continue;
            }
        };
        let mut e = RegistrationEntry::new(f.spiffe_id, parent, f.selectors.into_iter().collect());
        e.x509_svid_ttl = f.x509_svid_ttl;
        e.jwt_svid_ttl = f.jwt_svid_ttl;
        e.dns_names = f.dns_names;
        e.federates_with = f.federates_with.into_iter().collect();
        e.admin = f.admin;
        e.admin_role = f.admin_role;
        e.hint = f.hint;
        e.expires_at = f.expires_at;
        e.name = f.name;
        if let Some(td) = td {
            // The name was checked above and the owner comes with the
            // request: check the rest as an entry made by hand.
            let unowned = RegistrationEntry {
                name: String::new(),
                ..e.clone()
            };
            if let Err(err) = unowned.check(td) {
                problem(err.to_string());
            }
        } else if e.selectors.is_empty() {
            problem("an entry needs at least one selector".into());
        }
        if let Some((first, other)) = keys.insert(entry_key(&e), (line, e.name.clone())) {
            problem(format!(
                "same SPIFFE ID, parent and selectors as entry {other:?} on line {first}"
            ));
        }
        out.push(Declared { line, entry: e });
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        problems.sort_by_key(|p| p.line);
        Err(fail(problems))
    }
}

/// The `name` of the `[[entry]]`/`[[node]]` table holding byte `offset`.
fn name_at(text: &str, offset: usize) -> Option<String> {
    let doc: LooseDoc = toml::from_str(text).ok()?;
    doc.entry
        .iter()
        .chain(&doc.node)
        .filter(|t| t.span().start <= offset)
        .max_by_key(|t| t.span().start)
        .and_then(|t| t.get_ref().get("name")?.as_str().map(str::to_owned))
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| unix_seconds(t).to_string())
}

fn ttl(d: Option<Duration>) -> String {
    d.map_or_else(|| "default".to_owned(), sigil_identity::duration::format)
}

fn list<T: fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let v: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    format!("[{}]", v.join(", "))
}

/// An entry's fields as (name, shown value), in file order: what plans
/// compare. Id and revision are not fields of the file.
pub fn fields(e: &RegistrationEntry) -> Vec<(&'static str, String)> {
    vec![
        ("owner", e.owner.clone()),
        ("name", e.name.clone()),
        ("spiffe_id", e.spiffe_id.to_string()),
        ("parent_id", e.parent_id.to_string()),
        ("selectors", list(&e.selectors)),
        ("x509_svid_ttl", ttl(e.x509_svid_ttl)),
        ("jwt_svid_ttl", ttl(e.jwt_svid_ttl)),
        ("dns_names", list(&e.dns_names)),
        ("federates_with", list(&e.federates_with)),
        ("admin", e.admin.to_string()),
        (
            "admin_role",
            e.admin_role.map(|r| r.to_string()).unwrap_or_default(),
        ),
        ("hint", e.hint.clone()),
        ("expires_at", e.expires_at.map_or("never".into(), rfc3339)),
    ]
}

/// The fields that differ between `old` and `new`: (field, old, new).
pub fn diff(
    old: &RegistrationEntry,
    new: &RegistrationEntry,
) -> Vec<(&'static str, String, String)> {
    fields(old)
        .into_iter()
        .zip(fields(new))
        .filter(|((_, a), (_, b))| a != b)
        .map(|((f, a), (_, b))| (f, a, b))
        .collect()
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn quoted_list<T: fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let v: Vec<String> = items.into_iter().map(|i| quote(&i.to_string())).collect();
    format!("[{}]", v.join(", "))
}

/// Writes `entries` as a registration file, node aliases first. Each
/// entry is named by its `name`, or by its id when it has none; a name
/// used twice (entries of different owners) gets the id appended.
pub fn render(entries: &[RegistrationEntry]) -> String {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for e in entries {
        *seen.entry(e.name.as_str()).or_default() += 1;
    }
    let mut out = String::from("# Sigil registration file (sigil-server entry export).\n");
    let (nodes, workloads): (Vec<_>, Vec<_>) = entries.iter().partition(|e| e.is_node_alias());
    for (header, group) in [("node", nodes), ("entry", workloads)] {
        for e in group {
            let name = match e.name.as_str() {
                "" => e.id.to_string(),
                n if seen.get(n).copied().unwrap_or(0) > 1 => format!("{n}-{}", e.id),
                n => n.to_owned(),
            };
            out.push_str(&format!("\n[[{header}]]\nname = {}\n", quote(&name)));
            out.push_str(&format!("spiffe_id = {}\n", quote(e.spiffe_id.as_str())));
            if !e.is_node_alias() {
                out.push_str(&format!("parent_id = {}\n", quote(e.parent_id.as_str())));
            }
            out.push_str(&format!("selectors = {}\n", quoted_list(&e.selectors)));
            for (key, d) in [
                ("x509_svid_ttl", e.x509_svid_ttl),
                ("jwt_svid_ttl", e.jwt_svid_ttl),
            ] {
                if let Some(d) = d {
                    let d = sigil_identity::duration::format(d);
                    out.push_str(&format!("{key} = {}\n", quote(&d)));
                }
            }
            if !e.dns_names.is_empty() {
                out.push_str(&format!("dns_names = {}\n", quoted_list(&e.dns_names)));
            }
            if !e.federates_with.is_empty() {
                let fw = quoted_list(&e.federates_with);
                out.push_str(&format!("federates_with = {fw}\n"));
            }
            if e.admin {
                out.push_str("admin = true\n");
            }
            if let Some(role) = e.admin_role {
                out.push_str(&format!("admin_role = {}\n", quote(role.as_str())));
            }
            if !e.hint.is_empty() {
                out.push_str(&format!("hint = {}\n", quote(&e.hint)));
            }
            if let Some(t) = e.expires_at {
                out.push_str(&format!("expires_at = {}\n", quote(&rfc3339(t))));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    const GOOD: &str = r#"
[[node]]
name = "prod-nodes"
spiffe_id = "spiffe://example.org/node/prod"
selectors = ["join_token:id:abc"]

[[entry]]
name = "web"
spiffe_id = "spiffe://example.org/web"
parent_id = "spiffe://example.org/node/prod"
selectors = ["unix:uid:1000", "unix:gid:10"]
x509_svid_ttl = "1h"
jwt_svid_ttl = "5m"
dns_names = ["web.example.org"]
federates_with = ["partner.org"]
admin = true
admin_role = "revoke"
hint = "say \"hi\"\\"
expires_at = "2030-01-01T00:00:00Z"
"#;

    #[test]
    fn parses_every_field_and_round_trips_through_render() {
        let parsed = parse("f.toml", GOOD, Some(&td())).unwrap();
        assert_eq!(parsed.len(), 2);
        let web = &parsed[0].entry;
        assert_eq!((parsed[0].line, web.name.as_str()), (7, "web"));
        assert_eq!(web.x509_svid_ttl, Some(Duration::from_secs(3600)));
        assert_eq!(web.jwt_svid_ttl, Some(Duration::from_secs(300)));
        assert_eq!(web.hint, "say \"hi\"\\");
        assert!(web.admin);
        assert_eq!(web.admin_role, Some(AdminRole::Revoke));
        assert_eq!(
            web.expires_at,
            Some(sigil_identity::clock::from_unix_seconds(1_893_456_000))
        );
        assert!(parsed[1].entry.is_node_alias());
        let entries: Vec<_> = parsed.iter().map(|d| d.entry.clone()).collect();
        let again = parse("export", &render(&entries), Some(&td())).unwrap();
        let strip = |d: &Declared| RegistrationEntry {
            id: sigil_identity::EntryId::new("x").unwrap(),
            ..d.entry.clone()
        };
        let mut a: Vec<_> = parsed.iter().map(strip).collect();
        let mut b: Vec<_> = again.iter().map(strip).collect();
        a.sort_by(|x, y| x.name.cmp(&y.name));
        b.sort_by(|x, y| x.name.cmp(&y.name));
        assert_eq!(a, b);
    }

    fn problems(text: &str) -> Vec<(usize, Option<String>, String)> {
        parse("f.toml", text, Some(&td()))
            .unwrap_err()
            .problems
            .into_iter()
            .map(|p| (p.line, p.name, p.message))
            .collect()
    }

    #[test]
    fn unknown_keys_and_bad_values_name_line_and_entry() {
        let text = "[[entry]]\nname = \"a\"\nspiffe_id = \"spiffe://example.org/a\"\nparent_id = \"spiffe://example.org/p\"\nselectors = [\"unix:uid:1\"]\n\n[[entry]]\nname = \"b\"\nspiffe_id = \"spiffe://example.org/b\"\nparent_id = \"spiffe://example.org/p\"\nselector = [\"unix:uid:1\"]\n";
        let p = problems(text);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].0, 11);
        assert_eq!(p[0].1.as_deref(), Some("b"));
        assert!(p[0].2.contains("selector"), "{}", p[0].2);

        let bad_sel = text.replace("selector = ", "selectors = ").replace(
            "[\"unix:uid:1\"]\n\n[[entry]]",
            "[\"nocolon\"]\n\n[[entry]]",
        );
        let p = problems(&bad_sel);
        assert_eq!((p[0].0, p[0].1.as_deref()), (5, Some("a")), "{p:?}");

        let bad_id = text
            .replace("selector = ", "selectors = ")
            .replace("example.org/b", "example.org/../b");
        let p = problems(&bad_id);
        assert_eq!((p[0].0, p[0].1.as_deref()), (9, Some("b")), "{p:?}");

        let p = problems("owner = \"x\"\n");
        assert_eq!(p[0].0, 1);
        assert!(p[0].2.contains("owner"), "{p:?}");
    }

    #[test]
    fn duplicate_names_and_registrations_are_reported() {
        let one = "[[entry]]\nname = \"a\"\nspiffe_id = \"spiffe://example.org/a\"\nparent_id = \"spiffe://example.org/p\"\nselectors = [\"unix:uid:1\"]\n";
        let p = problems(&format!("{one}{one}"));
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p.iter().all(|p| p.0 == 6 && p.1.as_deref() == Some("a")));
        assert!(p[0].2.contains("line 1"), "{p:?}");
        let renamed = format!("{one}{}", one.replace("name = \"a\"", "name = \"b\""));
        let p = problems(&renamed);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].2.contains("same SPIFFE ID"), "{p:?}");
    }

    #[test]
    fn trust_domain_rules_and_section_rules_apply() {
        let foreign = "[[entry]]\nname = \"a\"\nspiffe_id = \"spiffe://other.org/a\"\nparent_id = \"spiffe://example.org/p\"\nselectors = [\"unix:uid:1\"]\n";
        let p = problems(foreign);
        assert!(p[0].2.contains("not in trust domain"), "{p:?}");
        let node_with_parent = foreign
            .replace("[[entry]]", "[[node]]")
            .replace("other.org", "example.org");
        let p = problems(&node_with_parent);
        assert!(p[0].2.contains("remove parent_id"), "{p:?}");
    }

    #[test]
    fn diff_names_changed_fields_only() {
        let parsed = parse("f.toml", GOOD, Some(&td())).unwrap();
        let old = parsed[0].entry.clone();
        let mut new = old.clone();
        new.hint = "other".into();
        new.id = sigil_identity::EntryId::generate();
        let d = diff(&old, &new);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].0, "hint");
        assert_eq!(d[0].2, "other");
    }
}
