//! The OpenAPI document of the API (`src/openapi.json`), and the copy `/openapi.json` serves:
//! `container_type` narrowed to the kinds `--container-types` enables, so that generated
//! clients and tests offer only those.
//!
//! Below `http` and `service`: the HTTP layer serves it and checks it against its routes; it
//! knows nothing of either.

use crate::env::Kind;
use serde_json::Value;

/// The document as written (checked against the routes by a test in `http.rs`).
pub const OPENAPI: &str = include_str!("openapi.json");

/// The document with `container_type`'s `enum` set to `enabled` and its `default` to
/// `default`; the document as written when every kind is enabled (`None`).
pub fn narrowed(enabled: Option<&[Kind]>, default: Kind) -> String {
    let Some(enabled) = enabled else {
        return OPENAPI.to_string();
    };
    let Ok(mut doc) = serde_json::from_str::<Value>(OPENAPI) else {
        return OPENAPI.to_string();
    };
    let names: Vec<Value> = enabled
        .iter()
        .map(|kind| Value::from(kind.name()))
        .collect();
    let default = Value::from(default.name());
    for schema in ["EnvironmentConfig", "StartRequest"] {
        if let Some(field) = doc
            .pointer_mut(&format!(
                "/components/schemas/{schema}/properties/container_type"
            ))
            .and_then(Value::as_object_mut)
        {
            field.insert("enum".into(), Value::Array(names.clone()));
            field.insert("default".into(), default.clone());
        }
    }
    doc.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_enabled_serves_the_document_as_written() {
        assert_eq!(narrowed(None, Kind::Docker), OPENAPI);
    }

    #[test]
    fn container_type_is_narrowed_in_both_schemas() {
        let doc: Value = serde_json::from_str(&narrowed(
            Some(&[Kind::Local, Kind::Bubblewrap]),
            Kind::Local,
        ))
        .unwrap();
        for schema in ["EnvironmentConfig", "StartRequest"] {
            let field = &doc["components"]["schemas"][schema]["properties"]["container_type"];
            assert_eq!(
                field["enum"],
                serde_json::json!(["local", "bubblewrap"]),
                "{schema}"
            );
            assert_eq!(field["default"], "local", "{schema}");
        }
    }
}
