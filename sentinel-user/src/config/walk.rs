//! Reading KDL nodes into typed values while collecting every problem, each
//! pointing at its file, line and column.

use std::{fmt, path::Path, sync::Arc, time::Duration};

use kdl::{KdlEntry, KdlNode, KdlValue};
use span::Span;

/// The text of one configuration file, with what is needed to turn byte
/// offsets into lines and columns.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: Arc<Path>,
    pub text: Arc<str>,
    line_starts: Vec<usize>,
}

impl Source {
    pub fn new(path: &Path, text: &str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self {
            path: Arc::from(path),
            text: Arc::from(text),
            line_starts,
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn locate(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset).max(1);
        let start = self.line_starts[line - 1];
        let column = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count())
            + 1;
        (line, column)
    }
}

/// One thing wrong with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

/// Where a KDL element starts, for error positions.
pub mod span {
    pub trait Span {
        fn offset(&self) -> usize;
    }
    impl Span for kdl::KdlNode {
        fn offset(&self) -> usize {
            self.span().offset()
        }
    }
    impl Span for kdl::KdlEntry {
        fn offset(&self) -> usize {
            self.span().offset()
        }
    }
}

/// Collects problems while the typed configuration is read.
pub struct Walker<'a> {
    pub source: &'a Source,
    pub problems: Vec<Problem>,
}

impl<'a> Walker<'a> {
    pub fn new(source: &'a Source) -> Self {
        Self {
            source,
            problems: Vec::new(),
        }
    }

    pub fn at_offset(&mut self, offset: usize, message: impl Into<String>) {
        let (line, column) = self.source.locate(offset);
        self.problems.push(Problem {
            file: self.source.path.display().to_string(),
            line,
            column,
            message: message.into(),
        });
    }

    pub fn error(&mut self, at: &impl Span, message: impl Into<String>) {
        self.at_offset(at.offset(), message);
    }

    /// Children of a block node, each passed to `visit` with its name; a name
    /// `visit` does not know (it returns `false`) is reported with the closest
    /// known name as a suggestion.
    pub fn block(
        &mut self,
        node: &KdlNode,
        known: &[&str],
        visit: impl FnMut(&mut Self, &str, &KdlNode) -> bool,
    ) {
        self.no_entries(node);
        self.children(node, known, None, visit);
    }

    /// [`Walker::block`], and an option given twice is an error unless it is
    /// one of `repeatable` (`listener`, `route`, `header`, ...).
    pub fn options(
        &mut self,
        node: &KdlNode,
        known: &[&str],
        repeatable: &[&str],
        visit: impl FnMut(&mut Self, &str, &KdlNode) -> bool,
    ) {
        self.no_entries(node);
        self.children(node, known, Some(repeatable), visit);
    }

    /// The children of `node`, whatever its own arguments (`listener "name"
    /// { ... }`). With `repeatable`, a known option that appears a second
    /// time and is not listed there is reported and not visited again.
    pub fn children(
        &mut self,
        node: &KdlNode,
        known: &[&str],
        repeatable: Option<&[&str]>,
        mut visit: impl FnMut(&mut Self, &str, &KdlNode) -> bool,
    ) {
        let Some(children) = node.children() else {
            return;
        };
        let parent = node.name().value();
        let mut seen: Vec<&str> = Vec::new();
        for child in children.nodes() {
            let name = child.name().value();
            if let Some(repeatable) = repeatable
                && known.contains(&name)
                && !repeatable.contains(&name)
            {
                if seen.contains(&name) {
                    self.error(
                        child,
                        format!("'{name}' is given more than once in '{parent}'"),
                    );
                    continue;
                }
                seen.push(name);
            }
            if !visit(self, name, child) {
                self.unknown(child, &format!("option in '{parent}'"), known);
            }
        }
    }

    /// The name of a named block (`listener "http" { ... }`): its one
    /// positional argument, a non-empty string. Properties other than
    /// `properties` are reported; the caller reads those it allows.
    pub fn name(&mut self, node: &KdlNode, properties: &[&str]) -> Option<(String, usize)> {
        let what = node.name().value();
        let mut name = None;
        let mut positional = 0;
        for entry in node.entries() {
            match entry.name().map(|n| n.value()) {
                None => {
                    positional += 1;
                    if positional == 2 {
                        self.error(entry, format!("'{what}' takes one name"));
                    }
                    if positional > 1 {
                        continue;
                    }
                    match entry.value() {
                        KdlValue::String(s) if s.trim().is_empty() => {
                            self.error(entry, format!("the name of a '{what}' must not be empty"));
                        }
                        KdlValue::String(s) => name = Some((s.clone(), entry.span().offset())),
                        other => self.error(
                            entry,
                            format!(
                                "the name of a '{what}' must be a string, found {}",
                                kind(other)
                            ),
                        ),
                    }
                }
                Some(p) if properties.contains(&p) => {}
                Some(other) => {
                    let msg = match did_you_mean(other, properties) {
                        Some(best) => {
                            format!("unknown property '{other}' (did you mean '{best}'?)")
                        }
                        None => format!("unknown property '{other}' of '{what}'"),
                    };
                    self.error(entry, msg);
                }
            }
        }
        if positional == 0 {
            self.error(
                node,
                format!("'{what}' needs a name: {what} \"NAME\" {{ ... }}"),
            );
        }
        name
    }

