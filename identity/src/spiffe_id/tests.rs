//! Accept/reject tables for SPEC.md "SPIFFE IDs".

use super::*;

fn td_allowed(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_')
}

fn path_allowed(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_')
}

/// Builds a string from raw bytes; bytes ≥ 0x80 become a two-byte UTF-8
/// character, which is still outside every allowed set.
fn with_byte(prefix: &str, b: u8, suffix: &str) -> String {
    let mut s = String::from(prefix);
    s.push(char::from(b));
    s.push_str(suffix);
    s
}

#[test]
fn every_byte_in_trust_domain_position() {
    for b in 0u8..=255 {
        let id = with_byte("spiffe://a", b, "b/path");
        let got = SpiffeId::parse(&id);
        if b == b'/' {
            // "a" + "/" + "b/path": a valid ID with trust domain "a".
            assert!(got.is_ok(), "byte {b:#04x}");
            continue;
        }
        assert_eq!(
            got.is_ok(),
            td_allowed(b),
            "byte {b:#04x} in trust domain: {got:?}"
        );
        let td = TrustDomain::new(&with_byte("a", b, "b"));
        assert_eq!(
            td.is_ok(),
            td_allowed(b),
            "byte {b:#04x} in bare trust domain"
        );
    }
}

#[test]
fn every_byte_in_path_position() {
    for b in 0u8..=255 {
        let id = with_byte("spiffe://example.org/a", b, "b");
        let got = SpiffeId::parse(&id);
        if b == b'/' {
            assert!(got.is_ok(), "'/' splits segments");
            continue;
        }
        assert_eq!(
            got.is_ok(),
            path_allowed(b),
            "byte {b:#04x} in path: {got:?}"
        );
        let seg = TrustDomain::new("example.org")
            .unwrap()
            .id_from_segments(&[with_byte("a", b, "b")]);
        assert_eq!(
            seg.is_ok(),
            path_allowed(b),
            "byte {b:#04x} in a built segment"
        );
    }
}

#[test]
fn accepts_valid_ids() {
    for s in [
        "spiffe://example.org",
        "spiffe://example.org/workload",
        "spiffe://example.org/ns/default/sa/web",
        "spiffe://a-b_c.d/X.y-Z_0",
        "spiffe://1.2.3.4/ip-looking-td-is-fine",
        "spiffe://td/..a/a../.a./...",
    ] {
        let id = SpiffeId::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(id.as_str(), s);
    }
}

#[test]
fn rejects_invalid_ids_naming_the_rule() {
    use IdError::*;
    let table: &[(&str, IdError)] = &[
        ("", WrongScheme),
        ("example.org/workload", WrongScheme),
        ("SPIFFE://example.org/w", WrongScheme),
        ("Spiffe://example.org/w", WrongScheme),
        ("spiffe:/example.org/w", WrongScheme),
        ("https://example.org/w", WrongScheme),
        ("spiffe://", EmptyTrustDomain),
        ("spiffe:///path", EmptyTrustDomain),
        ("spiffe://Example.org/w", TrustDomainChar('E')),
        ("spiffe://example.org:8080/w", TrustDomainPort),
        ("spiffe://user@example.org/w", TrustDomainUserinfo),
        ("spiffe://[::1]/w", TrustDomainChar('[')),
        ("spiffe://exa%6Dple.org/w", PercentEncoding),
        ("spiffe://example.org/w%2F", PercentEncoding),
        ("spiffe://example.org/w?x=1", QueryOrFragment),
        ("spiffe://example.org/w#frag", QueryOrFragment),
        ("spiffe://example.org?x", QueryOrFragment),
        ("spiffe://example.org/", TrailingSlash),
        ("spiffe://example.org/w/", TrailingSlash),
        ("spiffe://example.org//w", EmptySegment),
        ("spiffe://example.org/a//b", EmptySegment),
        ("spiffe://example.org/.", DotSegment),
        ("spiffe://example.org/..", DotSegment),
        ("spiffe://example.org/a/./b", DotSegment),
        ("spiffe://example.org/a/../b", DotSegment),
        ("spiffe://example.org/a b", PathChar(' ')),
        ("spiffe://example.org/ä", PathChar('\u{fffd}')),
    ];
    for (input, want) in table {
        assert_eq!(SpiffeId::parse(input).as_ref(), Err(want), "{input:?}");
    }
}

#[test]
fn path_is_case_sensitive() {
    let a = SpiffeId::parse("spiffe://example.org/Web").unwrap();
    let b = SpiffeId::parse("spiffe://example.org/web").unwrap();
    assert_ne!(a, b);
}

#[test]
fn trust_domain_length_limit() {
    let ok = "a".repeat(MAX_TRUST_DOMAIN_LEN);
    assert!(TrustDomain::new(&ok).is_ok());
    assert!(SpiffeId::parse(&format!("spiffe://{ok}/w")).is_ok());
    let long = "a".repeat(MAX_TRUST_DOMAIN_LEN + 1);
    assert_eq!(TrustDomain::new(&long), Err(IdError::TrustDomainTooLong));
    assert_eq!(
        SpiffeId::parse(&format!("spiffe://{long}/w")),
        Err(IdError::TrustDomainTooLong)
    );
}

