//! A strict little parser for the OpenMetrics / Prometheus text format, so tests check that a
//! `/metrics` answer is well-formed (not merely that it contains some string) and read its values.

use std::collections::BTreeMap;

/// One parsed exposition: metric families by name, and every sample by its series
/// (`name{a="x",b="y"}`, labels in the order given).
#[derive(Debug, Default)]
pub struct Exposition {
    /// Family name → type (`counter`, `gauge`, `histogram`, …).
    pub types: BTreeMap<String, String>,
    pub samples: BTreeMap<String, f64>,
}

impl Exposition {
    /// The value of one series; panics with the exposition's series names if it is missing.
    pub fn get(&self, series: &str) -> f64 {
        *self.samples.get(series).unwrap_or_else(|| {
            panic!(
                "no series {series}; have:\n{}",
                self.samples.keys().cloned().collect::<Vec<_>>().join("\n")
            )
        })
    }

    /// The sum over every series of metric `name` (whatever its labels).
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(k, _)| *k == name || k.starts_with(&format!("{name}{{")))
            .map(|(_, v)| v)
            .sum()
    }
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().map_err(|e| format!("bad value {s:?}: {e}")),
    }
}

/// `(name, value)` pairs in the order given.
type Labels = Vec<(String, String)>;

/// Parses `{a="x",b="y"}` at the start of `s`; returns the labels and the rest.
fn parse_labels(s: &str) -> Result<(Labels, &str), String> {
    let mut rest = s.strip_prefix('{').ok_or("expected {")?;
    let mut labels = Vec::new();
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("label without =")?;
        let name = &rest[..eq];
        if !is_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, '\\')) => value.push('\\'),
                    other => return Err(format!("bad escape {other:?}")),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => return Err("unterminated label value".into()),
            }
        };
        labels.push((name.to_owned(), value));
        rest = &rest[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// The family a sample name belongs to, given the declared families.
fn family_of<'a>(sample: &str, types: &'a BTreeMap<String, String>) -> Option<&'a str> {
    if let Some((k, _)) = types.get_key_value(sample) {
        return Some(k);
    }
    for suffix in ["_total", "_bucket", "_sum", "_count", "_created", "_info"] {
        if let Some(base) = sample.strip_suffix(suffix) {
            if let Some((k, _)) = types.get_key_value(base) {
                return Some(k);
            }
        }
    }
    None
}

/// Parses and validates `text`: every line is a `# TYPE`/`# HELP`/`# UNIT` comment, a sample of a
/// declared family with a valid name, labels and value, or the final `# EOF` (required when
/// `openmetrics`); histogram buckets are cumulative and their `+Inf` bucket equals `_count`.
pub fn parse(text: &str, openmetrics: bool) -> Result<Exposition, String> {
    let mut e = Exposition::default();
    let mut saw_eof = false;
    for (n, line) in text.lines().enumerate() {
        let err = |m: String| format!("line {}: {m}: {line:?}", n + 1);
        if saw_eof {
            return Err(err("content after # EOF".into()));
        }
        if line == "# EOF" {
            saw_eof = true;
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            let kind = parts.next().unwrap_or_default();
            let name = parts.next().unwrap_or_default();
            if !is_name(name) {
                return Err(err(format!("bad metric name {name:?}")));
            }
            match kind {
                "TYPE" => {
                    let t = parts.next().unwrap_or_default();
                    let known = [
                        "counter",
                        "gauge",
                        "histogram",
                        "summary",
                        "info",
                        "stateset",
                        "unknown",
                        "gaugehistogram",
                        "untyped",
                    ];
                    if !known.contains(&t) {
                        return Err(err(format!("unknown type {t:?}")));
                    }
                    if e.types.insert(name.to_owned(), t.to_owned()).is_some() {
                        return Err(err("family declared twice".into()));
                    }
                }
                "HELP" | "UNIT" => {}
                _ => return Err(err(format!("unknown comment {kind:?}"))),
            }
            continue;
        }
        if line.is_empty() && !openmetrics {
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| err("sample without value".into()))?;
        let name = &line[..name_end];
        if !is_name(name) {
            return Err(err(format!("bad sample name {name:?}")));
        }
        if family_of(name, &e.types).is_none() {
            return Err(err(format!("sample {name} of an undeclared family")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(err)?
        } else {
            (Vec::new(), &line[name_end..])
        };
        let mut fields = rest
            .strip_prefix(' ')
            .ok_or_else(|| err("no space before the value".into()))?
            .split(' ');
        let value = parse_value(fields.next().unwrap_or_default()).map_err(err)?;
        if let Some(ts) = fields.next() {
            parse_value(ts).map_err(err)?;
        }
        if fields.next().is_some() {
            return Err(err("trailing fields".into()));
        }
        let series = if labels.is_empty() {
            name.to_owned()
        } else {
            let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            format!("{name}{{{}}}", l.join(","))
        };
        if e.samples.insert(series, value).is_some() {
            return Err(err("duplicate series".into()));
        }
    }
    if openmetrics && !saw_eof {
        return Err("no # EOF at the end".into());
    }
    check_histograms(&e)?;
    Ok(e)
}

fn check_histograms(e: &Exposition) -> Result<(), String> {
    for (family, t) in &e.types {
        if t != "histogram" {
            continue;
        }
        // Group the buckets by their other labels.
        let mut groups: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for (series, v) in &e.samples {
            let Some(labels) = series
                .strip_prefix(&format!("{family}_bucket{{"))
                .and_then(|s| s.strip_suffix('}'))
            else {
                continue;
            };
            let mut le = None;
            let mut others = Vec::new();
            for part in labels.split(',') {
                match part.strip_prefix("le=\"").and_then(|s| s.strip_suffix('"')) {
                    Some(b) => le = Some(parse_value(b)?),
                    None => others.push(part),
                }
            }
            let le = le.ok_or_else(|| format!("{series}: bucket without le"))?;
            groups.entry(others.join(",")).or_default().push((le, *v));
        }
        for (others, mut buckets) in groups {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            if buckets.windows(2).any(|w| w[1].1 < w[0].1) {
                return Err(format!("{family}{{{others}}}: buckets not cumulative"));
            }
            let (le, inf) = *buckets.last().unwrap();
            if le != f64::INFINITY {
                return Err(format!("{family}{{{others}}}: no +Inf bucket"));
            }
            let count_key = if others.is_empty() {
                format!("{family}_count")
            } else {
                format!("{family}_count{{{others}}}")
            };
            let count = e
                .samples
                .get(&count_key)
                .ok_or_else(|| format!("{count_key} missing"))?;
            if *count != inf {
                return Err(format!(
                    "{count_key} = {count} but the +Inf bucket is {inf}"
                ));
            }
        }
    }
    Ok(())
}
