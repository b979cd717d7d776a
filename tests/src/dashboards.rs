//! What the Grafana dashboards in `dashboards/` query, and whether the agent
//! really exports it: every Prometheus expression's metric names and label
//! names, every Pyroscope label selector and profile type, every Jaeger
//! search. The live check (agent + real traffic + a real Prometheus) is in
//! `tests/tests/dashboards.rs`; this module is the pure part.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use serde_json::Value;

/// One query a dashboard makes, with where it is (for messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Query {
    /// A PromQL expression of a panel target.
    Prom { at: String, expr: String },
    /// `label_values(selector, label)` of a template variable.
    PromLabelValues {
        at: String,
        selector: String,
        label: String,
    },
    /// A Pyroscope target or variable.
    Pyroscope {
        at: String,
        profile_type: String,
        selector: String,
        labels: Vec<String>,
    },
    /// A Jaeger search.
    Jaeger {
        at: String,
        service: String,
        tags: String,
    },
}

/// Every `dashboards/*.json`, by file name.
pub fn load(dir: &Path) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    entries.sort();
    for p in entries {
        let text = std::fs::read_to_string(&p).unwrap();
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        out.push((p.file_name().unwrap().to_string_lossy().into_owned(), v));
    }
    out
}

/// The datasource variables a dashboard declares: name → plugin type.
fn datasource_vars(d: &Value) -> BTreeMap<String, String> {
    vars(d)
        .filter(|v| v["type"] == "datasource")
        .map(|v| (str_of(&v["name"]), str_of(&v["query"])))
        .collect()
}

fn vars(d: &Value) -> impl Iterator<Item = &Value> {
    d["templating"]["list"].as_array().into_iter().flatten()
}

fn str_of(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// Panels, rows' nested panels included.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// Problems with a dashboard's structure: datasources that are not `${var}`
/// of a declared variable of the right type, duplicate panel ids or refIds,
/// a missing uid or title.
pub fn structure_problems(name: &str, d: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let ds_vars = datasource_vars(d);
    for key in ["uid", "title"] {
        if d[key].as_str().is_none_or(str::is_empty) {
            problems.push(format!("{name}: no {key}"));
        }
    }
    let check_ds = |at: &str, ds: &Value| -> Option<String> {
        let (typ, uid) = (str_of(&ds["type"]), str_of(&ds["uid"]));
        let var = uid
            .strip_prefix("${")
            .and_then(|u| u.strip_suffix('}'))
            .map(str::to_string);
        match var.and_then(|v| ds_vars.get(&v).map(|t| (v, t))) {
            Some((_, t)) if *t == typ => None,
            Some((v, t)) => Some(format!(
                "{at}: datasource type {typ} but variable ${v} is of type {t}"
            )),
            None => Some(format!(
                "{at}: datasource uid {uid:?} is not a declared datasource variable"
            )),
        }
    };
    for p in panels(d) {
        let at = format!("{name}: panel {:?}", str_of(&p["title"]));
        if p["type"] == "row" {
            continue;
        }
        problems.extend(check_ds(&at, &p["datasource"]));
        let mut refs = BTreeSet::new();
        for t in p["targets"].as_array().into_iter().flatten() {
            problems.extend(check_ds(&at, &t["datasource"]));
            if !refs.insert(str_of(&t["refId"])) {
                problems.push(format!("{at}: duplicate refId {}", t["refId"]));
            }
        }
    }
    for v in vars(d).filter(|v| v["type"] == "query") {
        problems.extend(check_ds(
            &format!("{name}: variable {}", str_of(&v["name"])),
            &v["datasource"],
        ));
    }
    let all_ids: Vec<u64> = panels(d).iter().filter_map(|p| p["id"].as_u64()).collect();
    if all_ids.len() != all_ids.iter().collect::<BTreeSet<_>>().len() {
        problems.push(format!("{name}: duplicate panel ids"));
    }
    problems
}

/// Every query of a dashboard (panel targets and template variables).
pub fn queries(name: &str, d: &Value) -> Vec<Query> {
    let ds_vars = datasource_vars(d);
    let kind_of = |ds: &Value| -> String {
        let uid = str_of(&ds["uid"]);
        let var = uid.trim_start_matches("${").trim_end_matches('}');
        ds_vars
            .get(var)
            .cloned()
            .unwrap_or_else(|| str_of(&ds["type"]))
    };
    let mut out = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let at = format!("{name}: panel {:?} {}", str_of(&p["title"]), t["refId"]);
            let ds = if t["datasource"].is_object() {
                &t["datasource"]
            } else {
                &p["datasource"]
            };
            out.push(target_query(at, &kind_of(ds), t));
        }
    }
    for v in vars(d).filter(|v| v["type"] == "query") {
        let at = format!("{name}: variable ${}", str_of(&v["name"]));
        match kind_of(&v["datasource"]).as_str() {
            "prometheus" => {
                let q = v["query"]["query"]
                    .as_str()
                    .or(v["query"].as_str())
                    .unwrap_or_default();
                out.push(match parse_label_values(q) {
                    Some((selector, label)) => Query::PromLabelValues {
                        at,
                        selector,
                        label,
                    },
                    None => Query::Prom {
                        at,
                        expr: q.to_string(),
                    },
                });
            }
            "grafana-pyroscope-datasource" => out.push(Query::Pyroscope {
                at,
                profile_type: str_of(&v["query"]["profileTypeId"]),
                selector: String::new(),
                labels: vec![str_of(&v["query"]["labelName"])],
            }),
            other => panic!("{at}: variables of datasource {other} are not checked"),
        }
    }
    out
}

