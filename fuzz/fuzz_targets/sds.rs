#![no_main]
//! The agent's Envoy SDS request handling: an arbitrary
//! `envoy.service.discovery.v3.DiscoveryRequest` (the bytes a caller sends)
//! answered for a workload holding one SVID and its trust domain's bundle,
//! as `StreamSecrets` and `FetchSecrets` do. Resource names are only
//! compared with the workload's own names; whatever is asked, only those
//! come back, and nothing panics.
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use sigil_agent::cache::CachedSvid;
use sigil_agent::workload_api::sds::{self, SdsConfig, View};
use sigil_identity::{Bundle, RegistrationEntry, SelectorSet, SpiffeId};
use zeroize::Zeroizing;

fn view() -> &'static View {
    static VIEW: OnceLock<View> = OnceLock::new();
    VIEW.get_or_init(|| {
        let td = sigil_fuzz::trust_domain();
        let id = |s: &str| SpiffeId::parse(s).expect("a fixed valid SPIFFE ID");
        let entry = RegistrationEntry::new(
            id("spiffe://example.org/web"),
            id("spiffe://example.org/spire/agent/x"),
            SelectorSet::default(),
        );
        let svid = CachedSvid {
            entry: Arc::new(entry),
            key: Zeroizing::new(sigil_fuzz::SIGNING_KEY.to_vec()),
            chain: vec![sigil_fuzz::LEAF_CERT.to_vec()],
            not_before: sigil_fuzz::now(),
            not_after: sigil_fuzz::now() + Duration::from_secs(3600),
            renew_at: sigil_fuzz::now() + Duration::from_secs(1800),
        };
        let mut bundle = Bundle::new(td);
        bundle.x509_authorities.push(sigil_fuzz::CA_CERT.to_vec());
        View {
            svids: vec![Arc::new(svid)],
            trusted: vec![Arc::new(bundle)],
            crls: Arc::default(),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(req) = DiscoveryRequest::decode(data) else {
        return;
    };
    let names = SdsConfig::default();
    let allowed = [
        "default",
        "ROOTCA",
        "ALL",
        "spiffe://example.org/web",
        "spiffe://example.org",
    ];
    match sds::handle_request(&req, view(), &names) {
        Ok(secrets) => {
            for s in &secrets {
                if req.resource_names.is_empty() {
                    assert!(allowed.contains(&s.name.as_str()), "{}", s.name);
                } else {
                    assert!(req.resource_names.contains(&s.name), "{}", s.name);
                    assert!(allowed.contains(&s.name.as_str()), "{}", s.name);
                }
            }
        }
        Err(status) => assert_eq!(status.code(), tonic::Code::InvalidArgument),
    }
});
