//! A small Swagger 2.0 checker over serde_json, for the spec tests: finds the operation of a
//! concrete request, checks a request's query and body against it, and validates a JSON value
//! against a schema with `$ref` resolution.
//!
//! Strict on purpose: an object may only have the properties its schema declares (Forgejo's
//! answers are generated from the same Go structs as its spec, so an extra field means the
//! emulator invented it). `null` is accepted where Go can produce it: for arrays (nil slices) and
//! for objects (nil pointers), and wherever the schema says `x-nullable`.

use serde_json::Value;

pub struct Spec {
    pub doc: Value,
}

/// The operation a request maps to.
pub struct Operation<'a> {
    pub template: String,
    pub op: &'a Value,
    /// Parameters declared on the path item (shared by its operations).
    pub path_params: Option<&'a Value>,
}

impl Spec {
    pub fn load(path: &str) -> Self {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        Self {
            doc: serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {path}: {e}")),
        }
    }

    /// The operation for `method` on `path` (relative to the base path, e.g. `/admin/users/x`).
    /// Among matching templates the one with the most literal segments wins
    /// (`…/runners/jobs` over `…/runners/{runner_id}`).
    pub fn operation(&self, method: &str, path: &str) -> Option<Operation<'_>> {
        let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
        let mut best: Option<(usize, &String, &Value)> = None;
        for (template, item) in self.doc["paths"].as_object()? {
            let tsegs: Vec<&str> = template.split('/').collect();
            if tsegs.len() != segs.len() {
                continue;
            }
            let mut literal = 0;
            let ok = tsegs.iter().zip(&segs).all(|(t, s)| {
                if t.starts_with('{') && t.ends_with('}') {
                    !s.is_empty()
                } else {
                    literal += 1;
                    t == s
                }
            });
            if ok && best.map_or(true, |(l, _, _)| literal > l) {
                best = Some((literal, template, item));
            }
        }
        let (_, template, item) = best?;
        let op = item.get(method.to_ascii_lowercase())?;
        Some(Operation {
            template: template.clone(),
            op,
            path_params: item.get("parameters"),
        })
    }

    fn params<'a>(&'a self, op: &Operation<'a>) -> Vec<&'a Value> {
        let mut v: Vec<&Value> = op.op["parameters"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        if let Some(Value::Array(p)) = op.path_params {
            v.extend(p.iter());
        }
        v.into_iter().map(|p| self.resolve(p)).collect()
    }

    /// Checks a request: the operation exists, every query key is a declared query parameter, and
    /// the body (if any) validates against the declared body schema.
    pub fn check_request(
        &self,
        method: &str,
        path: &str,
        query: &[String],
        body: Option<&Value>,
    ) -> Result<String, Vec<String>> {
        let Some(op) = self.operation(method, path) else {
            return Err(vec![format!(
                "{method} {path}: no such operation in the spec"
            )]);
        };
        let params = self.params(&op);
        let mut errors = Vec::new();
        for key in query {
            let declared = params
                .iter()
                .any(|p| p["in"] == "query" && p["name"] == key.as_str());
            if !declared {
                errors.push(format!(
                    "{method} {}: query parameter {key:?} is not declared",
                    op.template
                ));
            }
        }
        if let Some(body) = body {
            match params.iter().find(|p| p["in"] == "body") {
                None => errors.push(format!(
                    "{method} {}: sends a body but the spec declares none",
                    op.template
                )),
                Some(p) => {
                    if let Err(e) = self.validate(&p["schema"], body) {
                        errors.extend(
                            e.into_iter()
                                .map(|e| format!("{method} {} body: {e}", op.template)),
                        );
                    }
                }
            }
        }
        if errors.is_empty() {
            Ok(op.template)
        } else {
            Err(errors)
        }
    }

    /// The schema of the response `status` of an operation: `None` if the status is not declared,
    /// `Some(None)` if it is declared without a body.
    pub fn response_schema<'a>(
        &'a self,
        op: &Operation<'a>,
        status: u16,
    ) -> Option<Option<&'a Value>> {
        let r = op.op["responses"].get(status.to_string())?;
        let r = self.resolve(r);
        Some(r.get("schema"))
    }

    /// Follows `$ref`s (`#/definitions/X`, `#/responses/X`).
    pub fn resolve<'a>(&'a self, mut v: &'a Value) -> &'a Value {
        while let Some(r) = v.get("$ref").and_then(Value::as_str) {
            let mut cur = &self.doc;
            for part in r.trim_start_matches("#/").split('/') {
                cur = &cur[part];
            }
            assert!(!cur.is_null(), "unresolvable $ref {r}");
            v = cur;
        }
        v
    }

    /// Validates `value` against `schema`; the errors name the JSON path.
    pub fn validate(&self, schema: &Value, value: &Value) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        self.check(schema, value, "$", &mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    fn check(&self, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
        let schema = self.resolve(schema);
        let ty = schema.get("type").and_then(Value::as_str);
        let is_object =
            ty == Some("object") || (ty.is_none() && schema.get("properties").is_some());
        if value.is_null() {
            let nullable = schema
                .get("x-nullable")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            // Go writes nil slices and nil pointers as null; untyped fields take anything.
            let go_nullable = is_object || ty.is_none() || ty == Some("array");
            if !(nullable || go_nullable) {
                errors.push(format!(
                    "{at}: null where the spec wants {}",
                    ty.unwrap_or("a value")
                ));
            }
            return;
        }
        if is_object {
            let Some(obj) = value.as_object() else {
                errors.push(format!("{at}: expected an object, got {value}"));
                return;
            };
            let props = schema.get("properties").and_then(Value::as_object);
            for req in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let name = req.as_str().unwrap_or_default();
                if !obj.contains_key(name) {
                    errors.push(format!("{at}: required property {name:?} is missing"));
                }
            }
            for (k, v) in obj {
                match props.and_then(|p| p.get(k)) {
                    Some(s) => self.check(s, v, &format!("{at}.{k}"), errors),
                    None => match schema.get("additionalProperties") {
                        Some(Value::Bool(true)) => {}
                        Some(extra @ Value::Object(_)) => {
                            self.check(extra, v, &format!("{at}.{k}"), errors)
                        }
                        _ => errors.push(format!("{at}: property {k:?} is not in the schema")),
                    },
                }
            }
            return;
        }
        match ty {
            Some("array") => match value.as_array() {
                Some(items) => {
                    for (i, item) in items.iter().enumerate() {
                        self.check(&schema["items"], item, &format!("{at}[{i}]"), errors);
                    }
                }
                None => errors.push(format!("{at}: expected an array, got {value}")),
            },
            Some("string") => match value.as_str() {
                Some(s) => {
                    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
                        if !allowed.iter().any(|a| a == value) {
                            errors.push(format!(
                                "{at}: {s:?} is not one of {}",
                                Value::Array(allowed.clone())
                            ));
                        }
                    }
                    match schema.get("format").and_then(Value::as_str) {
                        Some("date-time") => {
                            let ok = time::OffsetDateTime::parse(
                                s,
                                &time::format_description::well_known::Rfc3339,
                            )
                            .is_ok();
                            if !ok {
                                errors.push(format!("{at}: {s:?} is not an RFC 3339 date-time"));
                            }
                        }
                        Some("email") if !s.contains('@') => {
                            errors.push(format!("{at}: {s:?} is not an e-mail address"))
                        }
                        _ => {}
                    }
                }
                None => errors.push(format!("{at}: expected a string, got {value}")),
            },
            Some("integer") if !(value.is_i64() || value.is_u64()) => {
                errors.push(format!("{at}: expected an integer, got {value}"));
            }
            Some("number") if !value.is_number() => {
                errors.push(format!("{at}: expected a number, got {value}"))
            }
            Some("boolean") if !value.is_boolean() => {
                errors.push(format!("{at}: expected a boolean, got {value}"))
            }
            Some("integer" | "number" | "boolean") => {}
            Some(other) => errors.push(format!("{at}: unsupported schema type {other}")),
            // No type: anything goes (e.g. `interface{}` fields).
            None => {}
        }
    }
}
