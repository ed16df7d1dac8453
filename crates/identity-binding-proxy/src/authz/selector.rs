//! Label selectors (`metav1.LabelSelector`) as the apiserver reads them: the one matcher the
//! RBAC index and the kube emulator's ClusterRole aggregation share.
//!
//! A selector is first checked the way the apiserver validates one it is asked to store
//! (`ValidateLabelSelector`: a known operator, values for `In`/`NotIn` and none for
//! `Exists`/`DoesNotExist`, keys that are qualified names, values that are label values), then
//! matched by kube-core's [`Selector`], whose matching is `labels.Selector`'s: `In` needs the
//! label and one of the values, `NotIn` is met by an absent label, `matchLabels` entries are
//! equalities, and every requirement must hold (an empty selector selects everything).
//! kube-core alone would accept what the apiserver refuses (an `In` with no values, which
//! would select nothing; values beside `Exists`; keys and values that are no label's), so
//! those are refused here first: whatever parses is exactly what `LabelSelectorAsSelector`
//! turns into a selector.
//!
//! A refused selector means something different to each user: the RBAC index takes it to
//! select every role (it can only come from a source that skipped validation, and the index
//! errs towards dropping cached decisions); the kube emulator refuses to load a ClusterRole
//! carrying one, as the apiserver refuses to store it.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::core::{Selector, SelectorExt};

/// A selector the apiserver accepts, ready to match label sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matcher(Selector);

impl Matcher {
    /// Parses `selector` as the apiserver does; refused with every reason the apiserver's
    /// validation would give.
    pub fn parse(selector: &LabelSelector) -> Result<Self, InvalidSelector> {
        let causes = validate(selector, "");
        if !causes.is_empty() {
            return Err(InvalidSelector(causes));
        }
        // What is valid here always converts; a refusal would still be reported, not hidden.
        Selector::try_from(selector.clone())
            .map(Matcher)
            .map_err(|e| InvalidSelector(vec![FieldError::invalid("", "null", &e.0)]))
    }

    /// Whether `labels` satisfy every requirement of the selector.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.matches(labels)
    }
}

/// Why a selector is refused: the apiserver's field errors, in its order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidSelector(pub Vec<FieldError>);

impl fmt::Display for InvalidSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let causes: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&causes.join(", "))
    }
}

impl std::error::Error for InvalidSelector {}

/// One field error, worded as the apiserver words it in a 422 `Invalid` Status's causes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The field's path, e.g. `aggregationRule.clusterRoleSelectors[0].matchExpressions[1].operator`.
    pub field: String,
    /// The Status cause's reason: `FieldValueInvalid`, `FieldValueRequired` or `FieldValueForbidden`.
    pub reason: &'static str,
    /// The cause's message, e.g. `Invalid value: "Bogus": not a valid selector operator`.
    pub message: String,
}

impl FieldError {
    fn invalid(field: &str, value: &str, detail: &str) -> Self {
        Self {
            field: field.to_string(),
            reason: "FieldValueInvalid",
            message: format!("Invalid value: {value}: {detail}"),
        }
    }

    fn required(field: &str, detail: &str) -> Self {
        Self {
            field: field.to_string(),
            reason: "FieldValueRequired",
            message: format!("Required value: {detail}"),
        }
    }

