//! Label selectors as Prometheus and Pyroscope write them:
//! `process_cpu{service_name="api",pod=~"api-.*",node!="n1",zone!~"eu-.*"}`.
//! The name before the braces is `__name__="…"`; `{}` and the empty string
//! select everything. Regular expressions are fully anchored (RE2 syntax via
//! the `regex` crate, as Prometheus), and a label a series does not have is
//! the empty string (so `k=""` selects series without `k`).
use std::fmt;

use regex::Regex;

use crate::model::NAME_LABEL;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Re,
    NotRe,
}

#[derive(Clone, Debug)]
pub struct Matcher {
    pub name: String,
    pub op: Op,
    pub value: String,
    re: Option<Regex>,
}

impl PartialEq for Matcher {
    fn eq(&self, o: &Self) -> bool {
        self.name == o.name && self.op == o.op && self.value == o.value
    }
}

impl Matcher {
    pub fn new(name: &str, op: Op, value: &str) -> Result<Self, String> {
        let re = match op {
            Op::Re | Op::NotRe => Some(
                Regex::new(&format!("^(?:{value})$"))
                    .map_err(|e| format!("label {name}: regular expression {value:?}: {e}"))?,
            ),
            _ => None,
        };
        Ok(Self {
            name: name.to_string(),
            op,
            value: value.to_string(),
            re,
        })
    }

    pub fn matches(&self, value: Option<&str>) -> bool {
        let v = value.unwrap_or("");
        match (self.op, &self.re) {
            (Op::Eq, _) => v == self.value,
            (Op::Ne, _) => v != self.value,
            (Op::Re, Some(re)) => re.is_match(v),
            (Op::NotRe, Some(re)) => !re.is_match(v),
            _ => false,
        }
    }
}

/// A parsed selector: every matcher must hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Selector(pub Vec<Matcher>);

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, m) in self.0.iter().enumerate() {
            let op = match m.op {
                Op::Eq => "=",
                Op::Ne => "!=",
                Op::Re => "=~",
                Op::NotRe => "!~",
            };
            let sep = if i == 0 { "" } else { "," };
            write!(f, "{sep}{}{op}{:?}", m.name, m.value)?;
        }
        f.write_str("}")
    }
}

impl Selector {
    /// Parses `name{…}`, `{…}`, `name` or the empty string.
    pub fn parse(s: &str) -> Result<Self, String> {
        let err = |m: &str| format!("label selector {s:?}: {m}");
        let s_trim = s.trim();
        let mut out = Vec::new();
        let (name, rest) = match s_trim.find('{') {
            Some(i) => (s_trim[..i].trim(), &s_trim[i..]),
            None => (s_trim, ""),
        };
        if !name.is_empty() {
            if !valid_name(name) {
                return Err(err(&format!("{name:?} is not a valid profile name")));
            }
            out.push(Matcher::new(NAME_LABEL, Op::Eq, name)?);
        }
        if rest.is_empty() {
            return Ok(Self(out));
        }
        let body = rest
            .strip_prefix('{')
            .and_then(|r| r.trim_end().strip_suffix('}'))
            .ok_or_else(|| err("expected {label=\"value\", …}"))?;
        let chars: Vec<char> = body.chars().collect();
        let mut i = 0;
        let skip_ws = |i: &mut usize| {
            while *i < chars.len() && chars[*i].is_whitespace() {
                *i += 1;
            }
        };
        loop {
            skip_ws(&mut i);
            if i >= chars.len() {
                break;
            }
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '.')
            {
                i += 1;
            }
            let label: String = chars[start..i].iter().collect();
            let label = label.replace('.', "_");
            if !valid_name(&label) {
                return Err(err(&format!("expected a label name at offset {start}")));
            }
            skip_ws(&mut i);
            let two: String = chars[i..chars.len().min(i + 2)].iter().collect();
            let op = if two == "=~" {
                i += 2;
                Op::Re
            } else if two == "!=" {
                i += 2;
                Op::Ne
            } else if two == "!~" {
                i += 2;
                Op::NotRe
            } else if two.starts_with('=') {
                i += 1;
                Op::Eq
            } else {
                return Err(err(&format!(
                    "expected =, !=, =~ or !~ after {label:?} at offset {i}"
                )));
            };
            skip_ws(&mut i);
            let quote = match chars.get(i) {
                Some(&q @ ('"' | '\'' | '`')) => q,
                _ => return Err(err(&format!("expected a quoted value for {label:?}"))),
            };
            i += 1;
            let mut value = String::new();
            loop {
                match chars.get(i) {
                    None => return Err(err(&format!("unterminated value of {label:?}"))),
                    Some(&c) if c == quote => {
                        i += 1;
                        break;
                    }
                    Some('\\') if quote != '`' => {
                        let c = chars.get(i + 1).ok_or_else(|| err("unterminated escape"))?;
                        value.push(match c {
                            'n' => '\n',
                            't' => '\t',
                            c => *c,
                        });
                        i += 2;
                    }
                    Some(&c) => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
            out.push(Matcher::new(&label, op, &value).map_err(|e| err(&e))?);
            skip_ws(&mut i);
            match chars.get(i) {
                None => break,
                Some(',') => i += 1,
                Some(c) => return Err(err(&format!("unexpected {c:?} at offset {i}"))),
            }
        }
        Ok(Self(out))
    }

    /// Whether a label set (looked up by `get`) satisfies every matcher.
    pub fn matches<'a>(&self, get: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.0.iter().all(|m| m.matches(get(&m.name)))
    }

