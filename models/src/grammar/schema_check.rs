//! Which JSON Schema a request may constrain its output with, checked before the
//! schema reaches llguidance.
//!
//! llguidance enforces a set of keywords and refuses other known ones with a
//! message that quotes the schema. This walk visits every subschema, applies the
//! same rule (a known keyword outside llguidance's implemented and annotation
//! sets is refused), and reports the first problem by keyword and JSON pointer,
//! so a client learns what to change without its schema (which may hold PHI)
//! appearing in an error. It also checks the shape of the keywords it lets
//! through, so that most invalid schemas get a pointer too.
//!
//! Pointer segments are shown when they look like identifiers (at most 64 of
//! `[A-Za-z0-9_.$-]`); others — a property name may be a sentence — appear as `*`.
//!
//! Unknown keywords (not part of any JSON Schema draft, such as `x-order` or
//! OpenAPI's `discriminator`) carry no validation meaning and are ignored, as
//! JSON Schema requires — except llguidance's own `x-guidance`, which would let
//! a request switch its checks off, and is refused.

use serde_json::{Map, Value as Json};

use super::GrammarError;

/// The `format` values that are enforced (llguidance's built-in formats).
pub const SUPPORTED_FORMATS: &[&str] =
    &["date", "date-time", "time", "duration", "email", "hostname", "ipv4", "ipv6", "uuid", "uri"];

/// Keywords enforced (llguidance's implemented set; the tests check it against llguidance).
#[cfg(test)]
pub(super) const ENFORCED: &[&str] = &[
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "const",
    "enum",
    "type",
    "items",
    "additionalItems",
    "prefixItems",
    "minItems",
    "maxItems",
    "properties",
    "additionalProperties",
    "patternProperties",
    "required",
    "minProperties",
    "maxProperties",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
];

/// Annotations and structure, without validation meaning of their own (let
/// through as unknown keys are).
#[cfg(test)]
pub(super) const ANNOTATIONS: &[&str] = &[
    "$anchor",
    "$defs",
    "definitions",
    "$schema",
    "$id",
    "id",
    "$comment",
    "title",
    "description",
    "default",
    "readOnly",
    "writeOnly",
    "examples",
    "contentMediaType",
    "contentEncoding",
];

/// Annotations llguidance does not list: removed before compiling. (Like
/// `contentSchema`, an annotation that validators do not enforce either,
/// llguidance ignores the others.)
const STRIPPED_ANNOTATIONS: &[&str] = &["deprecated"];

/// Validation keywords of the JSON Schema drafts (4 to 2020-12) that are not
/// enforced: a schema using one is refused.
pub(super) const UNSUPPORTED: &[&str] = &[
    "not",
    "if",
    "then",
    "else",
    "dependentSchemas",
    "dependencies",
    "dependentRequired",
    "contains",
    "minContains",
    "maxContains",
    "propertyNames",
    "unevaluatedItems",
    "unevaluatedProperties",
    "uniqueItems",
    "$dynamicRef",
    "$dynamicAnchor",
    "$recursiveRef",
    "$recursiveAnchor",
    "x-guidance",
];

/// `$schema` URIs without scheme and trailing `#`.
const KNOWN_DRAFTS: &[&str] = &[
    "json-schema.org/draft-04/schema",
    "json-schema.org/draft-06/schema",
    "json-schema.org/draft-07/schema",
    "json-schema.org/draft/2019-09/schema",
    "json-schema.org/draft/2020-12/schema",
];

const TYPES: &[&str] = &["null", "boolean", "object", "array", "number", "string", "integer"];

/// Most nesting levels walked (a deeper schema is refused as too complex).
const MAX_DEPTH: usize = 64;

/// Checks `schema`; returns it ready for llguidance (stripped annotations removed).
pub fn check(mut schema: Json) -> Result<Json, GrammarError> {
    if schema == Json::Bool(false) {
        return Err(GrammarError::Unsatisfiable);
    }
    let mut path = Vec::new();
    walk(&mut schema, &mut path)?;
    Ok(schema)
}

fn pointer(path: &[String]) -> String {
    let mut p = String::from("#");
    for seg in path {
        p.push('/');
        let shown = seg.len() <= 64
            && !seg.is_empty()
            && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.$-".contains(&b));
        p.push_str(if shown { seg } else { "*" });
    }
    p
}

fn invalid(path: &[String], problem: &'static str) -> GrammarError {
    GrammarError::InvalidSchema { pointer: pointer(path), problem }
}

