//! Where something is in a TOML file: the line and column of a byte offset, the key path at an
//! offset (what a parse or type error's span points into), and the span of a key path (what a
//! validation error names). Both config files (`datasets.toml`, the trainer's `train.toml`) use
//! it so that every error names the file, the line and the key. Spans come from `toml_edit`'s
//! parser (the one `toml` itself uses); nothing is parsed by hand.

use std::ops::Range;

use toml_edit::{ImDocument, Item, Key, TableLike, Value};

/// 1-based line and column (in characters) of byte `offset` of `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// One key of a document: its dotted path (`sources[2].template`), the key's span and the whole
/// entry's span (key through value, or a table's header through its last key).
#[derive(Debug, Clone)]
struct Entry {
    path: String,
    key: Range<usize>,
    whole: Range<usize>,
}

/// Every key of `text` (empty when it does not parse).
fn entries(text: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    if let Ok(doc) = ImDocument::parse(text) {
        walk(doc.as_table(), "", &mut out);
    }
    out
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

fn span_of(key: &Key, item: &Item) -> Option<(Range<usize>, Range<usize>)> {
    let k = key.span().or_else(|| item.span())?;
    let end = item.span().map_or(k.end, |v| v.end.max(k.end));
    Some((k.clone(), k.start..end))
}

fn walk(table: &dyn TableLike, prefix: &str, out: &mut Vec<Entry>) {
    for (name, _) in table.iter() {
        let Some((key, item)) = table.get_key_value(name) else {
            continue;
        };
        let path = join(prefix, name);
        match item {
            Item::Table(t) => {
                let header = t.span().or_else(|| key.span());
                if let Some(h) = header {
                    out.push(Entry {
                        path: path.clone(),
                        key: h.clone(),
                        whole: h,
                    });
                }
                walk(t, &path, out);
            }
            Item::ArrayOfTables(a) => {
                for (i, t) in a.iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    if let Some(h) = t.span() {
                        out.push(Entry {
                            path: p.clone(),
                            key: h.clone(),
                            whole: h,
                        });
                    }
                    walk(t, &p, out);
                }
            }
            Item::Value(v) => {
                if let Some((k, whole)) = span_of(key, item) {
                    out.push(Entry {
                        path: path.clone(),
                        key: k,
                        whole,
                    });
                }
                value(v, &path, out);
            }
            Item::None => {}
        }
    }
}

fn value(v: &Value, path: &str, out: &mut Vec<Entry>) {
    match v {
        Value::InlineTable(t) => walk(t, path, out),
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                let p = format!("{path}[{i}]");
                if let Some(s) = x.span() {
                    out.push(Entry {
                        path: p.clone(),
                        key: s.clone(),
                        whole: s,
                    });
                }
                value(x, &p, out);
            }
        }
        _ => {}
    }
}

/// The byte span of key `path` (`a.b`, `sources[2].template`) in `text`, if it is there.
pub fn key_span(text: &str, path: &str) -> Option<Range<usize>> {
    entries(text)
        .into_iter()
        .find(|e| e.path == path)
        .map(|e| e.key)
}

/// The innermost key whose entry (key through value) holds byte `offset`.
pub fn key_at(text: &str, offset: usize) -> Option<String> {
    entries(text)
        .into_iter()
        .filter(|e| e.whole.contains(&offset) || e.whole.start == offset)
        .min_by_key(|e| e.whole.len())
        .map(|e| e.path)
}

/// The known key closest to a misspelt `unknown` (edit distance at most 3, or one contains the
/// other), for a "did you mean" hint.
pub fn closest<'a>(unknown: &str, known: &[&'a str]) -> Option<&'a str> {
    let u = unknown.to_ascii_lowercase();
    known
        .iter()
        .map(|k| (edit_distance(&u, k), *k))
        .filter(|(d, k)| *d <= 3.min(k.len().max(u.len()) / 2) || k.contains(&*u))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The name between the first pair of backticks of a serde message (`unknown field `lr2``).
pub fn backticked(message: &str) -> Option<&str> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(&message[start..start + len])
}

/// An error chain as lines, each cause once: a cause whose text an earlier line already holds
/// (an I/O error that its wrapper printed as `path: error`) is left out.
pub fn error_report(err: &(dyn std::error::Error + 'static)) -> String {
    let mut lines: Vec<String> = Vec::new();
    let mut cur = Some(err);
    while let Some(e) = cur {
        let text = e.to_string();
        if !lines.iter().any(|l| l.contains(text.trim())) {
            lines.push(text);
        }
        cur = e.source();
    }
    let mut out = format!("error: {}", lines.first().map_or("", |s| s.as_str()));
    for l in lines.iter().skip(1) {
        out.push_str("\n  caused by: ");
        out.push_str(l);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "a = 1\nname = \"x\"\n[[sources]]\nname = \"s0\"\n[[sources]]\nname = \"s1\"\ntemplate = \"t\"\n";

    #[test]
    fn spans_and_keys() {
        let s = key_span(T, "sources[1].template").unwrap();
        assert_eq!(line_col(T, s.start), (7, 1));
        assert_eq!(
            key_at(T, s.start + 12).as_deref(),
            Some("sources[1].template")
        );
        assert_eq!(line_col(T, key_span(T, "name").unwrap().start), (2, 1));
        assert_eq!(
            line_col(T, key_span(T, "sources[0]").unwrap().start),
            (3, 1)
        );
        assert_eq!(key_span(T, "nope"), None);
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }

    #[test]
    fn suggestions() {
        assert_eq!(closest("smapling", &["sampling", "name"]), Some("sampling"));
        assert_eq!(closest("zzz", &["sampling", "name"]), None);
        assert_eq!(backticked("unknown field `lr2`, expected"), Some("lr2"));
    }

    #[test]
    fn repeated_causes_are_dropped() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "x.json: {}", self.0)
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Outer(std::io::Error::other("broken"));
        assert_eq!(error_report(&e), "error: x.json: broken");
    }
}
