//! What `doctor` found: one [`Check`] per fact it compared, each ✔ (holds), ✘ (broken, with
//! the exact fix) or ? (could not be checked, and why), printed for a person or as JSON.

use serde::Serialize;

/// Exit status when at least one check failed: distinct from usage errors (64), an
/// unreachable apiserver (69) and internal errors (70).
pub const EXIT_FAILED: u8 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    Unknown,
}

impl Status {
    pub fn mark(self) -> &'static str {
        match self {
            Status::Pass => "✔",
            Status::Fail => "✘",
            Status::Unknown => "?",
        }
    }
}

/// One check: a stable id (`group.name`), what it found, and for a failure the fix.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub id: &'static str,
    pub status: Status,
    /// One line: what holds, what is broken, or why it could not be checked.
    pub summary: String,
    /// The items behind the summary (pods, namespaces, fields), one per line.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
    /// For ✘: what to run or change, exactly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    pub fn pass(id: &'static str, summary: impl Into<String>) -> Self {
        Self {
            id,
            status: Status::Pass,
            summary: summary.into(),
            details: Vec::new(),
            fix: None,
        }
    }

    pub fn fail(id: &'static str, summary: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            id,
            status: Status::Fail,
            summary: summary.into(),
            details: Vec::new(),
            fix: Some(fix.into()),
        }
    }

    pub fn unknown(id: &'static str, why: impl Into<String>) -> Self {
        Self {
            id,
            status: Status::Unknown,
            summary: why.into(),
            details: Vec::new(),
            fix: None,
        }
    }

    pub fn with_details(mut self, details: Vec<String>) -> Self {
        self.details = details;
        self
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub fn failed(&self) -> bool {
        self.checks.iter().any(|c| c.status == Status::Fail)
    }

    fn count(&self, status: Status) -> usize {
        self.checks.iter().filter(|c| c.status == status).count()
    }

    /// For a person: one line per check, its details and fix indented below it.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            out.push_str(&format!("{} {:<22} {}\n", c.status.mark(), c.id, c.summary));
            for d in &c.details {
                out.push_str(&format!("      {d}\n"));
            }
            if let Some(fix) = &c.fix {
                out.push_str("      fix:\n");
                for line in fix.lines() {
                    out.push_str(&format!("        {line}\n"));
                }
            }
        }
        out.push_str(&format!(
            "\n{} passed, {} failed, {} could not be checked\n",
            self.count(Status::Pass),
            self.count(Status::Fail),
            self.count(Status::Unknown)
        ));
        out
    }

    pub fn json(&self) -> String {
        let value = serde_json::json!({
            "checks": self.checks,
            "passed": self.count(Status::Pass),
            "failed": self.count(Status::Fail),
            "unknown": self.count(Status::Unknown),
        });
        serde_json::to_string_pretty(&value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_prints_its_fix_and_counts() {
        let report = Report {
            checks: vec![
                Check::pass("a.one", "fine"),
                Check::fail("a.two", "broken", "kubectl apply -f x\nthen this"),
                Check::unknown("a.three", "unreachable"),
            ],
        };
        assert!(report.failed());
        let text = report.text();
        assert!(text.contains("✘ a.two"), "{text}");
        assert!(
            text.contains("        kubectl apply -f x\n        then this"),
            "{text}"
        );
        assert!(
            text.contains("1 passed, 1 failed, 1 could not be checked"),
            "{text}"
        );
        let json: serde_json::Value = serde_json::from_str(&report.json()).unwrap();
        assert_eq!(json["checks"][1]["status"], "fail");
        assert_eq!(json["failed"], 1);
    }
}

/// An [`Unchecked`] from `format!` arguments.
macro_rules! why {
    ($($arg:tt)*) => {
        $crate::doctor::report::Unchecked::from(format!($($arg)*))
    };
}
pub(crate) use why;

/// Why a fact could not be read, so the checks that need it are `?`: said in one line, as
/// the report prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unchecked(String);

impl std::fmt::Display for Unchecked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for Unchecked {
    fn from(why: String) -> Self {
        Unchecked(why)
    }
}

impl From<&str> for Unchecked {
    fn from(why: &str) -> Self {
        Unchecked(why.to_owned())
    }
}

impl From<crate::startup::StartError> for Unchecked {
    fn from(e: crate::startup::StartError) -> Self {
        Unchecked(e.to_string())
    }
}

impl From<crate::http::client::FetchError> for Unchecked {
    fn from(e: crate::http::client::FetchError) -> Self {
        Unchecked(e.to_string())
    }
}

impl From<Unchecked> for String {
    fn from(why: Unchecked) -> Self {
        why.0
    }
}
