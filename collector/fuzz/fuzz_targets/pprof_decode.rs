//! `pprof::decode` on arbitrary bytes (gzipped or not). A profile it accepts
//! must survive everything the collector does with it: merging (here with
//! itself, which must double every value), folded stacks, top functions, and
//! an encode → decode round trip.
#![no_main]

use std::collections::BTreeMap;

use fathom_collector::{pprof, proto::pprof::Profile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(p) = pprof::decode(data) else { return };
    check(&p);
});

fn check(p: &Profile) {
    // Round trips, plain and gzipped.
    assert_eq!(
        pprof::decode(&pprof::encode(p)).as_ref(),
        Ok(p),
        "plain round trip"
    );
    assert_eq!(
        pprof::decode(&pprof::encode_gzip(p)).as_ref(),
        Ok(p),
        "gzip round trip"
    );

    let merged = match pprof::merge([p, p]) {
        Ok(Some(m)) => m,
        other => panic!("merging a valid profile with itself: {other:?}"),
    };
    if let Err(e) = pprof::validate(&merged) {
        panic!("merged profile is invalid: {e}");
    }
    assert_eq!(
        pprof::decode(&pprof::encode(&merged)).as_ref(),
        Ok(&merged),
        "merged round trip"
    );
    assert_eq!(merged.sample_type.len(), p.sample_type.len());

    // Another profile with other times (any int64 from a client): the merge
    // spans from the earliest start to the latest end, never negatively.
    let mut q = p.clone();
    (q.time_nanos, q.duration_nanos) = (p.duration_nanos, p.time_nanos);
    match pprof::merge([p, &q]) {
        Ok(Some(m)) => assert!(m.duration_nanos >= 0, "duration {}", m.duration_nanos),
        other => panic!("merging a valid profile with a copy: {other:?}"),
    }

    // Values are summed with saturation; only when no sum can saturate must
    // the merge be exactly twice the input.
    let abs_total: i128 = p
        .sample
        .iter()
        .flat_map(|s| s.value.iter())
        .map(|&v| i128::from(v).abs())
        .sum();
    let exact = abs_total.saturating_mul(2) < i128::from(i64::MAX);

    let indexes = (0..p.sample_type.len()).chain([
        pprof::sample_index(p, None),
        pprof::sample_index(p, Some("cpu")),
        p.sample_type.len(), // out of range: no values, no panic
    ]);
    for i in indexes {
        let f = pprof::folded(p, i);
        let fm = pprof::folded(&merged, i);
        assert!(
            f.windows(2).all(|w| w[0].0 < w[1].0),
            "folded stacks sorted, unique"
        );
        assert!(
            f.iter()
                .all(|(stack, _)| stack.split(';').count() <= pprof::MAX_STACK_FRAMES),
            "stacks are cut at MAX_STACK_FRAMES"
        );
        let (t, total) = pprof::top(p, i);
        let (tm, total_m) = pprof::top(&merged, i);
        if exact {
            let doubled: BTreeMap<_, _> = f
                .into_iter()
                .filter(|(_, v)| *v != 0)
                .map(|(s, v)| (s, 2 * v))
                .collect();
            let got: BTreeMap<_, _> = fm.into_iter().filter(|(_, v)| *v != 0).collect();
            assert_eq!(got, doubled, "folded stacks of p+p, index {i}");
            assert_eq!(total_m, 2 * total, "top total of p+p, index {i}");
            let doubled: BTreeMap<_, _> = t
                .into_iter()
                .filter(|e| e.flat != 0 || e.cum != 0)
                .map(|e| (e.name, (2 * e.flat, 2 * e.cum)))
                .collect();
            let got: BTreeMap<_, _> = tm
                .into_iter()
                .filter(|e| e.flat != 0 || e.cum != 0)
                .map(|e| (e.name, (e.flat, e.cum)))
                .collect();
            assert_eq!(got, doubled, "top functions of p+p, index {i}");
        }
    }
}
