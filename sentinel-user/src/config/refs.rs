//! Names defined in the file and the references between blocks (a route's
//! upstream and filters, a filter's agent), each with its position, checked
//! once the whole file is read so that order does not matter.

use super::walk::{Walker, did_you_mean};

/// What a name names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Listener,
    Route,
    Upstream,
    Filter,
    Agent,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Listener => "listener",
            Kind::Route => "route",
            Kind::Upstream => "upstream",
            Kind::Filter => "filter",
            Kind::Agent => "agent",
        }
    }

    /// The top-level block that defines names of this kind.
    fn block(self) -> &'static str {
        match self {
            Kind::Listener => "listeners",
            Kind::Route => "routes",
            Kind::Upstream => "upstreams",
            Kind::Filter => "filters",
            Kind::Agent => "agents",
        }
    }
}

struct Definition {
    kind: Kind,
    name: String,
    offset: usize,
}

struct Reference {
    kind: Kind,
    name: String,
    offset: usize,
    /// Who refers, for the message: `route 'api'`.
    from: String,
}

/// Every definition and reference met while reading.
#[derive(Default)]
pub(super) struct Names {
    definitions: Vec<Definition>,
    references: Vec<Reference>,
    /// Where each rule of `KernelConfig::steering` is written, in its
    /// order: whether its listener can take what it steers depends on the
    /// listener's address (`read_steering::check_families`).
    pub steering_rules: Vec<usize>,
    /// Where the quarantine listener's address is written.
    pub quarantine_at: Option<usize>,
}

impl Names {
    /// A `kind "name"` block, whose name is at `offset`. Recorded even when
    /// the block has errors, so that references to it are not reported too.
    pub fn define(&mut self, kind: Kind, name: &str, offset: usize) {
        self.definitions.push(Definition {
            kind,
            name: name.to_owned(),
            offset,
        });
    }

    /// A use of `name` as a `kind`, written at `offset`.
    pub fn refer(&mut self, kind: Kind, name: &str, offset: usize, from: impl Into<String>) {
        self.references.push(Reference {
            kind,
            name: name.to_owned(),
            offset,
            from: from.into(),
        });
    }

    /// Reports names defined twice and references to nothing.
    pub fn check(&self, w: &mut Walker<'_>) {
        for (i, def) in self.definitions.iter().enumerate() {
            if let Some(first) = self.definitions[..i]
                .iter()
                .find(|d| d.kind == def.kind && d.name == def.name)
            {
                let (line, _) = w.source.locate(first.offset);
                w.at_offset(
                    def.offset,
                    format!(
                        "{} '{}' is defined twice (first on line {line})",
                        def.kind.as_str(),
                        def.name
                    ),
                );
            }
        }
        for r in &self.references {
            let known: Vec<&str> = self
                .definitions
                .iter()
                .filter(|d| d.kind == r.kind)
                .map(|d| d.name.as_str())
                .collect();
            if known.contains(&r.name.as_str()) {
                continue;
            }
            let what = r.kind.as_str();
            let hint = match did_you_mean(&r.name, &known) {
                Some(best) => format!(" (did you mean '{best}'?)"),
                None if known.is_empty() => {
                    format!(" (no {what} is defined: add a '{}' block)", r.kind.block())
                }
                None => String::new(),
            };
            w.at_offset(
                r.offset,
                format!("{}: {what} '{}' is not defined{hint}", r.from, r.name),
            );
        }
    }
}
