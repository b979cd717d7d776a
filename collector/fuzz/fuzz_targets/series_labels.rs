//! `SeriesLabels::new` on arbitrary pairs: the input is split at NUL bytes
//! into pairs, each split at its first `=` into name and value (no `=`: the
//! whole pair is the name, the value empty). Accepted labels follow
//! Pyroscope's rules, and `selector()` escapes values.
#![no_main]

use fathom_collector::model::{MAX_LABEL_NAMES, NAME_LABEL, SERVICE_LABEL, SeriesLabels};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let pairs: Vec<(String, String)> = if text.is_empty() {
        Vec::new()
    } else {
        text.split('\0')
            .map(|p| match p.split_once('=') {
                Some((n, v)) => (n.to_string(), v.to_string()),
                None => (p.to_string(), String::new()),
            })
            .collect()
    };
    let Ok(labels) = SeriesLabels::new(pairs.clone()) else {
        return;
    };
    let got = labels.pairs();
    assert_eq!(got.len(), pairs.len(), "no pair dropped or added");
    assert!(got.len() <= MAX_LABEL_NAMES);
    assert!(
        got.windows(2).all(|w| w[0].0 < w[1].0),
        "sorted, unique: {got:?}"
    );
    for (n, v) in &pairs {
        let n = n.replace('.', "_");
        assert_eq!(labels.get(&n), Some(v.as_str()), "{n}");
        assert!(!v.is_empty());
        assert!(!n.is_empty() && !n.starts_with(|c: char| c.is_ascii_digit()));
        assert!(n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    }
    assert!(!labels.service().is_empty() && !labels.profile_name().is_empty());
    assert_eq!(labels.essential().pairs().len(), 2);
    assert!(labels.get(NAME_LABEL).is_some() && labels.get(SERVICE_LABEL).is_some());

    // The selector: name{k="v",…} with `"`, `\` and newlines escaped, so
    // that unescaping each value gives it back.
    let sel = labels.selector();
    let body = sel
        .strip_prefix(labels.profile_name())
        .and_then(|s| s.strip_prefix('{'))
        .and_then(|s| s.strip_suffix('}'))
        .unwrap_or_else(|| panic!("selector shape: {sel:?}"));
    let mut rest = body;
    for (n, v) in got.iter().filter(|(n, _)| n != NAME_LABEL) {
        rest = rest.strip_prefix(',').unwrap_or(rest);
        rest = rest
            .strip_prefix(n.as_str())
            .and_then(|r| r.strip_prefix("=\""))
            .unwrap_or_else(|| panic!("selector {sel:?}: label {n}"));
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => panic!("selector {sel:?}: dangling escape"),
                },
                Some((_, c)) => value.push(c),
                None => panic!("selector {sel:?}: unterminated value of {n}"),
            }
        };
        assert_eq!(&value, v, "selector {sel:?}: value of {n}");
        rest = &rest[end + 1..];
    }
    assert!(rest.is_empty(), "selector {sel:?}: trailing {rest:?}");
});
