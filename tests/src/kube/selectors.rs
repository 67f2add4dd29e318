//! Field selectors (`metadata.name`, `metadata.namespace`, `spec.signerName`) and
//! label selectors (`k=v`, `k!=v`, `k`, `!k`) of lists and watches.

use serde_json::Value;

/// Whether `object` passes the field and label selectors of a list or watch.
pub(super) fn selected(
    object: &Value,
    fields: Option<&str>,
    labels: Option<&str>,
) -> Result<bool, String> {
    for term in fields.unwrap_or("").split(',').filter(|t| !t.is_empty()) {
        let (key, want, equal) = if let Some((k, v)) = term.split_once("!=") {
            (k, v, false)
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            (k, v, true)
        } else {
            return Err(format!("field selector {term:?}"));
        };
        let have = match key {
            "metadata.name" => object["metadata"]["name"].as_str(),
            "metadata.namespace" => object["metadata"]["namespace"].as_str(),
            "spec.signerName" => object["spec"]["signerName"].as_str(),
            _ => return Err(format!("field label not supported: {key}")),
        }
        .unwrap_or("");
        if (have == want) != equal {
            return Ok(false);
        }
    }
    let object_labels = &object["metadata"]["labels"];
    for term in labels.unwrap_or("").split(',').filter(|t| !t.is_empty()) {
        let pass = if let Some((k, v)) = term.split_once("!=") {
            object_labels[k].as_str() != Some(v)
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            object_labels[k].as_str() == Some(v)
        } else if let Some(k) = term.strip_prefix('!') {
            object_labels.get(k).is_none()
        } else if term.contains([' ', '(', ')']) {
            return Err(format!("label selector {term:?}"));
        } else {
            object_labels.get(term).is_some()
        };
        if !pass {
            return Ok(false);
        }
    }
    Ok(true)
}