    /// Over `(name, value)` pairs.
    pub fn matches_pairs(&self, pairs: &[(String, String)]) -> bool {
        self.matches(|n| pairs.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str()))
    }

    /// The value of an equality matcher on `name`, if there is one.
    pub fn equal(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|m| m.name == name && m.op == Op::Eq)
            .map(|m| m.value.as_str())
    }

    /// This selector and another one (both must hold).
    pub fn and(mut self, other: Selector) -> Self {
        self.0.extend(other.0);
        self
    }
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && !n.starts_with(|c: char| c.is_ascii_digit())
        && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_and_matches_like_prometheus() {
        let series = pairs(&[
            ("__name__", "process_cpu"),
            ("service_name", "checkout"),
            ("pod", "checkout-0"),
        ]);
        for (sel, want) in [
            ("", true),
            ("{}", true),
            ("process_cpu", true),
            ("memory{}", false),
            (r#"{pod="checkout-0"}"#, true),
            (r#"{pod="checkout-1"}"#, false),
            (
                r#"process_cpu{service_name="checkout",pod=~"checkout-.*"}"#,
                true,
            ),
            (r#"{pod=~"checkout"}"#, false), // anchored
            (r#"{pod!~"checkout-[0-9]+"}"#, false),
            (r#"{pod!="x", node=""}"#, true), // absent is ""
            (r#"{node!=""}"#, false),
            (r#" { service_name = 'checkout' , } "#, true),
            (r#"{k8s.pod.name=""}"#, true),
        ] {
            let s = Selector::parse(sel).unwrap();
            assert_eq!(s.matches_pairs(&series), want, "{sel}");
        }
        let s = Selector::parse(r#"process_cpu{a="x\"y",b=~"1|2"}"#).unwrap();
        assert_eq!(
            s.to_string(),
            r#"{__name__="process_cpu",a="x\"y",b=~"1|2"}"#
        );
        assert_eq!(s.equal("a"), Some("x\"y"));
        for bad in [
            r#"{pod}"#,
            r#"{pod="x""#,
            r#"{pod=x}"#,
            r#"{pod=~"("}"#,
            r#"{pod="x" node="y"}"#,
            "1abc{}",
            r#"{="x"}"#,
        ] {
            let e = Selector::parse(bad).unwrap_err();
            assert!(e.starts_with("label selector"), "{bad}: {e}");
        }
    }
}
