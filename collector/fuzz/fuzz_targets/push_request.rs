//! A Pyroscope `PushRequest` (protobuf) as the connect-push receiver gets it:
//! prost decode, then `decode_push` (series labels, every sample's pprof,
//! split into series by sample labels). Accepted requests yield at least
//! one profile per sample, every pprof sample once, and the non-empty IDs.
#![no_main]

use std::time::{Duration, SystemTime};

use fathom_collector::{proto::push::PushRequest, receivers::pyroscope::decode_push};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = PushRequest::decode(data) else {
        return;
    };
    let samples = req.series.iter().map(|s| s.samples.len()).sum::<usize>();
    let ids = req
        .series
        .iter()
        .flat_map(|s| &s.samples)
        .filter(|s| !s.id.is_empty())
        .count();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    if let Ok((profiles, got_ids)) = decode_push(req.clone(), now, |_| false) {
        assert!(profiles.len() >= samples, "at least one profile per sample");
        let pprof_samples: usize = req
            .series
            .iter()
            .flat_map(|s| &s.samples)
            .filter_map(|s| fathom_collector::pprof::decode(&s.raw_profile).ok())
            .map(|p| p.sample.len())
            .sum();
        assert_eq!(
            profiles
                .iter()
                .map(|p| p.profile.sample.len())
                .sum::<usize>(),
            pprof_samples,
            "the split keeps every pprof sample once"
        );
        assert_eq!(got_ids.len(), ids, "every non-empty ID acknowledged");
        assert!(profiles.iter().all(|p| p.received == now));
        // Every sample already seen: nothing decoded, nothing to acknowledge
        // except samples without an ID.
        let (again, again_ids) = decode_push(req, now, |_| true)
            .unwrap_or_else(|e| panic!("accepted once, refused when all seen: {e}"));
        assert!(again.len() >= samples - ids && again.len() <= profiles.len());
        assert!(again_ids.is_empty());
    }
});
