#![no_main]
use libfuzzer_sys::fuzz_target;
use sigil_attestors::k8s::cgroup::{CgroupMatch, parse};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // Never panics; whatever is found is well-formed.
    match parse(&text) {
        CgroupMatch::Container {
            pod_uid,
            container_id,
        } => {
            assert!(pod_uid.len() == 32 || pod_uid.len() == 36);
            assert_eq!(container_id.len(), 64);
        }
        CgroupMatch::PodOnly { pod_uid } => assert!(pod_uid.len() == 32 || pod_uid.len() == 36),
        CgroupMatch::NotInPod | CgroupMatch::Ambiguous(_) => {}
    }
});