#[test]
fn spiffe_id_length_limit() {
    let prefix = "spiffe://example.org/";
    let exact = format!("{prefix}{}", "a".repeat(MAX_SPIFFE_ID_LEN - prefix.len()));
    assert_eq!(exact.len(), MAX_SPIFFE_ID_LEN);
    assert!(SpiffeId::parse(&exact).is_ok());
    let over = format!("{exact}b");
    assert_eq!(SpiffeId::parse(&over), Err(IdError::TooLong));
    let td = TrustDomain::new("example.org").unwrap();
    let seg = "a".repeat(MAX_SPIFFE_ID_LEN);
    assert_eq!(td.id_from_segments(&[seg]), Err(IdError::TooLong));
}

#[test]
fn outside_input_is_refused_never_cleaned() {
    let td = TrustDomain::new("example.org").unwrap();
    let table: &[(&str, IdError)] = &[
        ("a/b", IdError::SlashInSegment),
        ("..", IdError::DotSegment),
        (".", IdError::DotSegment),
        ("", IdError::EmptySegment),
        ("a%2Fb", IdError::PercentEncoding),
        ("../../etc", IdError::SlashInSegment),
    ];
    for (seg, want) in table {
        assert_eq!(
            td.id_from_segments(&["node", seg]).as_ref(),
            Err(want),
            "{seg:?}"
        );
    }
    let ok = td.id_from_segments(&["node", "worker-1"]).unwrap();
    assert_eq!(ok.as_str(), "spiffe://example.org/node/worker-1");
}

#[test]
fn reserved_workload_ids() {
    let td = TrustDomain::new("example.org").unwrap();
    assert_eq!(
        td.id().check_workload_id(),
        Err(ReservedIdError::BareTrustDomain)
    );
    assert_eq!(
        SpiffeId::server(&td).check_workload_id(),
        Err(ReservedIdError::SigilReserved)
    );
    let agent = SpiffeId::parse("spiffe://example.org/sigil/agent/join_token/x").unwrap();
    assert!(agent.is_agent());
    assert_eq!(
        agent.check_workload_id(),
        Err(ReservedIdError::SigilReserved)
    );
    let bare = SpiffeId::parse("spiffe://example.org/sigil").unwrap();
    assert_eq!(
        bare.check_workload_id(),
        Err(ReservedIdError::SigilReserved)
    );
    let fine = SpiffeId::parse("spiffe://example.org/sigilx/web").unwrap();
    assert_eq!(fine.check_workload_id(), Ok(()));
}

#[test]
fn parts_and_serde_round_trip() {
    let id = SpiffeId::parse("spiffe://example.org/ns/web").unwrap();
    assert_eq!(id.trust_domain_str(), "example.org");
    assert_eq!(id.path(), "/ns/web");
    assert!(id.is_member_of(&TrustDomain::new("example.org").unwrap()));
    let json = serde_json::to_string(&id).unwrap();
    assert_eq!(json, "\"spiffe://example.org/ns/web\"");
    let back: SpiffeId = serde_json::from_str(&json).unwrap();
    assert_eq!(back, id);
    assert!(serde_json::from_str::<SpiffeId>("\"spiffe://example.org/../x\"").is_err());
    assert!(serde_json::from_str::<TrustDomain>("\"Example.org\"").is_err());
    assert_eq!(
        TrustDomain::from_name_or_id("spiffe://example.org")
            .unwrap()
            .as_str(),
        "example.org"
    );
    assert!(TrustDomain::from_name_or_id("spiffe://example.org/x").is_err());
}

#[test]
fn agent_ids_are_only_ids_under_sigil_agent() {
    let td = TrustDomain::new("example.org").unwrap();
    let a = AgentId::from_segments(&td, &["join_token", "abc"]).unwrap();
    assert_eq!(
        a.as_str(),
        "spiffe://example.org/sigil/agent/join_token/abc"
    );
    assert_eq!(a.trust_domain(), td);
    assert_eq!(
        AgentId::from_segments::<&str>(&td, &[]).unwrap_err(),
        IdError::EmptySegment
    );
    assert!(AgentId::from_segments(&td, &["a/b"]).is_err());

    let workload = SpiffeId::parse("spiffe://example.org/web").unwrap();
    assert_eq!(
        AgentId::try_from(workload.clone()),
        Err(NotAgentId(workload))
    );
    for not_agent in [
        "spiffe://example.org/sigil/server",
        "spiffe://example.org/sigil/agent",
        "spiffe://example.org/sigil/agentx/y",
    ] {
        assert!(
            AgentId::try_from(SpiffeId::parse(not_agent).unwrap()).is_err(),
            "{not_agent}"
        );
    }
    let back: SpiffeId = a.clone().into();
    assert_eq!(AgentId::try_from(back).unwrap(), a);

    // Serde: the same string as a SpiffeId, and only agent IDs read back.
    let json = serde_json::to_string(&a).unwrap();
    assert_eq!(json, "\"spiffe://example.org/sigil/agent/join_token/abc\"");
    assert_eq!(serde_json::from_str::<AgentId>(&json).unwrap(), a);
    assert!(serde_json::from_str::<AgentId>("\"spiffe://example.org/web\"").is_err());

    // Maps keyed by AgentId answer lookups by the plain SpiffeId.
    let map: std::collections::HashMap<AgentId, u8> = [(a.clone(), 1)].into();
    assert_eq!(map.get(a.as_spiffe_id()), Some(&1));
}
