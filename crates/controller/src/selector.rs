//! Which Nodes the controller manages: a Kubernetes label selector (`--node-selector`), parsed and checked
//! before anything is contacted, sent to the API server as `labelSelector`, and evaluated here too (to tell a
//! Node that left the selection from one that is still in it). Pure.
//!
//! Grammar (the API server's, `k8s.io/apimachinery/pkg/labels`): requirements separated by commas, each one of
//! `key`, `!key`, `key=value`, `key==value`, `key!=value`, `key in (v1,v2)`, `key notin (v1,v2)`. Keys are an
//! optional DNS subdomain prefix and `/`, then a name of at most 63 characters; values are empty or at most 63
//! characters of `[A-Za-z0-9._-]`, starting and ending alphanumeric. `gt`/`lt` are refused.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let get = |k: &str| labels.get(k).map(String::as_str);
        match self {
            Self::Equals(k, v) => get(k) == Some(v.as_str()),
            Self::NotEquals(k, v) => get(k) != Some(v.as_str()),
            Self::In(k, vs) => get(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Self::NotIn(k, vs) => get(k).is_none_or(|l| vs.iter().all(|v| v != l)),
            Self::Exists(k) => get(k).is_some(),
            Self::DoesNotExist(k) => get(k).is_none(),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Equals(k, v) => write!(f, "{k}={v}"),
            Self::NotEquals(k, v) => write!(f, "{k}!={v}"),
            Self::In(k, vs) => write!(f, "{k} in ({})", vs.join(",")),
            Self::NotIn(k, vs) => write!(f, "{k} notin ({})", vs.join(",")),
            Self::Exists(k) => write!(f, "{k}"),
            Self::DoesNotExist(k) => write!(f, "!{k}"),
        }
    }
}

/// A parsed, valid label selector over Nodes. The empty selector selects every Node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeSelector {
    requirements: Vec<Requirement>,
}

/// Why a selector was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid node selector {selector:?}: {reason}")]
pub struct SelectorError {
    pub selector: String,
    pub reason: String,
}

impl NodeSelector {
    /// Every Node.
    pub fn all() -> Self {
        Self::default()
    }

    /// Selects every Node.
    pub fn is_all(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// Whether Node labels `labels` are selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// The `labelSelector` query value; `None` for the empty selector.
    pub fn to_query(&self) -> Option<String> {
        (!self.is_all()).then(|| self.to_string())
    }
}

impl fmt::Display for NodeSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

impl FromStr for NodeSelector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| SelectorError {
            selector: s.to_string(),
            reason,
        };
        let mut requirements = Vec::new();
        for term in split_terms(s).map_err(err)? {
            requirements.push(parse_term(&term).map_err(err)?);
        }
        Ok(Self { requirements })
    }
}

/// Commas separate requirements except inside `( … )`.
fn split_terms(s: &str) -> Result<Vec<String>, String> {
    let mut terms = Vec::new();
    let mut depth = 0u32;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => {
                if depth > 0 {
                    return Err("nested parentheses".into());
                }
                depth += 1;
                cur.push(c);
            }
            ')' => {
                if depth == 0 {
                    return Err("unbalanced ')'".into());
                }
                depth -= 1;
                cur.push(c);
            }
            ',' if depth == 0 => terms.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    if depth > 0 {
        return Err("unbalanced '('".into());
    }
    terms.push(cur);
    if terms.len() == 1 && terms[0].trim().is_empty() {
        return Ok(Vec::new());
    }
    if let Some(i) = terms.iter().position(|t| t.trim().is_empty()) {
        return Err(format!("empty requirement at position {}", i + 1));
    }
    Ok(terms)
}

