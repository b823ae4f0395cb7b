//! `metav1.LabelSelector`: `matchLabels` and `matchExpressions` (In, NotIn, Exists, DoesNotExist), ANDed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::model::Labels;

/// A `matchExpressions[].operator`. `Other` carries an operator the API does not define: such a selector is
/// invalid (see [`LabelSelector::validate`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
    Other(String),
}

/// One `matchExpressions[]` entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    #[serde(default)]
    pub values: Vec<String>,
}

/// A label selector. The empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub match_expressions: Vec<Requirement>,
}

/// Why a selector is invalid (the API server would have rejected it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum SelectorError {
    #[error("operator {0:?} is not In, NotIn, Exists or DoesNotExist")]
    UnknownOperator(String),
    #[error("operator {operator} on key {key:?} needs at least one value")]
    MissingValues { key: String, operator: String },
    #[error("operator {operator} on key {key:?} takes no values")]
    UnexpectedValues { key: String, operator: String },
}

impl LabelSelector {
    /// The selector that matches everything (`{}`).
    pub fn everything() -> Self {
        Self::default()
    }

    /// `matchLabels` only.
    pub fn labels<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self {
            match_labels: pairs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            match_expressions: Vec::new(),
        }
    }

    /// Checks the selector as `metav1.LabelSelectorAsSelector` does.
    pub fn validate(&self) -> Result<(), SelectorError> {
        for r in &self.match_expressions {
            match &r.operator {
                Operator::In | Operator::NotIn if r.values.is_empty() => {
                    return Err(SelectorError::MissingValues {
                        key: r.key.clone(),
                        operator: format!("{:?}", r.operator),
                    });
                }
                Operator::Exists | Operator::DoesNotExist if !r.values.is_empty() => {
                    return Err(SelectorError::UnexpectedValues {
                        key: r.key.clone(),
                        operator: format!("{:?}", r.operator),
                    });
                }
                Operator::Other(o) => return Err(SelectorError::UnknownOperator(o.clone())),
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether `labels` satisfy every term. Callers check [`Self::validate`] first: an invalid selector is
    /// given a meaning by the caller (a peer matches nothing, a policy selects its whole namespace), not here.
    /// Here an unknown operator matches nothing.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let got = labels.get(&r.key);
                match &r.operator {
                    Operator::In => got.is_some_and(|v| r.values.contains(v)),
                    // As Kubernetes: NotIn also matches objects without the key.
                    Operator::NotIn => got.is_none_or(|v| !r.values.contains(v)),
                    Operator::Exists => got.is_some(),
                    Operator::DoesNotExist => got.is_none(),
                    Operator::Other(_) => false,
                }
            })
    }

    /// Whether this is the empty selector (matches everything).
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, operator: Operator, values: &[&str]) -> Requirement {
        Requirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn match_labels_and_expressions_are_anded() {
        let s = LabelSelector {
            match_labels: l(&[("app", "web")]).into_iter().collect(),
            match_expressions: vec![req("tier", Operator::In, &["a", "b"])],
        };
        assert!(s.matches(&l(&[("app", "web"), ("tier", "a")])));
        assert!(!s.matches(&l(&[("app", "web"), ("tier", "c")])));
        assert!(!s.matches(&l(&[("app", "web")])));
        assert!(!s.matches(&l(&[("app", "db"), ("tier", "a")])));
        assert!(LabelSelector::everything().matches(&l(&[])));
    }

    #[test]
    fn operators_follow_kubernetes() {
        let m = |op, vals: &[&str], labels: &[(&str, &str)]| {
            LabelSelector {
                match_labels: BTreeMap::new(),
                match_expressions: vec![req("k", op, vals)],
            }
            .matches(&l(labels))
        };
        assert!(
            m(Operator::NotIn, &["x"], &[]),
            "NotIn matches a missing key"
        );
        assert!(!m(Operator::NotIn, &["x"], &[("k", "x")]));
        assert!(m(Operator::NotIn, &["x"], &[("k", "y")]));
        assert!(m(Operator::Exists, &[], &[("k", "")]));
        assert!(!m(Operator::Exists, &[], &[]));
        assert!(m(Operator::DoesNotExist, &[], &[]));
        assert!(!m(Operator::DoesNotExist, &[], &[("k", "v")]));
        assert!(!m(Operator::In, &["x"], &[]));
    }

    #[test]
    fn invalid_selectors_are_reported() {
        let bad = |op, vals: &[&str]| LabelSelector {
            match_labels: BTreeMap::new(),
            match_expressions: vec![req("k", op, vals)],
        };
        assert!(bad(Operator::In, &[]).validate().is_err());
        assert!(bad(Operator::Exists, &["v"]).validate().is_err());
        assert!(
            bad(Operator::Other("Gt".into()), &["1"])
                .validate()
                .is_err()
        );
        assert!(bad(Operator::NotIn, &["v"]).validate().is_ok());
    }
}