fn target_query(at: String, kind: &str, t: &Value) -> Query {
    match kind {
        "prometheus" => Query::Prom {
            at,
            expr: str_of(&t["expr"]),
        },
        "grafana-pyroscope-datasource" => Query::Pyroscope {
            at,
            profile_type: str_of(&t["profileTypeId"]),
            selector: str_of(&t["labelSelector"]),
            labels: t["groupBy"]
                .as_array()
                .into_iter()
                .flatten()
                .map(str_of)
                .collect(),
        },
        "jaeger" => Query::Jaeger {
            at,
            service: str_of(&t["service"]),
            tags: str_of(&t["tags"]),
        },
        other => panic!("{at}: targets of datasource {other} are not checked"),
    }
}

/// `label_values(selector, label)` → (selector, label).
pub fn parse_label_values(q: &str) -> Option<(String, String)> {
    let inner = q.trim().strip_prefix("label_values(")?.strip_suffix(')')?;
    let (selector, label) = inner.rsplit_once(',')?;
    Some((selector.trim().to_string(), label.trim().to_string()))
}

/// What a PromQL expression refers to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PromRefs {
    /// Metric name → label names its selectors match on.
    pub metrics: BTreeMap<String, BTreeSet<String>>,
    /// Labels of `by`/`without`/`on`/`ignoring` clauses.
    pub grouping: BTreeSet<String>,
}

const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
];

#[derive(Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str,
    Num,
    Open(char),
    Close(char),
    Other(char),
}

fn tokenize(expr: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let cs: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < cs.len() {
        let c = cs[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let s = i;
            while i < cs.len() && (cs[i].is_ascii_alphanumeric() || cs[i] == '_' || cs[i] == ':') {
                i += 1;
            }
            out.push(Tok::Ident(cs[s..i].iter().collect()));
        } else if c.is_ascii_digit() || c == '.' {
            while i < cs.len() && (cs[i].is_ascii_alphanumeric() || cs[i] == '.') {
                i += 1;
            }
            out.push(Tok::Num);
        } else if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < cs.len() && cs[i] != c {
                i += if cs[i] == '\\' { 2 } else { 1 };
            }
            if i >= cs.len() {
                return Err(format!("unterminated string in {expr:?}"));
            }
            i += 1;
            out.push(Tok::Str);
        } else if c == '[' {
            // A range or subquery duration: nothing to check inside.
            let end = cs[i..]
                .iter()
                .position(|&x| x == ']')
                .ok_or_else(|| format!("unterminated [ in {expr:?}"))?;
            i += end + 1;
        } else if c == '(' || c == '{' {
            out.push(Tok::Open(c));
            i += 1;
        } else if c == ')' || c == '}' {
            out.push(Tok::Close(c));
            i += 1;
        } else {
            out.push(Tok::Other(c));
            i += 1;
        }
    }
    Ok(out)
}

/// The metric names and label names a PromQL expression refers to.
/// Function names are recognised by the `(` after them; matchers by their
/// `{…}`; grouping labels by the clause keyword.
pub fn promql_refs(expr: &str) -> Result<PromRefs, String> {
    let toks = tokenize(expr)?;
    let mut refs = PromRefs::default();
    let mut i = 0;
    let mut depth = 0i32;
    while i < toks.len() {
        match &toks[i] {
            Tok::Ident(id) => {
                let next = toks.get(i + 1);
                let lower = id.to_ascii_lowercase();
                if [
                    "by",
                    "without",
                    "on",
                    "ignoring",
                    "group_left",
                    "group_right",
                ]
                .contains(&lower.as_str())
                    && next == Some(&Tok::Open('('))
                {
                    i += 2;
                    while let Some(t) = toks.get(i) {
                        match t {
                            Tok::Ident(l) => {
                                refs.grouping.insert(l.clone());
                            }
                            Tok::Close(')') => break,
                            Tok::Other(',') => {}
                            t => {
                                return Err(format!(
                                    "unexpected {t:?} in a label list of {expr:?}"
                                ));
                            }
                        }
                        i += 1;
                    }
                } else if next == Some(&Tok::Open('('))
                    || matches!(next, Some(Tok::Ident(n)) if n == "by" || n == "without")
                {
                    // A function, or an aggregation (its clause may come first).
                } else if KEYWORDS.contains(&lower.as_str()) {
                } else {
                    let labels = refs.metrics.entry(id.clone()).or_default();
                    if next == Some(&Tok::Open('{')) {
                        i = matchers(&toks, i + 2, labels)
                            .map_err(|t| format!("unexpected {t} in a selector of {expr:?}"))?;
                    }
                }
            }
            Tok::Open(_) => depth += 1,
            Tok::Close(_) => depth -= 1,
            Tok::Str | Tok::Num | Tok::Other(_) => {}
        }
        if depth < 0 {
            return Err(format!("unbalanced brackets in {expr:?}"));
        }
        i += 1;
    }
    if depth != 0 {
        return Err(format!("unbalanced brackets in {expr:?}"));
    }
    Ok(refs)
}

