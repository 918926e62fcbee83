//! `GET /docs`: the API reference as one self-contained HTML page, rendered here from
//! the OpenAPI document ([`super::openapi::document`]) so that it never drifts from
//! it. It loads nothing: no script, no stylesheet, no font, no image from anywhere
//! (the CSS is inline; there is no JavaScript), so it works on a machine without
//! network and leaks no visit to a CDN. Everything taken from the document is
//! HTML-escaped.
//!
//! Layout: the API's description and the error shape, authentication, then the
//! operations grouped by tag (method, path, summary, parameters, request body,
//! responses), then every schema with its properties; `$ref`s are links.

use std::fmt::Write;
use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

/// Methods in the order an operation list shows them.
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// `GET /docs`: the page, rendered once per process (the document is fixed at build).
pub async fn serve() -> Response {
    static PAGE: OnceLock<String> = OnceLock::new();
    let page = PAGE.get_or_init(|| render(&super::openapi::document()));
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Nothing to load, so nothing is allowed: a stray reference fails closed.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'",
            ),
        ],
        page.as_str(),
    )
        .into_response()
}

/// HTML-escape `s` (text and attribute values).
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The anchor of an operation: `op-<operationId>`, else its method and path.
fn op_anchor(method: &str, path: &str, op: &Value) -> String {
    match op["operationId"].as_str() {
        Some(id) => format!("op-{id}"),
        None => format!("op-{method}-{path}")
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect(),
    }
}

/// `#/components/schemas/X` -> `X`.
fn ref_name(r: &str) -> &str {
    r.rsplit('/').next().unwrap_or(r)
}