    /// Reports an unknown node name, suggesting the closest of `known`.
    pub fn unknown(&mut self, node: &KdlNode, what: &str, known: &[&str]) {
        let name = node.name().value();
        let message = match did_you_mean(name, known) {
            Some(best) => format!("unknown {what} '{name}' (did you mean '{best}'?)"),
            None => format!("unknown {what} '{name}'"),
        };
        self.error(node, message);
    }

    /// A block node must not carry arguments or properties.
    pub fn no_entries(&mut self, node: &KdlNode) {
        if let Some(entry) = node.entries().first() {
            self.error(
                entry,
                format!(
                    "'{}' takes no arguments, only a {{ ... }} block",
                    node.name().value()
                ),
            );
        }
    }

    /// A leaf node must not have children.
    pub fn no_children(&mut self, node: &KdlNode) {
        if node.children().is_some() {
            self.error(
                node,
                format!("'{}' takes no {{ ... }} block", node.name().value()),
            );
        }
    }

    /// The single positional argument of `node`.
    pub fn single<'n>(&mut self, node: &'n KdlNode) -> Option<&'n KdlEntry> {
        self.no_children(node);
        let mut args = node.entries().iter();
        let first = args.next();
        if let Some(extra) = args.next() {
            let what = node.name().value();
            // `address "x" weight 1` on one line is one node with three
            // values: KDL v2 reads the bare word `weight` as a string.
            let bare_word = extra.name().is_none()
                && matches!(extra.value(), KdlValue::String(_))
                && self
                    .source
                    .text
                    .get(extra.offset()..)
                    .is_some_and(|t| t.starts_with(|c: char| c.is_ascii_alphabetic()));
            let message = if bare_word {
                format!(
                    "'{what}' takes exactly one value; to write another option on the same line, end this one with ';'"
                )
            } else {
                format!("'{what}' takes exactly one value")
            };
            self.error(extra, message);
            return None;
        }
        if first.is_none() {
            self.error(node, format!("'{}' needs a value", node.name().value()));
        }
        first.filter(|e| {
            if e.name().is_some() {
                self.error(
                    *e,
                    format!("'{}' takes a value, not a property", node.name().value()),
                );
                false
            } else {
                true
            }
        })
    }

    pub fn string(&mut self, node: &KdlNode) -> Option<String> {
        let entry = self.single(node)?;
        self.entry_string(node.name().value(), entry)
    }

    pub fn entry_string(&mut self, what: &str, entry: &KdlEntry) -> Option<String> {
        match entry.value() {
            KdlValue::String(s) => Some(s.clone()),
            other => {
                self.error(
                    entry,
                    format!("'{what}' must be a string, found {}", kind(other)),
                );
                None
            }
        }
    }

    /// An integer in `min..=max`.
    pub fn integer(&mut self, node: &KdlNode, min: u64, max: u64) -> Option<u64> {
        let entry = self.single(node)?;
        self.entry_integer(node.name().value(), entry, min, max)
    }

    pub fn entry_integer(
        &mut self,
        what: &str,
        entry: &KdlEntry,
        min: u64,
        max: u64,
    ) -> Option<u64> {
        match entry.value() {
            KdlValue::Integer(i) if (min as i128..=max as i128).contains(i) => Some(*i as u64),
            KdlValue::Integer(i) => {
                self.error(
                    entry,
                    format!("'{what}' must be between {min} and {max}, found {i}"),
                );
                None
            }
            other => {
                self.error(
                    entry,
                    format!("'{what}' must be an integer, found {}", kind(other)),
                );
                None
            }
        }
    }

    /// A string and the offset of its value, for messages that point at it.
    pub fn string_at(&mut self, node: &KdlNode) -> Option<(String, usize)> {
        let entry = self.single(node)?;
        let value = self.entry_string(node.name().value(), entry)?;
        Some((value, entry.span().offset()))
    }

    /// An integer in `min..=max`, which may be negative.
    pub fn signed(&mut self, node: &KdlNode, min: i64, max: i64) -> Option<i64> {
        let entry = self.single(node)?;
        let what = node.name().value();
        match entry.value() {
            KdlValue::Integer(i) if (min as i128..=max as i128).contains(i) => Some(*i as i64),
            KdlValue::Integer(i) => {
                self.error(
                    entry,
                    format!("'{what}' must be between {min} and {max}, found {i}"),
                );
                None
            }
            other => {
                self.error(
                    entry,
                    format!("'{what}' must be an integer, found {}", kind(other)),
                );
                None
            }
        }
    }

    /// A number, integer or not (`max-decompression-ratio 100.0` or `100`).
    pub fn float(&mut self, node: &KdlNode) -> Option<(f64, usize)> {
        let entry = self.single(node)?;
        let value = match entry.value() {
            KdlValue::Float(f) if f.is_finite() => *f,
            KdlValue::Integer(i) => *i as f64,
            other => {
                self.error(
                    entry,
                    format!(
                        "'{}' must be a number, found {}",
                        node.name().value(),
                        kind(other)
                    ),
                );
                return None;
            }
        };
        Some((value, entry.span().offset()))
    }

    /// `#true` or `#false`.
    pub fn boolean(&mut self, node: &KdlNode) -> Option<bool> {
        let entry = self.single(node)?;
        match entry.value() {
            KdlValue::Bool(b) => Some(*b),
            other => {
                self.error(
                    entry,
                    format!(
                        "'{}' must be #true or #false, found {}",
                        node.name().value(),
                        kind(other)
                    ),
                );
                None
            }
        }
    }

    /// A flag: the bare node means true (`insecure-skip-verify`), or an
    /// explicit `#true` / `#false`.
    pub fn flag(&mut self, node: &KdlNode) -> Option<bool> {
        if node.entries().is_empty() {
            self.no_children(node);
            return Some(true);
        }
        self.boolean(node)
    }

    /// One of a fixed set of strings, each standing for a value.
    pub fn choice<T: Copy>(&mut self, node: &KdlNode, choices: &[(&str, T)]) -> Option<T> {
        let entry = self.single(node)?;
        let what = node.name().value();
        let value = self.entry_string(what, entry)?;
        if let Some((_, v)) = choices.iter().find(|(name, _)| *name == value) {
            return Some(*v);
        }
        let names: Vec<String> = choices.iter().map(|(n, _)| format!("\"{n}\"")).collect();
        let list = match names.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        };
        self.error(entry, format!("'{what}' must be {list}, found \"{value}\""));
        None
    }

    /// A duration in milliseconds, `min..=max` (`timeout-ms 200`).
    pub fn millis(&mut self, node: &KdlNode, min: u64, max: u64) -> Option<Duration> {
        self.integer(node, min, max).map(Duration::from_millis)
    }

    /// A duration in seconds, `min..=max` (`interval-secs 10`).
    pub fn secs(&mut self, node: &KdlNode, min: u64, max: u64) -> Option<Duration> {
        self.integer(node, min, max).map(Duration::from_secs)
    }

    /// Every positional argument as a string (`events "a" "b"` style).
    pub fn strings(&mut self, node: &KdlNode) -> Vec<(String, usize)> {
        self.no_children(node);
        let what = node.name().value().to_owned();
        if node.entries().is_empty() {
            self.error(node, format!("'{what}' needs at least one value"));
        }
        let mut out = Vec::new();
        for entry in node.entries() {
            if entry.name().is_some() {
                self.error(entry, format!("'{what}' takes values, not properties"));
                continue;
            }
            if let Some(s) = self.entry_string(&what, entry) {
                out.push((s, entry.span().offset()));
            }
        }
        out
    }
}