/// Reads `name op "value", …}` from `toks[i..]` into `labels`; returns the
/// index of the closing `}`, or the unexpected token.
fn matchers(toks: &[Tok], mut i: usize, labels: &mut BTreeSet<String>) -> Result<usize, String> {
    #[derive(PartialEq)]
    enum At {
        Name,
        Op,
        Value,
    }
    let mut at = At::Name;
    while let Some(t) = toks.get(i) {
        match (t, &at) {
            (Tok::Close('}'), At::Name | At::Value) => return Ok(i),
            (Tok::Ident(l), At::Name) => {
                labels.insert(l.clone());
                at = At::Op;
            }
            (Tok::Other('=' | '!' | '~'), At::Op) => {}
            (Tok::Str, At::Op) => at = At::Value,
            (Tok::Other(','), At::Value) => at = At::Name,
            (t, _) => return Err(format!("{t:?}")),
        }
        i += 1;
    }
    Err("end of expression".into())
}

/// A Pyroscope label selector `{a="x", b=~"y"}` → label names.
pub fn selector_labels(selector: &str) -> Result<BTreeSet<String>, String> {
    if selector.trim().is_empty() {
        return Ok(BTreeSet::new());
    }
    let refs = promql_refs(&format!("m{selector}"))?;
    Ok(refs.metrics.get("m").cloned().unwrap_or_default())
}

/// The Prometheus text exposition → metric name (as exposed, with
/// `_bucket`/`_sum`/`_count`/`_total`) → label names seen on it.
pub fn exposition_labels(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = out.entry(line[..name_end].to_string()).or_default();
        if line[name_end..].starts_with('{')
            && let Ok(refs) = promql_refs(&format!("m{}", label_block(&line[name_end..])))
        {
            labels.extend(refs.metrics.get("m").cloned().unwrap_or_default());
        }
    }
    out
}

/// The `{…}` at the start of `s`, quotes respected.
fn label_block(s: &str) -> &str {
    let mut in_str = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_str => escaped = true,
            '"' => in_str = !in_str,
            '}' if !in_str => return &s[..=i],
            _ => {}
        }
    }
    s
}

