//! The connection settings: the `[datastore]` connection string (libpq
//! `key=value` or a `postgresql://` URL), the optional password file, and
//! the TLS mode, parsed once into a [`PgSettings`] that never shows the
//! password.
//!
//! tokio-postgres parses the string itself, except the TLS options it does
//! not know (`sslmode` beyond `require`, `sslrootcert`): those are taken out
//! here and the rest handed to it.

use std::fmt;
use std::path::{Path, PathBuf};

/// How the connection to PostgreSQL is secured (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it, unverified (libpq `allow`/`prefer`).
    Prefer,
    /// TLS, the server's certificate unverified unless `sslrootcert` is
    /// given (then as `VerifyCa`), as libpq does.
    Require,
    /// TLS, the server's certificate chains to `sslrootcert`.
    VerifyCa,
    /// TLS, the certificate chains to `sslrootcert` and names the host.
    VerifyFull,
}

/// Why the settings could not be parsed. Never holds the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    #[error("datastore.connection: {0}")]
    Connection(String),
    #[error("datastore.password_file {0}: {1}")]
    PasswordFile(PathBuf, String),
    #[error("datastore.connection: sslrootcert {0}: {1}")]
    RootCert(PathBuf, String),
}

/// Parsed connection settings for tokio-postgres.
#[derive(Clone)]
pub struct PgSettings {
    /// Everything but TLS; its `Debug` redacts the password.
    pub config: tokio_postgres::Config,
    pub tls: TlsMode,
    /// PEM file of the CA certificates the server's must chain to.
    pub root_cert: Option<PathBuf>,
}

impl fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgSettings({self})")
    }
}

/// What to show of the settings in logs and errors: hosts, ports, user,
/// database and TLS mode; never the password.
impl fmt::Display for PgSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hosts: Vec<String> = self
            .config
            .get_hosts()
            .iter()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        let ports: Vec<String> = self.config.get_ports().iter().map(u16::to_string).collect();
        write!(
            f,
            "host={} port={} user={} dbname={} sslmode={}",
            hosts.join(","),
            if ports.is_empty() {
                "5432".into()
            } else {
                ports.join(",")
            },
            self.config.get_user().unwrap_or("(default)"),
            self.config.get_dbname().unwrap_or("(user)"),
            match self.tls {
                TlsMode::Disable => "disable",
                TlsMode::Prefer => "prefer",
                TlsMode::Require => "require",
                TlsMode::VerifyCa => "verify-ca",
                TlsMode::VerifyFull => "verify-full",
            }
        )
    }
}

impl PgSettings {
    /// Parses `connection`; a password in `password_file` (its first line)
    /// replaces one in the string.
    pub fn parse(connection: &str, password_file: Option<&Path>) -> Result<Self, SettingsError> {
        let (rest, tls, root_cert) = if is_url(connection) {
            split_url(connection)?
        } else {
            split_key_values(connection)?
        };
        let mut config: tokio_postgres::Config = rest.parse().map_err(|e| {
            // tokio-postgres names the option, never its value.
            SettingsError::Connection(format!("{e}"))
        })?;
        if config.get_hosts().is_empty() {
            return Err(SettingsError::Connection(
                "no host given (host=/run/postgresql for the local socket, or host=NAME)".into(),
            ));
        }
        if let Some(path) = password_file {
            config.password(read_password(path)?);
        }
        if config.get_application_name().is_none() {
            config.application_name("sigil-server");
        }
        let tls = match (tls, &root_cert) {
            (Some(TlsMode::Require), Some(_)) => TlsMode::VerifyCa,
            (Some(mode), _) => mode,
            // libpq's default.
            (None, _) => TlsMode::Prefer,
        };
        if matches!(tls, TlsMode::VerifyCa | TlsMode::VerifyFull) && root_cert.is_none() {
            return Err(SettingsError::Connection(
                "sslmode=verify-ca and verify-full need sslrootcert=FILE (PEM of the CA certificates the database server's must chain to)".into(),
            ));
        }
        config.ssl_mode(match tls {
            TlsMode::Disable => tokio_postgres::config::SslMode::Disable,
            TlsMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        Ok(Self {
            config,
            tls,
            root_cert,
        })
    }
}

fn is_url(s: &str) -> bool {
    s.starts_with("postgresql://") || s.starts_with("postgres://")
}

fn tls_mode(value: &str) -> Result<TlsMode, SettingsError> {
    Ok(match value {
        "disable" => TlsMode::Disable,
        "allow" | "prefer" => TlsMode::Prefer,
        "require" => TlsMode::Require,
        "verify-ca" => TlsMode::VerifyCa,
        "verify-full" => TlsMode::VerifyFull,
        other => {
            return Err(SettingsError::Connection(format!(
                "sslmode {other:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
            )));
        }
    })
}

fn root_cert(value: &str) -> Result<PathBuf, SettingsError> {
    if value == "system" {
        return Err(SettingsError::Connection(
            "sslrootcert=system is not supported: give the PEM file of the CA certificates".into(),
        ));
    }
    Ok(PathBuf::from(value))
}

type Split = (String, Option<TlsMode>, Option<PathBuf>);

/// Splits the TLS options off a `key=value` string; the rest is written
/// back with every value quoted.
fn split_key_values(s: &str) -> Result<Split, SettingsError> {
    let mut rest = String::new();
    let mut tls = None;
    let mut root = None;
    for (key, value) in key_values(s)? {
        match key.as_str() {
            "sslmode" => tls = Some(tls_mode(&value)?),
            "sslrootcert" => root = Some(root_cert(&value)?),
            _ => {
                if !rest.is_empty() {
                    rest.push(' ');
                }
                rest.push_str(&key);
                rest.push_str("='");
                for c in value.chars() {
                    if c == '\'' || c == '\\' {
                        rest.push('\\');
                    }
                    rest.push(c);
                }
                rest.push('\'');
            }
        }
    }
    Ok((rest, tls, root))
}

/// libpq's `key = value` syntax: values bare or single-quoted with `\`
/// escapes. Errors never quote a value (it may be the password).
fn key_values(s: &str) -> Result<Vec<(String, String)>, SettingsError> {
    let bad = |why: &str| SettingsError::Connection(why.to_owned());
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(SettingsError::Connection(format!(
                "expected `=` after {key:?} (write key=value pairs separated by spaces)"
            )));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => return Err(bad("a quoted value is not closed")),
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(bad("a quoted value ends in `\\`")),
                    },
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(bad("a value ends in `\\`")),
                    }
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

/// Splits the TLS options off a URL's query.
fn split_url(s: &str) -> Result<Split, SettingsError> {
    let Some((base, query)) = s.split_once('?') else {
        return Ok((s.to_owned(), None, None));
    };
    let mut kept = Vec::new();
    let mut tls = None;
    let mut root = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sslmode" => tls = Some(tls_mode(&percent_decode(value)?)?),
            "sslrootcert" => root = Some(root_cert(&percent_decode(value)?)?),
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, tls, root))
}

