//! The opt-in certificate profile for client-certificate STS: a Subject common name
//! rendered from a template for chosen namespaces. MinIO's
//! `AssumeRoleWithCertificate` names the policy it grants by the client
//! certificate's CN (and refuses an empty one); the SPIFFE URI SAN, the key usages
//! and `clientAuth` stay as they are.

use std::collections::BTreeSet;

use spiffe::SpiffeId;

/// X.520's upper bound for a common name (`ub-common-name`).
pub const MAX_CN_LEN: usize = 64;

/// `--subject-cn-template` with `--subject-cn-namespaces`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectCn {
    parts: Vec<Part>,
    /// `None`: every namespace (`*`).
    namespaces: Option<BTreeSet<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Namespace,
    ServiceAccount,
    TrustDomain,
}

/// What a rendered name is not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CnError {
    #[error("the common name {0:?} is longer than 64 characters; it is left out")]
    TooLong(String),
}

impl SubjectCn {
    /// `template` holds text and `{ns}`, `{sa}`, `{td}`; `namespaces` names where it
    /// applies (`*`: everywhere). Refused: an unknown or unclosed placeholder,
    /// characters a CN must not carry, an empty template or namespace list.
    pub fn parse(template: &str, namespaces: &[String]) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = template;
        while !rest.is_empty() {
            match rest.find('{') {
                Some(0) => {
                    let end = rest
                        .find('}')
                        .ok_or_else(|| format!("{template:?}: an unclosed {{"))?;
                    parts.push(match &rest[..=end] {
                        "{ns}" => Part::Namespace,
                        "{sa}" => Part::ServiceAccount,
                        "{td}" => Part::TrustDomain,
                        other => {
                            return Err(format!(
                                "{template:?}: unknown placeholder {other} (use {{ns}}, {{sa}}, {{td}})"
                            ));
                        }
                    });
                    rest = &rest[end + 1..];
                }
                found => {
                    let end = found.unwrap_or(rest.len());
                    let text = &rest[..end];
                    if text.contains('}') {
                        return Err(format!("{template:?}: a }} without {{"));
                    }
                    if text.chars().any(|c| c.is_control() || is_invisible(c)) {
                        return Err(format!(
                            "{template:?}: control or invisible formatting characters"
                        ));
                    }
                    parts.push(Part::Text(text.to_owned()));
                    rest = &rest[end..];
                }
            }
        }
        if parts.is_empty() {
            return Err("the template is empty".into());
        }
        if template.trim() != template {
            return Err(format!("{template:?}: leading or trailing spaces"));
        }
        let fixed: usize = parts
            .iter()
            .map(|p| match p {
                Part::Text(t) => t.chars().count(),
                _ => 1,
            })
            .sum();
        if fixed > MAX_CN_LEN {
            return Err(format!(
                "{template:?}: longer than {MAX_CN_LEN} characters before any name is filled in"
            ));
        }
        let listed: Vec<&str> = namespaces
            .iter()
            .map(|n| n.trim())
            .filter(|n| !n.is_empty())
            .collect();
        let namespaces = match listed.as_slice() {
            [] => return Err("name the namespaces it applies to (`*` for all)".into()),
            ["*"] => None,
            names => {
                for n in names {
                    if *n == "*" {
                        return Err("`*` stands alone: all namespaces".into());
                    }
                    if !is_namespace(n) {
                        return Err(format!(
                            "{n:?} is not a namespace name (lowercase letters, digits and '-', at most 63)"
                        ));
                    }
                }
                Some(names.iter().map(|n| (*n).to_owned()).collect())
            }
        };
        unambiguous(
            &parts,
            namespaces
                .as_ref()
                .is_some_and(|n: &BTreeSet<String>| n.len() == 1),
        )
        .map_err(|e| format!("{template:?}: {e}"))?;
        Ok(Self { parts, namespaces })
    }

    /// The CN for a certificate naming `id`: `None` when its namespace is not among
    /// the chosen ones (or it is no `/ns/<ns>/sa/<sa>` identity).
    pub fn render(&self, id: &SpiffeId) -> Option<Result<String, CnError>> {
        let path = id.path().strip_prefix("/ns/")?;
        let (ns, sa) = path.split_once("/sa/")?;
        if let Some(only) = &self.namespaces
            && !only.contains(ns)
        {
            return None;
        }
        let cn: String = self
            .parts
            .iter()
            .map(|p| match p {
                Part::Text(t) => t.as_str(),
                Part::Namespace => ns,
                Part::ServiceAccount => sa,
                Part::TrustDomain => id.trust_domain_name(),
            })
            .collect();
        Some(if cn.chars().count() > MAX_CN_LEN {
            Err(CnError::TooLong(cn))
        } else {
            Ok(cn)
        })
    }
}