/// Problems of one PromQL expression against what `/metrics` exposes: a
/// metric that is not there, a matched label a metric does not have, a
/// grouping label that none of the expression's metrics has (`le` only on
/// `_bucket` series, for instance).
pub fn prom_problems(
    at: &str,
    expr: &str,
    exposed: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<String> {
    let refs = match promql_refs(expr) {
        Ok(r) => r,
        Err(e) => return vec![format!("{at}: {e}")],
    };
    let mut problems = Vec::new();
    if refs.metrics.is_empty() {
        problems.push(format!("{at}: no metric in {expr:?}"));
    }
    for (metric, labels) in &refs.metrics {
        let Some(have) = exposed.get(metric) else {
            problems.push(format!("{at}: metric {metric} is not exported"));
            continue;
        };
        for l in labels {
            if !have.contains(l) {
                problems.push(format!("{at}: {metric} has no label {l} (it has {have:?})"));
            }
        }
    }
    for l in &refs.grouping {
        let on_all = refs
            .metrics
            .keys()
            .all(|m| exposed.get(m).is_some_and(|have| have.contains(l)));
        if !on_all {
            problems.push(format!(
                "{at}: grouping label {l} is not on every metric of the expression"
            ));
        }
    }
    problems
}

/// Grafana's variables replaced so that Prometheus can run the expression:
/// every template variable matches anything, `$__rate_interval` is `1m`.
pub fn substitute_variables(expr: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        let (name, tail) = match after.strip_prefix('{') {
            Some(b) => match b.find('}') {
                Some(e) => (&b[..e], &b[e + 1..]),
                None => (b, ""),
            },
            None => {
                let e = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..e], &after[e..])
            }
        };
        out.push_str(match name {
            "__rate_interval" | "__interval" | "__range" => "1m",
            _ => ".*",
        });
        rest = tail;
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(xs: &[&str]) -> BTreeSet<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn refs_of_a_quantile_over_a_rate() {
        let r = promql_refs(
            r#"histogram_quantile(0.99, sum by (le, job) (rate(x_bucket{job=~"$service", ns=~"a,b}"}[$__rate_interval])))"#,
        )
        .unwrap();
        assert_eq!(r.metrics.len(), 1);
        assert_eq!(r.metrics["x_bucket"], set(&["job", "ns"]));
        assert_eq!(r.grouping, set(&["le", "job"]));
    }

    #[test]
    fn refs_of_a_ratio_with_scalar_and_bare_metric() {
        let r = promql_refs(
            "sum by (status) (rate(a_total[1m])) / scalar(sum(rate(b_total{x!=\"\"}[1m]))) + c and on(job) d",
        )
        .unwrap();
        assert_eq!(
            r.metrics.keys().cloned().collect::<BTreeSet<_>>(),
            set(&["a_total", "b_total", "c", "d"])
        );
        assert_eq!(r.metrics["b_total"], set(&["x"]));
        assert_eq!(r.grouping, set(&["status", "job"]));
    }

    #[test]
    fn malformed_expressions_are_errors() {
        assert!(promql_refs("sum(rate(x[1m])").is_err());
        assert!(promql_refs("x{a=\"b}").is_err());
        assert!(promql_refs("x{=\"b\"}").is_err());
    }

    #[test]
    fn exposition_lines_give_names_and_labels() {
        let text = "# HELP a_total A.\n# TYPE a_total counter\na_total{job=\"x\",path=\"/a}b\\\"\"} 3\nb 1\nc_bucket{le=\"+Inf\",job=\"y\"} 2 1700000000000\n";
        let e = exposition_labels(text);
        assert_eq!(e["a_total"], set(&["job", "path"]));
        assert_eq!(e["b"], set(&[]));
        assert_eq!(e["c_bucket"], set(&["le", "job"]));
    }

    #[test]
    fn problems_name_missing_metrics_and_labels() {
        let exposed = exposition_labels("m_bucket{le=\"1\",job=\"a\"} 1\nm_count{job=\"a\"} 1\n");
        assert!(prom_problems("t", "sum by (le) (rate(m_bucket[1m]))", &exposed).is_empty());
        let p = prom_problems(
            "t",
            "sum by (le) (rate(m_count{job=\"a\", pod=\"p\"}[1m]))",
            &exposed,
        );
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("no label pod"), "{p:?}");
        assert!(p[1].contains("grouping label le"), "{p:?}");
        let p = prom_problems("t", "rate(nope_total[1m])", &exposed);
        assert_eq!(p, ["t: metric nope_total is not exported"]);
    }

    #[test]
    fn variables_are_substituted() {
        assert_eq!(
            substitute_variables(r#"rate(x{a=~"$service",b=~"${ns}"}[$__rate_interval])"#),
            r#"rate(x{a=~".*",b=~".*"}[1m])"#
        );
        assert_eq!(
            parse_label_values(r#"label_values(x{a=~"$n"}, job)"#),
            Some((r#"x{a=~"$n"}"#.to_string(), "job".to_string()))
        );
        assert_eq!(
            selector_labels(r#"{service_name=~"$s", pod="p"}"#).unwrap(),
            set(&["service_name", "pod"])
        );
    }

    #[test]
    fn the_shipped_dashboards_parse_and_are_well_formed() {
        let dir = crate::workspace_root().join("dashboards");
        let all = load(&dir);
        assert_eq!(all.len(), 3, "profiles, HTTP and network dashboards");
        for (name, d) in &all {
            assert_eq!(structure_problems(name, d), Vec::<String>::new());
            let qs = queries(name, d);
            assert!(!qs.is_empty(), "{name}");
            for q in qs {
                match q {
                    Query::Prom { at, expr } => {
                        promql_refs(&expr).unwrap_or_else(|e| panic!("{at}: {e}"));
                    }
                    Query::PromLabelValues { at, selector, .. } => {
                        promql_refs(&selector).unwrap_or_else(|e| panic!("{at}: {e}"));
                    }
                    Query::Pyroscope {
                        at,
                        profile_type,
                        selector,
                        ..
                    } => {
                        assert_eq!(
                            profile_type, "process_cpu:cpu:nanoseconds:cpu:nanoseconds",
                            "{at}"
                        );
                        selector_labels(&selector).unwrap_or_else(|e| panic!("{at}: {e}"));
                    }
                    Query::Jaeger { at, service, .. } => assert!(!service.is_empty(), "{at}"),
                }
            }
        }
    }
}