fn percent_decode(s: &str) -> Result<String, SettingsError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    SettingsError::Connection("a URL parameter has a bad %-escape".into())
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| SettingsError::Connection("a URL parameter is not UTF-8".into()))
}

/// The first line of the password file.
fn read_password(path: &Path) -> Result<String, SettingsError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| SettingsError::PasswordFile(path.to_owned(), e.to_string()))?;
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        return Err(SettingsError::PasswordFile(
            path.to_owned(),
            "the file is empty (its first line is the password)".into(),
        ));
    }
    Ok(line.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_values_with_quotes_and_tls_options_are_split() {
        let s = PgSettings::parse(
            "host=db1,db2 port=5432,5433 user=sigil password='se cr\\'et' dbname=sigil sslmode=verify-full sslrootcert=/etc/ca.pem target_session_attrs=read-write",
            None,
        )
        .unwrap();
        assert_eq!(s.tls, TlsMode::VerifyFull);
        assert_eq!(s.root_cert.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(s.config.get_password(), Some(&b"se cr'et"[..]));
        assert_eq!(s.config.get_hosts().len(), 2);
        assert_eq!(s.config.get_ports(), [5432, 5433]);
        assert_eq!(
            s.to_string(),
            "host=db1,db2 port=5432,5433 user=sigil dbname=sigil sslmode=verify-full"
        );
    }

    #[test]
    fn urls_are_split_and_require_with_a_root_verifies_the_chain() {
        let s = PgSettings::parse(
            "postgresql://sigil:secret@db:6432/sigil?sslmode=require&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
            None,
        )
        .unwrap();
        assert_eq!(s.tls, TlsMode::VerifyCa);
        assert_eq!(s.root_cert.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(s.config.get_application_name(), Some("x"));
        assert_eq!(s.config.get_dbname(), Some("sigil"));
    }

    #[test]
    fn the_password_is_never_shown_or_quoted_in_errors() {
        for bad in [
            "host=db password=secret sslmode=verify-full",
            "host=db password=secret bogus=1",
            "host=db password='secret",
            "host=db password secret",
            "postgresql://u:secret@db/x?sslmode=nope",
        ] {
            let err = PgSettings::parse(bad, None).unwrap_err().to_string();
            assert!(!err.contains("secret"), "{bad}: {err}");
        }
        let s = PgSettings::parse("host=db password=secret", None).unwrap();
        assert!(!format!("{s} {s:?}").contains("secret"));
    }

    #[test]
    fn a_password_file_replaces_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\n").unwrap();
        let s = PgSettings::parse("host=/run/postgresql password=x", Some(&file)).unwrap();
        assert_eq!(s.config.get_password(), Some(&b"from-file"[..]));
        assert_eq!(s.tls, TlsMode::Prefer);
        std::fs::write(&file, "").unwrap();
        assert!(PgSettings::parse("host=/tmp", Some(&file)).is_err());
        assert!(PgSettings::parse("user=sigil", None).is_err(), "no host");
    }
}
