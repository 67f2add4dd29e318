//! What the CA shows about a trust change: served as JSON at `/rotation` on the
//! HTTP listener, printed by `signet-ca rotation status` as text or JSON.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::{ledger::Serving, stage::Stage};

/// The trust change as the CA sees it now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The stage.
    pub stage: Stage,
    /// When it began (RFC 3339).
    pub since: String,
    /// Seconds in it.
    pub seconds_in_stage: i64,
    /// When the next set was declared.
    pub declared_at: Option<String>,
    /// Digest of the set that signed before (SHA-256 over its files, hex).
    pub from: String,
    /// Digest of the next set.
    pub to: Option<String>,
    /// The signing certificate of the set signing now.
    pub signing: String,
    /// Roots in the bundle every consumer is given now.
    pub roots: usize,
    /// The cap on lifetimes during the rotation, seconds.
    pub window_seconds: i64,
    /// What the stage waits for, in words.
    pub waiting_for: String,
    /// Holders whose leaves keep the stage from ending.
    pub pending: usize,
    /// Whether the record knows every holder (else the stage ends at its latest end).
    pub complete: bool,
    /// Of the pending holders, in `distribute`, those given the old bundle after the
    /// declaration: waited for even past the latest end.
    #[serde(default)]
    pub late: usize,
    /// Some of the pending holders.
    pub pending_sample: Vec<String>,
    /// Every consumer the CA writes holds this stage's bundle.
    pub consumers_converged: bool,
    /// Consumers read back without this stage's bundle (some of them).
    #[serde(default)]
    pub lagging: Vec<String>,
    /// In cluster mode: whether this replica is the elected one, and where the
    /// shared record lives.
    #[serde(default)]
    pub role: Option<String>,
    /// The latest end of the stage as far as leaves decide it (RFC 3339).
    pub expected_end: Option<String>,
    /// A problem the operator must know about (a refused next set, ...).
    pub problem: Option<String>,
    /// Every stage change of this rotation: (stage, RFC 3339).
    pub history: Vec<(Stage, String)>,
    /// What the holders that say it (signet-agents) serve, as they said last since
    /// the declaration.
    #[serde(default)]
    pub serving: Serving,
}

impl Default for Status {
    fn default() -> Self {
        Self {
            stage: Stage::Idle,
            since: String::new(),
            seconds_in_stage: 0,
            declared_at: None,
            from: String::new(),
            to: None,
            signing: String::new(),
            roots: 0,
            window_seconds: 0,
            waiting_for: "starting".into(),
            pending: 0,
            complete: false,
            late: 0,
            pending_sample: Vec::new(),
            consumers_converged: false,
            lagging: Vec::new(),
            role: None,
            expected_end: None,
            problem: None,
            history: Vec::new(),
            serving: Serving::default(),
        }
    }
}

impl Status {
    /// The text `rotation status` prints.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let short = |d: &str| d.chars().take(16).collect::<String>();
        let _ = writeln!(
            out,
            "stage:        {} (since {}, {}s)",
            self.stage, self.since, self.seconds_in_stage
        );
        if let Some(role) = &self.role {
            let _ = writeln!(out, "replica:      {role}");
        }
        let _ = writeln!(out, "signing:      {}", self.signing);
        let _ = writeln!(out, "bundle:       {} root(s)", self.roots);
        match &self.to {
            Some(to) => {
                let _ = writeln!(out, "from set:     {}", short(&self.from));
                let _ = writeln!(out, "to set:       {}", short(to));
            }
            None => {
                let _ = writeln!(out, "set:          {}", short(&self.from));
            }
        }
        if let Some(at) = &self.declared_at {
            let _ = writeln!(
                out,
                "declared:     {at} (lifetimes capped at {}s)",
                self.window_seconds
            );
        }
        let _ = writeln!(out, "waiting for:  {}", self.waiting_for);
        if self.stage != Stage::Idle && self.stage != Stage::Done {
            let known = if self.complete {
                "every holder known"
            } else {
                "not every holder known: the stage ends at its latest end"
            };
            let _ = writeln!(out, "pending:      {} ({known})", self.pending);
            if self.late > 0 {
                let _ = writeln!(
                    out,
                    "late:         {} of them given the old bundle after the declaration (a replica took the stage late): waited for until they renew, even past the latest end",
                    self.late
                );
            }
            for holder in &self.pending_sample {
                let _ = writeln!(out, "              {holder}");
            }
            let _ = writeln!(
                out,
                "consumers:    {}",
                if self.consumers_converged {
                    "converged"
                } else {
                    "not yet holding this stage's bundle"
                }
            );
            for name in &self.lagging {
                let _ = writeln!(out, "              {name}");
            }
        }
        if self.stage != Stage::Idle && self.serving.total() > 0 {
            let s = &self.serving;
            let _ = writeln!(
                out,
                "agents:       {} reports of what they serve (summed over replicas): {} without the new roots, {} old and new, {} the new alone",
                s.total(),
                s.lacking,
                s.both,
                s.next_alone
            );
        }
        if let Some(end) = &self.expected_end {
            let _ = writeln!(out, "expected end: {end} at the latest");
        }
        if let Some(problem) = &self.problem {
            let _ = writeln!(out, "problem:      {problem}");
        }
        for (stage, at) in &self.history {
            let _ = writeln!(out, "history:      {at} {stage}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_names_stage_pending_holders_and_the_expected_end() {
        let s = Status {
            stage: Stage::Distribute,
            serving: Serving {
                lacking: 1,
                both: 3,
                next_alone: 0,
            },
            since: "2026-12-07T10:00:00Z".into(),
            to: Some("abcdef0123456789abcdef".into()),
            pending: 2,
            pending_sample: vec!["spiffe://td/ns/a/sa/b in pod a/p".into()],
            expected_end: Some("2026-12-07T22:00:00Z".into()),
            ..Status::default()
        };
        let text = s.text();
        assert!(text.contains("stage:        distribute"), "{text}");
        assert!(text.contains("pending:      2"), "{text}");
        assert!(text.contains("in pod a/p"), "{text}");
        assert!(
            text.contains(
                "agents:       4 reports of what they serve (summed over replicas): 1 without the new roots, 3 old and new"
            ),
            "{text}"
        );
        assert!(
            text.contains("expected end: 2026-12-07T22:00:00Z"),
            "{text}"
        );
        assert!(text.contains("to set:       abcdef0123456789\n"), "{text}");
        let back: Status = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