/// Whether `node` has a child called `name`, valid or not: a required
/// option is reported missing only when it was not written at all.
pub fn has_child(node: &KdlNode, name: &str) -> bool {
    node.children()
        .is_some_and(|c| c.nodes().iter().any(|n| n.name().value() == name))
}

/// The closest known name, if it is close enough to be a likely typo.
pub fn did_you_mean<'k>(name: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (strsim::levenshtein(name, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

pub fn kind(value: &KdlValue) -> &'static str {
    match value {
        KdlValue::String(_) => "a string",
        KdlValue::Integer(_) => "an integer",
        KdlValue::Float(_) => "a number",
        KdlValue::Bool(_) => "a boolean",
        KdlValue::Null => "#null",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_lines_and_columns() {
        let src = Source::new(Path::new("x.kdl"), "a\nbc é d\n");
        assert_eq!(src.locate(0), (1, 1));
        assert_eq!(src.locate(2), (2, 1));
        assert_eq!(src.locate(3), (2, 2));
        // 'd' comes after a two-byte character: column counts characters.
        assert_eq!(src.locate(8), (2, 6));
    }

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(
            did_you_mean("pin-pth", &["pin-path", "interfaces"]),
            Some("pin-path")
        );
        assert_eq!(did_you_mean("zzzzzz", &["pin-path", "interfaces"]), None);
    }
}