/// Two identities must never render the same name (MinIO grants a policy by it):
/// `{sa}` always; where more than one namespace applies, `{ns}` too, the first of
/// the two followed by a character that name cannot hold (`{ns}.{sa}`, `{sa}@{ns}`),
/// so each name can be read back out of the CN.
fn unambiguous(parts: &[Part], one_namespace: bool) -> Result<(), &'static str> {
    if !parts.contains(&Part::ServiceAccount) {
        return Err(
            "the template needs {sa}: without it several service accounts would share one name",
        );
    }
    if one_namespace {
        return Ok(());
    }
    if !parts.contains(&Part::Namespace) {
        return Err(
            "several namespaces apply: the template needs {ns} too, or accounts of the same name in two namespaces would share one CN",
        );
    }
    let first = parts
        .iter()
        .position(|p| matches!(p, Part::Namespace | Part::ServiceAccount));
    let separated = match first.map(|i| (&parts[i], parts.get(i + 1))) {
        Some((Part::Namespace, Some(Part::Text(t)))) => t
            .chars()
            .next()
            .is_some_and(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')),
        Some((Part::ServiceAccount, Some(Part::Text(t)))) => t.chars().next().is_some_and(|c| {
            !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        }),
        _ => false,
    };
    if separated {
        Ok(())
    } else {
        Err(
            "put a character the first name cannot hold between {ns} and {sa} (as in {ns}.{sa} or {sa}@{ns}), or two identities could render the same CN",
        )
    }
}

/// Invisible formatting characters (zero-width, bidirectional overrides, BOM) that
/// would make two CNs look alike.
fn is_invisible(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{FEFF}')
}

/// A Kubernetes namespace name: an RFC 1123 label.
fn is_namespace(n: &str) -> bool {
    let b = n.as_bytes();
    (1..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).unwrap()
    }

    #[test]
    fn renders_for_the_chosen_namespaces_only() {
        let cn = SubjectCn::parse("{ns}.{sa}", &["minio-users".into(), "etl".into()]).unwrap();
        let got = cn.render(&id("spiffe://cluster.local/ns/etl/sa/loader"));
        assert_eq!(got, Some(Ok("etl.loader".into())));
        assert_eq!(
            cn.render(&id("spiffe://cluster.local/ns/web/sa/front")),
            None
        );
        let all = SubjectCn::parse("svc:{sa}@{ns}.{td}", &["*".into()]).unwrap();
        let got = all.render(&id("spiffe://example.org/ns/web/sa/front"));
        assert_eq!(got, Some(Ok("svc:front@web.example.org".into())));
        // One namespace: {sa} alone names every identity apart.
        let one = SubjectCn::parse("{sa}", &["etl".into()]).unwrap();
        let got = one.render(&id("spiffe://cluster.local/ns/etl/sa/loader"));
        assert_eq!(got, Some(Ok("loader".into())));
        // Not an /ns/<ns>/sa/<sa> identity: nothing to fill in.
        assert_eq!(all.render(&id("spiffe://example.org/other")), None);
    }

    #[test]
    fn a_name_past_64_characters_is_left_out() {
        let cn = SubjectCn::parse("{sa}", &["n".into()]).unwrap();
        let long = "a".repeat(65);
        let got = cn.render(&id(&format!("spiffe://td/ns/n/sa/{long}")));
        assert_eq!(got, Some(Err(CnError::TooLong(long))));
        let exact = "b".repeat(64);
        let got = cn.render(&id(&format!("spiffe://td/ns/n/sa/{exact}")));
        assert_eq!(got, Some(Ok(exact)));
    }

    #[test]
    fn bad_templates_and_namespace_lists_are_refused() {
        let all = ["*".to_owned()];
        for (template, want) in [
            ("{name}", "unknown placeholder {name}"),
            ("{ns", "unclosed"),
            ("ns}", "without"),
            ("", "empty"),
            ("a\nb{sa}", "control"),
            ("{sa}\u{202e}", "invisible"),
            (" {sa}", "spaces"),
        ] {
            let err = SubjectCn::parse(template, &all).unwrap_err();
            assert!(err.contains(want), "{template:?}: {err}");
        }
        let err = SubjectCn::parse(&format!("{}{{sa}}", "x".repeat(65)), &all).unwrap_err();
        assert!(err.contains("longer than 64"), "{err}");
        let err = SubjectCn::parse("{sa}", &[]).unwrap_err();
        assert!(err.contains("name the namespaces"), "{err}");
        let err = SubjectCn::parse("{sa}", &["Bad_NS".into()]).unwrap_err();
        assert!(err.contains("Bad_NS"), "{err}");
        let err = SubjectCn::parse("{sa}", &["*".into(), "a".into()]).unwrap_err();
        assert!(err.contains("alone"), "{err}");
    }

    #[test]
    fn templates_that_could_give_two_identities_one_name_are_refused() {
        let two = ["a".to_owned(), "b".to_owned()];
        for (template, want) in [
            ("{ns}", "needs {sa}"),
            ("{sa}", "needs {ns} too"),
            // a-b/c and a/b-c would both be a-b-c.
            ("{ns}-{sa}", "cannot hold"),
            ("{ns}{sa}", "cannot hold"),
            // Service account names may hold dots.
            ("{sa}.{ns}", "cannot hold"),
        ] {
            let err = SubjectCn::parse(template, &two).unwrap_err();
            assert!(err.contains(want), "{template}: {err}");
        }
        for ok in ["{ns}.{sa}", "{sa}@{ns}", "x:{ns}/{sa}", "{ns}_{sa}"] {
            SubjectCn::parse(ok, &two).unwrap();
            SubjectCn::parse(ok, &["*".into()]).unwrap();
        }
    }
}