/// A short type of `schema`: `string`, `integer (int64)`, a link to a schema,
/// `array of …`, `map of …`, `a | b`.
fn type_of(schema: &Value) -> String {
    if let Some(r) = schema["$ref"].as_str() {
        let n = esc(ref_name(r));
        return format!("<a href=\"#schema-{n}\">{n}</a>");
    }
    for key in ["oneOf", "anyOf", "allOf"] {
        if let Some(alts) = schema[key].as_array() {
            let parts: Vec<String> = alts.iter().map(type_of).collect();
            let sep = if key == "allOf" { " &amp; " } else { " | " };
            return parts.join(sep);
        }
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let nullable = types.contains(&"null");
    let mut parts: Vec<String> = Vec::new();
    for t in types.iter().filter(|t| **t != "null") {
        let part = match *t {
            "array" => format!("array of {}", type_of(&schema["items"])),
            "object" if schema["additionalProperties"].is_object() => {
                format!("map of {}", type_of(&schema["additionalProperties"]))
            }
            t => match schema["format"].as_str() {
                Some(f) => format!("{} ({})", esc(t), esc(f)),
                None => esc(t),
            },
        };
        parts.push(part);
    }
    let mut s = if parts.is_empty() {
        "any".to_owned()
    } else {
        parts.join(" | ")
    };
    if nullable {
        s.push_str(", optional");
    }
    s
}

/// The constraints of `schema` a caller must meet, in words.
fn constraints(schema: &Value) -> String {
    let mut c: Vec<String> = Vec::new();
    let num = |k: &str| schema.get(k).filter(|v| !v.is_null()).map(Value::to_string);
    if let Some(v) = num("minimum") {
        c.push(format!("min {v}"));
    }
    if let Some(v) = num("maximum") {
        c.push(format!("max {v}"));
    }
    if let Some(v) = num("minLength") {
        c.push(format!("min length {v}"));
    }
    if let Some(v) = num("maxLength") {
        c.push(format!("max length {v}"));
    }
    if let Some(v) = num("minItems") {
        c.push(format!("min items {v}"));
    }
    if let Some(v) = num("maxItems") {
        c.push(format!("max items {v}"));
    }
    if let Some(v) = num("maxProperties") {
        c.push(format!("max entries {v}"));
    }
    if let Some(p) = schema["pattern"].as_str() {
        c.push(format!("pattern <code>{}</code>", esc(p)));
    }
    if let Some(p) = schema["propertyNames"]["pattern"].as_str() {
        c.push(format!("keys match <code>{}</code>", esc(p)));
    }
    if let Some(e) = schema["enum"].as_array() {
        let vals: Vec<String> = e.iter().map(|v| esc(&v.to_string())).collect();
        c.push(format!("one of {}", vals.join(", ")));
    }
    if let Some(d) = schema.get("default").filter(|v| !v.is_null()) {
        c.push(format!("default <code>{}</code>", esc(&d.to_string())));
    }
    c.join("; ")
}

/// `text` as paragraphs (blank lines split them; other newlines are spaces).
fn prose(text: &str) -> String {
    text.split("\n\n")
        .filter(|p| !p.trim().is_empty())
        .map(|p| format!("<p>{}</p>", esc(&p.replace('\n', " "))))
        .collect()
}

/// A table of `schema`'s properties (object schemas), or its type.
fn properties_table(out: &mut String, schema: &Value) {
    let Some(props) = schema["properties"].as_object() else {
        let _ = write!(out, "<p>Type: {}</p>", type_of(schema));
        return;
    };
    let required: Vec<&str> = schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    out.push_str(
        "<table><tr><th>field</th><th>type</th><th>required</th><th>rules</th><th>description</th></tr>",
    );
    for (name, p) in props {
        let _ = write!(
            out,
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(name),
            type_of(p),
            if required.contains(&name.as_str()) {
                "yes"
            } else {
                "no"
            },
            constraints(p),
            esc(p["description"].as_str().unwrap_or("")),
        );
    }
    out.push_str("</table>");
}

/// The schema of a body's first content type, as a link or a type, with the type.
fn content(c: &Value) -> String {
    let Some(map) = c.as_object() else {
        return String::new();
    };
    map.iter()
        .map(|(ctype, v)| {
            let schema = &v["schema"];
            let t = if schema.is_null() {
                String::new()
            } else {
                format!(": {}", type_of(schema))
            };
            format!("<code>{}</code>{t}", esc(ctype))
        })
        .collect::<Vec<_>>()
        .join("<br>")
}

fn operation(out: &mut String, doc: &Value, method: &str, path: &str, op: &Value) {
    let anchor = op_anchor(method, path, op);
    let _ = write!(
        out,
        "<section class=\"op\" id=\"{}\"><h3><span class=\"m {m}\">{M}</span> <code>{}</code></h3>",
        esc(&anchor),
        esc(path),
        m = esc(method),
        M = esc(&method.to_uppercase()),
    );
    if let Some(s) = op["summary"].as_str() {
        let _ = write!(out, "<p class=\"summary\">{}</p>", esc(s));
    }
    if let Some(d) = op["description"].as_str() {
        out.push_str(&prose(d));
    }
    if op.get("security").is_some() {
        out.push_str("<p class=\"auth\">Needs an API key.</p>");
    } else {
        out.push_str("<p class=\"auth\">No API key needed.</p>");
    }
    if let Some(params) = op["parameters"].as_array().filter(|p| !p.is_empty()) {
        out.push_str(
            "<h4>Parameters</h4><table><tr><th>name</th><th>in</th><th>type</th><th>required</th><th>rules</th><th>description</th></tr>",
        );
        for p in params {
            let _ = write!(
                out,
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(p["name"].as_str().unwrap_or("")),
                esc(p["in"].as_str().unwrap_or("")),
                type_of(&p["schema"]),
                if p["required"] == true { "yes" } else { "no" },
                constraints(&p["schema"]),
                esc(p["description"].as_str().unwrap_or("")),
            );
        }
        out.push_str("</table>");
    }
    if let Some(body) = op.get("requestBody") {
        let _ = write!(
            out,
            "<h4>Request body{}</h4><p>{}</p>",
            if body["required"] == true {
                ""
            } else {
                " (optional)"
            },
            content(&body["content"])
        );
        if let Some(d) = body["description"].as_str() {
            out.push_str(&prose(d));
        }
        // The fields of a JSON body, here, so that a reader need not follow the link.
        let schema = body
            .pointer("/content/application~1json/schema/$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix('#'))
            .and_then(|r| doc.pointer(r));
        if let Some(schema) = schema {
            properties_table(out, schema);
        }
    }
    if let Some(resp) = op["responses"].as_object() {
        out.push_str(
            "<h4>Responses</h4><table><tr><th>status</th><th>body</th><th>meaning</th></tr>",
        );
        for (status, r) in resp {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(status),
                content(&r["content"]),
                esc(r["description"].as_str().unwrap_or("")),
            );
        }
        out.push_str("</table>");
    }
    out.push_str("</section>");
}

const STYLE: &str = "body{font:15px/1.5 system-ui,sans-serif;margin:0;color:#1d1d1f;background:#fff}\
main{max-width:1100px;margin:0 auto;padding:1rem 2rem 4rem}\
nav{columns:3 18rem;font-size:14px}nav ul{margin:.2rem 0 .8rem;padding-left:1rem}\
h2{border-bottom:2px solid #ddd;margin-top:2.5rem}h3{margin:0 0 .4rem}\
.op{border:1px solid #ddd;border-radius:6px;padding:.8rem 1rem;margin:1rem 0}\
.m{display:inline-block;min-width:4.2em;text-align:center;border-radius:4px;color:#fff;font-size:13px;padding:1px 6px}\
.get{background:#2f7d32}.post{background:#1565c0}.put{background:#6a1b9a}.patch{background:#8d6e00}.delete{background:#b71c1c}\
table{border-collapse:collapse;width:100%;font-size:14px;margin:.3rem 0}\
th,td{border:1px solid #e2e2e2;padding:3px 6px;text-align:left;vertical-align:top}th{background:#f6f6f6}\
code{font-family:ui-monospace,monospace;font-size:13px}.summary{font-weight:600}.auth{color:#555;font-size:13px}\
pre{background:#f6f6f6;padding:.6rem;overflow:auto}";

/// The whole page for the OpenAPI document `doc`.
pub fn render(doc: &Value) -> String {
    let info = &doc["info"];
    let title = info["title"].as_str().unwrap_or("API");
    let version = info["version"].as_str().unwrap_or("");
    let mut out = String::with_capacity(256 * 1024);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{t} API {v}</title><style>{STYLE}</style></head><body><main>\
         <h1>{t} API <small>{v}</small></h1>",
        t = esc(title),
        v = esc(version),
    );
    if let Some(d) = info["description"].as_str() {
        out.push_str(&prose(d));
    }
    out.push_str(
        "<p>The machine-readable document is <a href=\"/openapi.json\">/openapi.json</a> \
         (also at <a href=\"/v1/openapi.json\">/v1/openapi.json</a>).</p>",
    );

    // Operations by tag, in the order of the document's tag list, then any others.
    let mut tags: Vec<(String, String)> = doc["tags"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .filter_map(|t| {
                    Some((
                        t["name"].as_str()?.to_owned(),
                        t["description"].as_str().unwrap_or("").to_owned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut ops: Vec<(String, &str, &str, &Value)> = Vec::new();
    if let Some(paths) = doc["paths"].as_object() {
        for (path, item) in paths {
            for method in METHODS {
                if let Some(op) = item.get(method) {
                    let tag = op["tags"][0].as_str().unwrap_or("other").to_owned();
                    if !tags.iter().any(|(t, _)| *t == tag) {
                        tags.push((tag.clone(), String::new()));
                    }
                    ops.push((tag, method, path.as_str(), op));
                }
            }
        }
    }

    out.push_str("<h2 id=\"contents\">Contents</h2><nav><strong><a href=\"#errors\">Errors</a> · <a href=\"#auth\">Authentication</a> · <a href=\"#schemas\">Schemas</a></strong>");
    for (tag, _) in &tags {
        let _ = write!(
            out,
            "<div><strong><a href=\"#tag-{t}\">{t}</a></strong><ul>",
            t = esc(tag)
        );
        for (_, method, path, op) in ops.iter().filter(|o| o.0 == *tag) {
            let _ = write!(
                out,
                "<li><a href=\"#{}\">{} {}</a></li>",
                esc(&op_anchor(method, path, op)),
                esc(&method.to_uppercase()),
                esc(path)
            );
        }
        out.push_str("</ul></div>");
    }
    out.push_str("</nav>");

    out.push_str(
        "<h2 id=\"errors\">Errors</h2><p>Every failed request answers with a 4xx or 5xx \
         status and this body (schema <a href=\"#schema-ErrorBody\">ErrorBody</a>):</p>\
         <pre>{\"error\": {\"code\": \"invalid_argument\", \"message\": \"timeout_s must be between 1 and 86400, got 0\"}}</pre>",
    );
    if let Some(codes) = doc
        .pointer("/components/schemas/ErrorDetail/properties/code/description")
        .and_then(Value::as_str)
    {
        let _ = write!(out, "<p>Codes: {}</p>", esc(&codes.replace('\n', " ")));
    }

    out.push_str("<h2 id=\"auth\">Authentication</h2>");
    if let Some(schemes) = doc
        .pointer("/components/securitySchemes")
        .and_then(Value::as_object)
    {
        out.push_str("<ul>");
        for (name, s) in schemes {
            let how = match (s["type"].as_str(), s["scheme"].as_str(), s["name"].as_str()) {
                (Some("http"), Some(scheme), _) => {
                    format!(
                        "<code>Authorization: {} &lt;key&gt;</code>",
                        esc(&capitalize(scheme))
                    )
                }
                (Some("apiKey"), _, Some(header)) => {
                    format!("<code>{}: &lt;key&gt;</code>", esc(header))
                }
                _ => esc(&s.to_string()),
            };
            let _ = write!(out, "<li><code>{}</code>: {how}</li>", esc(name));
        }
        out.push_str("</ul><p>Operations marked “Needs an API key” take either.</p>");
    }

    for (tag, description) in &tags {
        let _ = write!(out, "<h2 id=\"tag-{t}\">{t}</h2>", t = esc(tag));
        if !description.is_empty() {
            out.push_str(&prose(description));
        }
        for (_, method, path, op) in ops.iter().filter(|o| o.0 == *tag) {
            operation(&mut out, doc, method, path, op);
        }
    }

    out.push_str("<h2 id=\"schemas\">Schemas</h2>");
    if let Some(schemas) = doc
        .pointer("/components/schemas")
        .and_then(Value::as_object)
    {
        for (name, s) in schemas {
            let _ = write!(
                out,
                "<section class=\"op\" id=\"schema-{n}\"><h3>{n}</h3>",
                n = esc(name)
            );
            if let Some(d) = s["description"].as_str() {
                out.push_str(&prose(d));
            }
            properties_table(&mut out, s);
            if let Some(ex) = s.get("example") {
                let pretty = serde_json::to_string_pretty(ex).unwrap_or_default();
                let _ = write!(out, "<p>Example:</p><pre>{}</pre>", esc(&pretty));
            }
            out.push_str("</section>");
        }
    }
    out.push_str("</main></body></html>\n");
    out
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_from_the_document_is_escaped() {
        let doc = json!({
            "info": {"title": "<script>x</script>", "version": "1"},
            "paths": {"/a/{id}": {"get": {"operationId": "a", "summary": "\"><img src=x>",
                "responses": {"200": {"description": "<b>"}}}}},
        });
        let page = render(&doc);
        assert!(!page.contains("<script>"), "{page}");
        assert!(!page.contains("<img"), "{page}");
        assert!(page.contains("&lt;script&gt;x&lt;/script&gt;"));
        assert!(page.contains("id=\"op-a\""));
    }

    #[test]
    fn types_read_as_words() {
        assert_eq!(
            type_of(&json!({"type": ["string", "null"]})),
            "string, optional"
        );
        assert_eq!(
            type_of(&json!({"type": "array", "items": {"$ref": "#/components/schemas/X"}})),
            "array of <a href=\"#schema-X\">X</a>"
        );
        assert_eq!(
            type_of(&json!({"type": "integer", "format": "int64"})),
            "integer (int64)"
        );
        assert_eq!(
            constraints(&json!({"minimum": 1, "maximum": 5, "default": 2})),
            "min 1; max 5; default <code>2</code>"
        );
    }
}