    fn forbidden(field: &str, detail: &str) -> Self {
        Self {
            field: field.to_string(),
            reason: "FieldValueForbidden",
            message: format!("Forbidden: {detail}"),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// The apiserver's checks of a selector it is asked to store, with field paths under `path`
/// (e.g. `aggregationRule.clusterRoleSelectors[0]`; empty for the selector itself).
pub fn validate(selector: &LabelSelector, path: &str) -> Vec<FieldError> {
    let child = |name: &str| match path {
        "" => name.to_string(),
        _ => format!("{path}.{name}"),
    };
    let mut causes = Vec::new();
    let labels_path = child("matchLabels");
    for (key, value) in selector.match_labels.iter().flatten() {
        causes.extend(
            label_key_errors(key).map(|e| FieldError::invalid(&labels_path, &quoted(key), &e)),
        );
        causes.extend(
            label_value_errors(value)
                .map(|e| FieldError::invalid(&labels_path, &quoted(value), &e)),
        );
    }
    for (i, requirement) in selector.match_expressions.iter().flatten().enumerate() {
        causes.extend(requirement_errors(
            requirement,
            &child(&format!("matchExpressions[{i}]")),
        ));
    }
    causes
}

fn requirement_errors(requirement: &LabelSelectorRequirement, path: &str) -> Vec<FieldError> {
    let values = requirement.values.as_deref().unwrap_or_default();
    let mut causes = Vec::new();
    match requirement.operator.as_str() {
        "In" | "NotIn" if values.is_empty() => causes.push(FieldError::required(
            &format!("{path}.values"),
            "must be specified when `operator` is 'In' or 'NotIn'",
        )),
        "Exists" | "DoesNotExist" if !values.is_empty() => causes.push(FieldError::forbidden(
            &format!("{path}.values"),
            "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
        )),
        "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
        other => causes.push(FieldError::invalid(
            &format!("{path}.operator"),
            &quoted(other),
            "not a valid selector operator",
        )),
    }
    let key = &requirement.key;
    causes.extend(
        label_key_errors(key)
            .map(|e| FieldError::invalid(&format!("{path}.key"), &quoted(key), &e)),
    );
    for (i, value) in values.iter().enumerate() {
        let field = format!("{path}.values[{i}]");
        causes.extend(
            label_value_errors(value).map(|e| FieldError::invalid(&field, &quoted(value), &e)),
        );
    }
    causes
}

/// A Go `%q` of a string, as the apiserver shows a refused value.
fn quoted(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

const NAME_PATTERN: &str = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]";
const VALUE_PATTERN: &str = "(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?";
const SUBDOMAIN_PATTERN: &str = "[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*";

/// `[A-Za-z0-9]` first and last, `-`, `_` and `.` between.
fn is_label_word(s: &str) -> bool {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    alnum(s.chars().next())
        && alnum(s.chars().last())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// `IsDNS1123Subdomain`'s pattern: dot-separated lowercase words of letters, digits and `-`.
fn is_subdomain(s: &str) -> bool {
    s.split('.').all(|part| {
        let alnum =
            |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        alnum(part.chars().next())
            && alnum(part.chars().last())
            && part
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    })
}

/// `IsQualifiedName`'s complaints about a label key: an optional DNS-subdomain prefix and
/// `/`, then a name of at most 63 characters.
fn label_key_errors(key: &str) -> impl Iterator<Item = String> {
    let mut errors = Vec::new();
    let name = match key.split('/').collect::<Vec<_>>()[..] {
        [name] => name,
        [prefix, name] => {
            if prefix.is_empty() {
                errors.push("prefix part must be non-empty".to_string());
            } else if prefix.len() > 253 {
                errors.push("prefix part must be no more than 253 characters".to_string());
            } else if !is_subdomain(prefix) {
                errors.push(format!(
                    "prefix part a lowercase RFC 1123 subdomain must consist of lower case \
                     alphanumeric characters, '-' or '.', and must start and end with an \
                     alphanumeric character (e.g. 'example.com', regex used for validation is \
                     '{SUBDOMAIN_PATTERN}')"
                ));
            }
            name
        }
        _ => {
            errors.push(format!(
                "a qualified name must consist of alphanumeric characters, '-', '_' or '.', and \
                 must start and end with an alphanumeric character (e.g. 'MyName',  or \
                 'my.name',  or '123-abc', regex used for validation is '{NAME_PATTERN}') with \
                 an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
            ));
            return errors.into_iter();
        }
    };
    if name.is_empty() {
        errors.push("name part must be non-empty".to_string());
    } else if name.len() > 63 {
        errors.push("name part must be no more than 63 characters".to_string());
    }
    if !is_label_word(name) {
        errors.push(format!(
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start \
             and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or \
             '123-abc', regex used for validation is '{NAME_PATTERN}')"
        ));
    }
    errors.into_iter()
}

/// `IsValidLabelValue`'s complaints: empty, or at most 63 characters of a label word.
fn label_value_errors(value: &str) -> impl Iterator<Item = String> {
    let mut errors = Vec::new();
    if value.len() > 63 {
        errors.push("must be no more than 63 characters".to_string());
    }
    if !value.is_empty() && !is_label_word(value) {
        errors.push(format!(
            "a valid label must be an empty string or consist of alphanumeric characters, '-', \
             '_' or '.', and must start and end with an alphanumeric character (e.g. \
             'MyValue',  or 'my_value',  or '12345', regex used for validation is \
             '{VALUE_PATTERN}')"
        ));
    }
    errors.into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn selector(value: serde_json::Value) -> LabelSelector {
        serde_json::from_value(value).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Which of the label sets `sets` the selector picks, by index.
    fn picks(value: serde_json::Value, sets: &[BTreeMap<String, String>]) -> Vec<usize> {
        let m = Matcher::parse(&selector(value.clone())).unwrap_or_else(|e| panic!("{value}: {e}"));
        (0..sets.len()).filter(|i| m.matches(&sets[*i])).collect()
    }

    /// No labels; tier=web; tier=api; tier=web and env=prod; env=prod alone.
    fn population() -> Vec<BTreeMap<String, String>> {
        vec![
            labels(&[]),
            labels(&[("tier", "web")]),
            labels(&[("tier", "api")]),
            labels(&[("tier", "web"), ("env", "prod")]),
            labels(&[("env", "prod")]),
        ]
    }

    fn expression(key: &str, operator: &str, values: &[&str]) -> serde_json::Value {
        json!({"matchExpressions": [{"key": key, "operator": operator, "values": values}]})
    }

    #[test]
    fn in_needs_the_label_with_one_of_the_values() {
        let p = population();
        assert_eq!(picks(expression("tier", "In", &["web"]), &p), [1, 3]);
        assert_eq!(
            picks(expression("tier", "In", &["web", "api"]), &p),
            [1, 2, 3]
        );
    }

    #[test]
    fn not_in_is_met_by_another_value_or_no_label() {
        let p = population();
        assert_eq!(picks(expression("tier", "NotIn", &["web"]), &p), [0, 2, 4]);
    }

    #[test]
    fn exists_and_does_not_exist_look_at_the_key_only() {
        let p = population();
        assert_eq!(
            picks(
                json!({"matchExpressions": [{"key": "env", "operator": "Exists"}]}),
                &p
            ),
            [3, 4]
        );
        assert_eq!(
            picks(
                json!({"matchExpressions": [{"key": "env", "operator": "DoesNotExist"}]}),
                &p
            ),
            [0, 1, 2]
        );
    }

    #[test]
    fn match_labels_are_equalities() {
        let p = population();
        assert_eq!(picks(json!({"matchLabels": {"tier": "web"}}), &p), [1, 3]);
        assert_eq!(
            picks(json!({"matchLabels": {"tier": "web", "env": "prod"}}), &p),
            [3]
        );
    }

    #[test]
    fn every_requirement_must_hold() {
        let p = population();
        let both = json!({
            "matchLabels": {"env": "prod"},
            "matchExpressions": [
                {"key": "tier", "operator": "Exists"},
                {"key": "tier", "operator": "NotIn", "values": ["api"]},
            ],
        });
        assert_eq!(picks(both, &p), [3]);
        let contradiction = json!({"matchExpressions": [
            {"key": "tier", "operator": "Exists"},
            {"key": "tier", "operator": "DoesNotExist"},
        ]});
        assert_eq!(picks(contradiction, &p), Vec::<usize>::new());
    }

    #[test]
    fn an_empty_selector_selects_everything() {
        let p = population();
        assert_eq!(picks(json!({}), &p), [0, 1, 2, 3, 4]);
        assert_eq!(
            picks(json!({"matchLabels": {}, "matchExpressions": []}), &p),
            [0, 1, 2, 3, 4]
        );
    }

    fn refusal(value: serde_json::Value) -> Vec<(String, String)> {
        let e = Matcher::parse(&selector(value.clone())).expect_err(&value.to_string());
        e.0.into_iter().map(|c| (c.field, c.message)).collect()
    }

    #[test]
    fn in_or_not_in_without_values_is_refused_not_read_as_selecting_nothing() {
        for operator in ["In", "NotIn"] {
            for value in [
                expression("tier", operator, &[]),
                json!({"matchExpressions": [{"key": "tier", "operator": operator}]}),
            ] {
                assert_eq!(
                    refusal(value),
                    [(
                        "matchExpressions[0].values".to_string(),
                        "Required value: must be specified when `operator` is 'In' or 'NotIn'"
                            .to_string()
                    )]
                );
            }
        }
    }

    #[test]
    fn an_unknown_operator_is_refused() {
        // Operators are case-sensitive, as the apiserver's are.
        for operator in ["Bogus", "in", "Equals", ""] {
            assert_eq!(
                refusal(expression("tier", operator, &["web"])),
                [(
                    "matchExpressions[0].operator".to_string(),
                    format!(
                        "Invalid value: {}: not a valid selector operator",
                        quoted(operator)
                    )
                )]
            );
        }
    }

    #[test]
    fn values_beside_exists_and_malformed_keys_or_values_are_refused() {
        let fields =
            |value| -> Vec<String> { refusal(value).into_iter().map(|(f, _)| f).collect() };
        assert_eq!(
            fields(expression("tier", "Exists", &["web"])),
            ["matchExpressions[0].values"]
        );
        assert_eq!(
            fields(expression("tier", "DoesNotExist", &["web"])),
            ["matchExpressions[0].values"]
        );
        assert_eq!(
            fields(expression("bad key", "Exists", &[])),
            ["matchExpressions[0].key"]
        );
        assert_eq!(
            fields(expression("tier", "In", &["ok", "-bad-"])),
            ["matchExpressions[0].values[1]"]
        );
        assert_eq!(
            fields(json!({"matchLabels": {"-bad": "x"}})),
            ["matchLabels"]
        );
        assert_eq!(
            fields(json!({"matchLabels": {"a": "x y"}})),
            ["matchLabels"]
        );
        assert_eq!(
            fields(json!({"matchLabels": {"Example.com/a": "x"}})),
            ["matchLabels"]
        );
        assert_eq!(
            fields(json!({"matchLabels": {"a/b/c": "x"}})),
            ["matchLabels"]
        );
        assert_eq!(
            fields(json!({"matchLabels": {"a": "x".repeat(64)}})),
            ["matchLabels"]
        );
        // What the apiserver accepts: prefixed keys, empty values, 63 characters.
        let fine = json!({"matchLabels": {"example.com/a_b.c-d": "", "z": "v".repeat(63)}});
        assert!(Matcher::parse(&selector(fine)).is_ok());
    }

    #[test]
    fn refusals_carry_the_given_field_path() {
        let s = selector(expression("tier", "Bogus", &["web"]));
        let causes = validate(&s, "aggregationRule.clusterRoleSelectors[2]");
        assert_eq!(
            causes[0].field,
            "aggregationRule.clusterRoleSelectors[2].matchExpressions[0].operator"
        );
        assert_eq!(causes[0].reason, "FieldValueInvalid");
    }
}
