//! Plain-text tables (also valid Markdown) and the statistics shown in them.

use std::fmt::Write as _;

/// A table printed as Markdown: readable in a terminal, pasteable into
/// docs/benchmarks.md as is.
pub struct Table {
    title: String,
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
    notes: Vec<String>,
}

impl Table {
    pub fn new(title: &str, headers: &[&str]) -> Self {
        Self {
            title: title.to_owned(),
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// A line printed under the table.
    pub fn note(&mut self, text: &str) {
        self.notes.push(text.to_owned());
    }

    pub fn render(&self) -> String {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        // Columns whose cells all start like numbers are right-aligned.
        let numeric: Vec<bool> = (0..columns)
            .map(|i| {
                self.rows.iter().all(|r| {
                    r.get(i).is_none_or(|c| {
                        c.starts_with(|ch: char| ch.is_ascii_digit() || ch == '+' || ch == '-')
                    })
                })
            })
            .collect();
        let line = |cells: &[String]| {
            let mut out = String::from("|");
            for (i, width) in widths.iter().enumerate() {
                let cell = cells.get(i).map_or("", String::as_str);
                if numeric[i] {
                    let _ = write!(out, " {cell:>width$} |");
                } else {
                    let _ = write!(out, " {cell:<width$} |");
                }
            }
            out.push('\n');
            out
        };
        let mut out = format!("### {}\n\n", self.title);
        out.push_str(&line(&self.headers));
        out.push('|');
        for (i, width) in widths.iter().enumerate() {
            let dashes = "-".repeat(*width + 1);
            let end = if numeric[i] { ':' } else { '-' };
            let _ = write!(out, "{dashes}{end}|");
        }
        out.push('\n');
        for row in &self.rows {
            out.push_str(&line(row));
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for note in &self.notes {
                out.push_str(note);
                out.push('\n');
            }
        }
        out
    }
}

/// Median of `values` (mean of the middle two for an even count); NaN when
/// empty.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}

/// Largest value; NaN when empty.
pub fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NAN, f64::max)
}

/// `PASS` or `MISS`.
pub fn verdict(ok: bool) -> String {
    if ok { "PASS" } else { "MISS" }.to_owned()
}

/// `+12.3%` / `-4.0%`.
pub fn percent(ratio: f64) -> String {
    format!("{:+.1}%", (ratio - 1.0) * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(max(&[1.0, 5.0, 2.0]), 5.0);
        assert_eq!(percent(1.2), "+20.0%");
    }

    #[test]
    fn renders_markdown() {
        let mut t = Table::new("T", &["name", "ns"]);
        t.row(vec!["a".into(), "12.5".into()]);
        let text = t.render();
        assert!(text.contains("| name |   ns |"));
        assert!(text.contains("|------|-----:|"), "{text}");
    }
}
