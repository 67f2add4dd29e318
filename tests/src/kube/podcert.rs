//! What kube-apiserver checks of a PodCertificateRequest's status.

use axum::response::Response;
use serde_json::Value;

use super::routes::status_response;

/// What kube-apiserver checks of a PodCertificateRequest's new status (its
/// `ValidatePodCertificateRequestStatusUpdate`), so a signer whose answer the real
/// API server would refuse fails here too: exactly one condition of `Issued`,
/// `Denied` or `Failed` with status `True`, a well-formed reason and a transition
/// time; an issued answer carries a PEM chain whose leaf holds the request's key and
/// whose validity is `notBefore`/`notAfter` exactly, lives at least an hour and at most
/// `maxExpirationSeconds`, with `beginRefreshAt` at least 10 minutes inside it; a
/// refusal carries no chain and no times.
pub fn pod_certificate_status(spec: &Value, status: &Value) -> Result<(), String> {
    use time::{OffsetDateTime, format_description::well_known::Rfc3339};
    use x509_parser::prelude::FromDer;
    let conditions = status["conditions"].as_array().cloned().unwrap_or_default();
    let [condition] = conditions.as_slice() else {
        return Err(format!(
            "status.conditions: want exactly one condition, got {}",
            conditions.len()
        ));
    };
    let kind = condition["type"].as_str().unwrap_or("");
    if !["Issued", "Denied", "Failed"].contains(&kind) || condition["status"] != "True" {
        return Err(format!("status.conditions[0]: bad type/status {condition}"));
    }
    let reason = condition["reason"].as_str().unwrap_or("");
    let reason_ok = reason
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic())
        && reason
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_,:".contains(c))
        && !reason.ends_with([',', ':'])
        && reason.len() <= 1024;
    if !reason_ok {
        return Err(format!("status.conditions[0].reason: invalid {reason:?}"));
    }
    let when = |field: &str, v: &Value| {
        v.as_str()
            .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
            .ok_or_else(|| format!("{field}: Required value (RFC 3339)"))
    };
    when(
        "status.conditions[0].lastTransitionTime",
        &condition["lastTransitionTime"],
    )?;
    let chain = status["certificateChain"].as_str().unwrap_or("");
    if kind != "Issued" {
        for field in [
            "certificateChain",
            "notBefore",
            "notAfter",
            "beginRefreshAt",
        ] {
            if !status[field].is_null() && status[field] != "" {
                return Err(format!("status.{field}: Forbidden: only with Issued"));
            }
        }
        return Ok(());
    }
    let blocks = pem::parse_many(chain).map_err(|e| format!("status.certificateChain: {e}"))?;
    if blocks.is_empty() || blocks.iter().any(|b| b.tag() != "CERTIFICATE") {
        return Err("status.certificateChain: want one or more CERTIFICATE blocks".into());
    }
    for b in &blocks {
        x509_parser::parse_x509_certificate(b.contents())
            .map_err(|e| format!("status.certificateChain: unparsable certificate: {e}"))?;
    }
    let (_, leaf) = x509_parser::parse_x509_certificate(blocks[0].contents())
        .map_err(|e| format!("status.certificateChain: {e}"))?;
    let b64 = |v: &Value| {
        use base64::Engine;
        v.as_str()
            .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
    };
    let spki = if let Some(der) = b64(&spec["pkixPublicKey"]) {
        der
    } else {
        let der = b64(&spec["stubPKCS10Request"]).ok_or("spec has no key")?;
        let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
            .map_err(|e| format!("spec.stubPKCS10Request: {e}"))?;
        csr.certification_request_info.subject_pki.raw.to_vec()
    };
    if leaf.public_key().raw != spki.as_slice() {
        return Err(
            "status.certificateChain: leaf certificate does not contain the requested public key"
                .into(),
        );
    }
    let not_before = when("status.notBefore", &status["notBefore"])?;
    let not_after = when("status.notAfter", &status["notAfter"])?;
    let refresh = when("status.beginRefreshAt", &status["beginRefreshAt"])?;
    let leaf_nb = leaf.validity().not_before.timestamp();
    let leaf_na = leaf.validity().not_after.timestamp();
    if not_before.unix_timestamp() != leaf_nb || not_after.unix_timestamp() != leaf_na {
        return Err("status.notBefore/notAfter: must equal the leaf certificate's".into());
    }
    let lifetime = leaf_na - leaf_nb;
    let max = spec["maxExpirationSeconds"].as_i64().unwrap_or(86_400);
    if lifetime < 3600 || lifetime > max {
        return Err(format!(
            "status.certificateChain: leaf lifetime {lifetime}s must be in [3600, {max}]"
        ));
    }
    let ten = time::Duration::minutes(10);
    if refresh < not_before + ten || refresh > not_after - ten {
        return Err(
            "status.beginRefreshAt: must be at least 10 minutes after notBefore and before notAfter"
                .into(),
        );
    }
    Ok(())
}

/// Why a status update of a PodCertificateRequest is refused, if it is: an answered
/// request keeps its status, and a new one must pass [`pod_certificate_status`].
pub(super) fn status_update_refusal(current: &Value, status: &Value) -> Option<Response> {
    let answered = &current["status"];
    if (answered["certificateChain"].is_string() || answered["conditions"].is_array())
        && status != answered
    {
        return Some(status_response(
            422,
            "Invalid",
            "status: Forbidden: the request has already been answered",
        ));
    }
    pod_certificate_status(&current["spec"], status)
        .err()
        .map(|why| status_response(422, "Invalid", &why))
}