fn walk(schema: &mut Json, path: &mut Vec<String>) -> Result<(), GrammarError> {
    if path.len() > MAX_DEPTH {
        return Err(GrammarError::TooComplex);
    }
    let map = match schema {
        Json::Bool(_) => return Ok(()),
        Json::Object(map) => map,
        _ => return Err(invalid(path, "a schema must be an object or a boolean")),
    };
    for k in STRIPPED_ANNOTATIONS {
        map.remove(*k);
    }
    for (key, value) in map.iter() {
        if let Some(kw) = UNSUPPORTED.iter().find(|k| **k == key.as_str()) {
            // `uniqueItems: false` and an empty `dependentRequired` ask for nothing.
            let harmless = matches!((*kw, value), ("uniqueItems", Json::Bool(false)))
                || (*kw == "dependentRequired" && value.as_object().is_some_and(|m| m.is_empty()));
            if !harmless {
                return Err(GrammarError::UnsupportedKeyword { keyword: kw, pointer: pointer(path) });
            }
        }
    }
    map.remove("uniqueItems");
    map.remove("dependentRequired");
    check_shapes(map, path)?;
    replace_calendar_formats(map);
    // Subschemas.
    for key in ["properties", "patternProperties", "$defs", "definitions"] {
        if let Some(Json::Object(children)) = map.get_mut(key) {
            path.push(key.into());
            for (name, child) in children.iter_mut() {
                path.push(name.clone());
                walk(child, path)?;
                path.pop();
            }
            path.pop();
        }
    }
    for key in ["additionalProperties", "additionalItems"] {
        if let Some(child) = map.get_mut(key) {
            path.push(key.into());
            walk(child, path)?;
            path.pop();
        }
    }
    for key in ["anyOf", "oneOf", "allOf", "prefixItems", "items"] {
        match map.get_mut(key) {
            Some(Json::Array(children)) => {
                path.push(key.into());
                for (i, child) in children.iter_mut().enumerate() {
                    path.push(i.to_string());
                    walk(child, path)?;
                    path.pop();
                }
                path.pop();
            }
            Some(child) if key == "items" => {
                path.push(key.into());
                walk(child, path)?;
                path.pop();
            }
            _ => {}
        }
    }
    Ok(())
}

/// A year 0001–9999 (year 0 is not a valid date for most parsers).
const YEAR: &str = "(?:[1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])";
/// The leap years among them: divisible by 4, and by 400 when by 100.
const LEAP_YEAR: &str = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)";

/// A calendar date `YYYY-MM-DD` that exists (February 29 only in leap years).
fn date_regex() -> String {
    format!(
        "(?:{YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))|{LEAP_YEAR}-02-29)"
    )
}

/// RFC 3339 `date-time` whose date exists; seconds 00–59 (a leap second `60`,
/// which RFC 3339 allows, is refused by most date-time parsers).
fn date_time_regex() -> String {
    format!(
        "{}[Tt](?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]+)?(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])",
        date_regex()
    )
}

/// llguidance's `date` and `date-time` formats accept February 29 of every
/// year: they are replaced by an equivalent anchored `pattern` that knows leap
/// years (beside any `pattern` of the schema's own, through `allOf`).
fn replace_calendar_formats(map: &mut Map<String, Json>) {
    let rx = match map.get("format").and_then(Json::as_str) {
        Some("date") => date_regex(),
        Some("date-time") => date_time_regex(),
        _ => return,
    };
    map.remove("format");
    let pattern = Json::String(format!("^{rx}$"));
    if map.contains_key("pattern") {
        let extra = serde_json::json!({ "pattern": pattern });
        match map.get_mut("allOf") {
            Some(Json::Array(all)) => all.push(extra),
            _ => {
                map.insert("allOf".into(), Json::Array(vec![extra]));
            }
        }
    } else {
        map.insert("pattern".into(), pattern);
    }
}

/// The shapes of the enforced keywords' values.
fn check_shapes(map: &Map<String, Json>, path: &mut Vec<String>) -> Result<(), GrammarError> {
    let at = |path: &mut Vec<String>, key: &str, problem: &'static str| {
        path.push(key.into());
        let e = invalid(path, problem);
        path.pop();
        e
    };
    for (key, value) in map {
        let ok = match key.as_str() {
            "type" => match value {
                Json::String(t) => TYPES.contains(&t.as_str()),
                Json::Array(ts) => !ts.is_empty() && ts.iter().all(|t| t.as_str().is_some_and(|t| TYPES.contains(&t))),
                _ => false,
            },
            "properties" | "patternProperties" | "$defs" | "definitions" => value.is_object(),
            "additionalProperties" | "additionalItems" => value.is_object() || value.is_boolean(),
            "items" => value.is_object() || value.is_boolean() || value.is_array(),
            "prefixItems" => value.is_array(),
            "anyOf" | "oneOf" | "allOf" => value.as_array().is_some_and(|a| !a.is_empty()),
            "required" => value.as_array().is_some_and(|a| a.iter().all(Json::is_string)),
            "enum" => value.as_array().is_some_and(|a| !a.is_empty()),
            "minItems" | "maxItems" | "minLength" | "maxLength" | "minProperties" | "maxProperties" => {
                value.as_u64().is_some()
            }
            "minimum" | "maximum" => value.is_number(),
            // Draft 4's boolean form is not supported (it changes `minimum`'s meaning).
            "exclusiveMinimum" | "exclusiveMaximum" => value.is_number(),
            "multipleOf" => value.as_f64().is_some_and(|m| m > 0.0),
            "pattern" => match value.as_str() {
                Some(rx) => {
                    if regex_syntax::Parser::new().parse(rx).is_err() {
                        return Err(at(path, key, "`pattern` is not a valid regular expression"));
                    }
                    true
                }
                None => false,
            },
            "format" => match value.as_str() {
                Some(f) if SUPPORTED_FORMATS.contains(&f) => true,
                Some(_) => {
                    path.push(key.clone());
                    let e = GrammarError::UnsupportedFormat { pointer: pointer(path) };
                    path.pop();
                    return Err(e);
                }
                None => false,
            },
            // llguidance picks the draft from `$schema` and refuses one it does not know.
            "$schema" => match value.as_str() {
                Some(uri)
                    if KNOWN_DRAFTS.contains(
                        &uri.trim_end_matches('#').trim_start_matches("https://").trim_start_matches("http://"),
                    ) =>
                {
                    true
                }
                Some(_) => {
                    return Err(at(path, key, "`$schema` must name a JSON Schema draft (4, 6, 7, 2019-09 or 2020-12)"))
                }
                None => false,
            },
            "$ref" => match value.as_str() {
                Some(r) if r.starts_with('#') => true,
                Some(_) => {
                    return Err(at(path, key, "only references within the schema (`#…`) are supported"));
                }
                None => false,
            },
            _ => true,
        };
        if !ok {
            return Err(at(path, key, shape_problem(key)));
        }
    }
    Ok(())
}