fn parse_term(term: &str) -> Result<Requirement, String> {
    let t = term.trim();
    if let Some(k) = t.strip_prefix('!') {
        let k = k.trim();
        check_key(k)?;
        return Ok(Requirement::DoesNotExist(k.to_string()));
    }
    if let Some((k, v)) = t.split_once("!=") {
        let (k, v) = (k.trim(), v.trim());
        check_key(k)?;
        check_value(v)?;
        return Ok(Requirement::NotEquals(k.into(), v.into()));
    }
    if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
        let (k, v) = (k.trim(), v.trim());
        check_key(k)?;
        check_value(v)?;
        return Ok(Requirement::Equals(k.into(), v.into()));
    }
    if t.contains('(') || t.contains(')') {
        let open = t.find('(').ok_or("')' without '('")?;
        let (head, rest) = t.split_at(open);
        let mut words = head.split_whitespace();
        let (Some(k), Some(op), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!("{t:?}: expected `key in (…)` or `key notin (…)`"));
        };
        let inner = rest
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(|| format!("{t:?}: nothing may follow ')'"))?;
        check_key(k)?;
        let values: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
        if values.iter().all(String::is_empty) {
            return Err(format!("{t:?}: `{op}` needs at least one value"));
        }
        for v in &values {
            check_value(v)?;
        }
        return match op {
            "in" => Ok(Requirement::In(k.into(), values)),
            "notin" => Ok(Requirement::NotIn(k.into(), values)),
            other => Err(format!(
                "{t:?}: unknown operator {other:?} (expected in or notin)"
            )),
        };
    }
    if t.split_whitespace().count() > 1 {
        return Err(format!(
            "{t:?}: unknown operator (supported: =, ==, !=, in, notin, exists, !)"
        ));
    }
    check_key(t)?;
    Ok(Requirement::Exists(t.to_string()))
}

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, at most 63 characters.
fn is_qualified_name_part(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// A DNS-1123 subdomain: lowercase labels of `[a-z0-9-]`, dot-separated, at most 253 characters.
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

fn check_key(k: &str) -> Result<(), String> {
    let ok = match k.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_qualified_name_part(name),
        None => is_qualified_name_part(k),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{k:?} is not a valid label key (an optional DNS subdomain prefix and '/', then at most 63 \
             characters of [A-Za-z0-9._-], starting and ending alphanumeric)"
        ))
    }
}

fn check_value(v: &str) -> Result<(), String> {
    if v.is_empty() || is_qualified_name_part(v) {
        Ok(())
    } else {
        Err(format!(
            "{v:?} is not a valid label value (empty, or at most 63 characters of [A-Za-z0-9._-], starting \
             and ending alphanumeric)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    #[test]
    fn empty_selects_everything() {
        let s: NodeSelector = "".parse().unwrap();
        assert!(s.is_all());
        assert_eq!(s.to_query(), None);
        assert!(s.matches(&labels(&[])));
        assert!("  ".parse::<NodeSelector>().unwrap().is_all());
    }

    #[test]
    fn equality_and_existence() {
        let s: NodeSelector = "underlay.dev/managed=true".parse().unwrap();
        assert!(s.matches(&labels(&[("underlay.dev/managed", "true")])));
        assert!(!s.matches(&labels(&[("underlay.dev/managed", "false")])));
        assert!(!s.matches(&labels(&[])));
        assert_eq!(s.to_query().as_deref(), Some("underlay.dev/managed=true"));

        let s: NodeSelector = "a==1, !b, c, d!=x".parse().unwrap();
        assert_eq!(s.to_string(), "a=1,!b,c,d!=x");
        assert!(s.matches(&labels(&[("a", "1"), ("c", "")])));
        assert!(!s.matches(&labels(&[("a", "1"), ("b", "y"), ("c", "")])));
        assert!(!s.matches(&labels(&[("a", "1"), ("c", ""), ("d", "x")])));
        assert!(s.matches(&labels(&[("a", "1"), ("c", ""), ("d", "z")])));
    }

    #[test]
    fn set_based() {
        let s: NodeSelector = "eks.amazonaws.com/nodegroup in (ng-underlay, ng-b),zone notin (x)"
            .parse()
            .unwrap();
        assert_eq!(
            s.requirements()[0],
            Requirement::In(
                "eks.amazonaws.com/nodegroup".into(),
                vec!["ng-underlay".into(), "ng-b".into()]
            )
        );
        assert!(s.matches(&labels(&[("eks.amazonaws.com/nodegroup", "ng-b")])));
        assert!(!s.matches(&labels(&[("eks.amazonaws.com/nodegroup", "ng-old")])));
        assert!(!s.matches(&labels(&[
            ("eks.amazonaws.com/nodegroup", "ng-b"),
            ("zone", "x")
        ])));
        assert_eq!(
            s.to_string(),
            "eks.amazonaws.com/nodegroup in (ng-underlay,ng-b),zone notin (x)"
        );
        // The rendered form parses back to the same selector.
        assert_eq!(s.to_string().parse::<NodeSelector>().unwrap(), s);
    }

    #[test]
    fn malformed_selectors_are_refused_with_the_reason() {
        for bad in [
            "a=b=c",
            "a in (x",
            "a in x)",
            "a in ()",
            "a gt (1)",
            "a > 1",
            "=x",
            "a,,b",
            "a,",
            "Bad_Prefix/x=1",
            "a/b/c",
            "-a=1",
            "a=-x",
            "a foo",
            "a in (b) c",
            &format!("a={}", "v".repeat(64)),
        ] {
            let e = bad.parse::<NodeSelector>().expect_err(bad);
            assert_eq!(e.selector, bad);
            assert!(e.to_string().contains("invalid node selector"), "{e}");
        }
    }
}