fn shape_problem(key: &str) -> &'static str {
    match key {
        "type" => "`type` must be one of null, boolean, object, array, number, string, integer, or a list of them",
        "properties" | "patternProperties" | "$defs" | "definitions" => "must be an object of schemas",
        "additionalProperties" | "additionalItems" => "must be a schema or a boolean",
        "items" => "must be a schema or a list of schemas",
        "prefixItems" => "must be a list of schemas",
        "anyOf" | "oneOf" | "allOf" => "must be a non-empty list of schemas",
        "required" => "must be a list of property names",
        "enum" => "must be a non-empty list",
        "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum" => "must be a number",
        "multipleOf" => "must be a number greater than 0",
        "pattern" | "format" | "$ref" => "must be a string",
        _ => "must be a non-negative integer",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(schema: Json) -> GrammarError {
        check(schema).unwrap_err()
    }

    #[test]
    fn unsupported_keywords_are_named_with_their_pointer() {
        let e = err(json!({"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": true}}}));
        assert_eq!(e, GrammarError::UnsupportedKeyword { keyword: "uniqueItems", pointer: "#/properties/tags".into() });
        let e = err(json!({"anyOf": [{"type": "string"}, {"not": {"type": "null"}}]}));
        assert_eq!(e, GrammarError::UnsupportedKeyword { keyword: "not", pointer: "#/anyOf/1".into() });
        let e = err(json!({"$defs": {"n": {"if": {}, "then": {}}}}));
        assert!(matches!(e, GrammarError::UnsupportedKeyword { keyword: "if" | "then", .. }), "{e}");
        let e = err(json!({"x-guidance": {"lenient": true}, "type": "string"}));
        assert_eq!(e, GrammarError::UnsupportedKeyword { keyword: "x-guidance", pointer: "#".into() });
    }

    #[test]
    fn pointers_hide_segments_that_are_not_identifiers() {
        let e = err(json!({"properties": {"John Doe's MRN": {"type": "string", "format": "password"}}}));
        assert_eq!(e, GrammarError::UnsupportedFormat { pointer: "#/properties/*/format".into() });
        assert!(!e.to_string().contains("John") && !e.to_string().contains("password"), "{e}");
    }

    #[test]
    fn shapes_are_checked_with_pointers() {
        let e = err(json!({"type": "object", "properties": []}));
        assert_eq!(
            e,
            GrammarError::InvalidSchema { pointer: "#/properties".into(), problem: shape_problem("properties") }
        );
        assert!(matches!(err(json!({"type": 5})), GrammarError::InvalidSchema { .. }));
        assert!(matches!(err(json!({"type": "strin"})), GrammarError::InvalidSchema { .. }));
        assert!(matches!(err(json!({"enum": []})), GrammarError::InvalidSchema { .. }));
        assert!(matches!(err(json!({"pattern": "(unclosed"})), GrammarError::InvalidSchema { .. }));
        assert!(matches!(err(json!({"$ref": "https://example.org/s.json"})), GrammarError::InvalidSchema { .. }));
        assert!(matches!(err(json!(3)), GrammarError::InvalidSchema { .. }));
        assert_eq!(err(json!(false)), GrammarError::Unsatisfiable);
    }

    #[test]
    fn annotations_and_unknown_keys_pass_and_harmless_forms_are_dropped() {
        let s = check(json!({
            "title": "T", "description": "d", "deprecated": true, "x-order": 1, "discriminator": {"propertyName": "k"},
            "type": "array", "uniqueItems": false, "items": {"type": "string", "deprecated": false}
        }))
        .unwrap();
        assert!(s.get("deprecated").is_none() && s.get("uniqueItems").is_none());
        assert!(s["items"].get("deprecated").is_none());
        assert_eq!(s["x-order"], json!(1));
    }
}
