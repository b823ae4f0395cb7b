//! Reachability truth tables, written exactly as the Kubernetes e2e NetworkPolicy suite prints them: a header
//! line `-` followed by the destination `ns/pod` names, then one line per source, its name followed by one mark
//! per destination; fields separated by tabs; `.` reachable, `X` blocked, `?` unknown.
//!
//! ```text
//! (fields separated by one tab each)
//! -  x/a  x/b
//! x/a  .  X
//! x/b  .  .
//! ```
//!
//! [`TruthTable::parse`] reads that form (any run of spaces or tabs separates fields, so a table pasted into a
//! YAML block scalar survives an editor that expands tabs); [`TruthTable::pretty`] writes it back byte for byte;
//! [`side_by_side`] puts several tables next to each other for a failure report.

use std::fmt::Write as _;

/// One reachability table: `values[from][to]`, `None` where unknown (`?`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TruthTable {
    pub froms: Vec<String>,
    pub tos: Vec<String>,
    values: Vec<Vec<Option<bool>>>,
}

/// Why a table could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("the table is empty")]
    Empty,
    #[error("the header must start with `-` (found {0:?})")]
    Header(String),
    #[error("line {line}: {found} marks for {want} columns")]
    Width {
        line: usize,
        found: usize,
        want: usize,
    },
    #[error("line {line}: mark {mark:?} is none of `.` (reachable), `X` (blocked), `?` (unknown)")]
    Mark { line: usize, mark: String },
    #[error("`{0}` appears twice")]
    Duplicate(String),
}

impl TruthTable {
    /// A table with every cell unknown.
    pub fn new(froms: Vec<String>, tos: Vec<String>) -> Self {
        let values = vec![vec![None; tos.len()]; froms.len()];
        Self { froms, tos, values }
    }

    /// A table with every cell set to `value`.
    pub fn filled(froms: Vec<String>, tos: Vec<String>, value: bool) -> Self {
        let values = vec![vec![Some(value); tos.len()]; froms.len()];
        Self { froms, tos, values }
    }

    fn index(&self, from: &str, to: &str) -> Option<(usize, usize)> {
        let f = self.froms.iter().position(|x| x == from)?;
        let t = self.tos.iter().position(|x| x == to)?;
        Some((f, t))
    }

    /// Sets `from → to`; returns false when either is not in the table.
    pub fn set(&mut self, from: &str, to: &str, value: bool) -> bool {
        match self.index(from, to) {
            Some((f, t)) => {
                self.values[f][t] = Some(value);
                true
            }
            None => false,
        }
    }

    /// The value of `from → to` (`None`: unknown, or not in the table).
    pub fn get(&self, from: &str, to: &str) -> Option<bool> {
        self.index(from, to).and_then(|(f, t)| self.values[f][t])
    }

    /// Every known cell, in row order.
    pub fn cells(&self) -> impl Iterator<Item = (&str, &str, bool)> {
        self.froms.iter().enumerate().flat_map(move |(f, from)| {
            self.tos.iter().enumerate().filter_map(move |(t, to)| {
                self.values[f][t].map(|v| (from.as_str(), to.as_str(), v))
            })
        })
    }

    /// Whether every cell is known.
    pub fn is_complete(&self) -> bool {
        self.values.iter().all(|r| r.iter().all(Option::is_some))
    }

    /// The e2e suite's form: `indent` before each line, tab-separated, no trailing newline.
    pub fn pretty(&self, indent: &str) -> String {
        let mut lines = Vec::with_capacity(self.froms.len() + 1);
        let header: Vec<&str> = std::iter::once("-")
            .chain(self.tos.iter().map(String::as_str))
            .collect();
        lines.push(format!("{indent}{}", header.join("\t")));
        for (f, from) in self.froms.iter().enumerate() {
            let mut line = vec![from.as_str()];
            line.extend(self.values[f].iter().map(|v| mark(*v)));
            lines.push(format!("{indent}{}", line.join("\t")));
        }
        lines.join("\n")
    }

    /// Reads the e2e suite's form (leading indentation and blank lines ignored).
    pub fn parse(text: &str) -> Result<Self, TableError> {
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty());
        let (_, header) = lines.next().ok_or(TableError::Empty)?;
        let mut fields = header.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if first != "-" {
            return Err(TableError::Header(first.to_string()));
        }
        let tos: Vec<String> = fields.map(str::to_string).collect();
        if tos.is_empty() {
            return Err(TableError::Header(header.to_string()));
        }
        unique(&tos)?;
        let mut froms = Vec::new();
        let mut values = Vec::new();
        for (line, l) in lines {
            let mut fields = l.split_whitespace();
            let from = fields.next().unwrap_or_default().to_string();
            let marks: Vec<&str> = fields.collect();
            if marks.len() != tos.len() {
                return Err(TableError::Width {
                    line,
                    found: marks.len(),
                    want: tos.len(),
                });
            }
            let row = marks
                .iter()
                .map(|m| match *m {
                    "." => Ok(Some(true)),
                    "X" => Ok(Some(false)),
                    "?" => Ok(None),
                    other => Err(TableError::Mark {
                        line,
                        mark: other.to_string(),
                    }),
                })
                .collect::<Result<Vec<_>, _>>()?;
            froms.push(from);
            values.push(row);
        }
        unique(&froms)?;
        Ok(Self { froms, tos, values })
    }

    /// Cell by cell, `self` against `other` over `self`'s rows and columns: `.` where they agree, `X` where they
    /// differ, `?` where either is unknown (the e2e suite's comparison table).
    pub fn compare(&self, other: &TruthTable) -> TruthTable {
        let mut out = TruthTable::new(self.froms.clone(), self.tos.clone());
        for (f, from) in self.froms.iter().enumerate() {
            for (t, to) in self.tos.iter().enumerate() {
                if let (Some(a), Some(b)) = (self.values[f][t], other.get(from, to)) {
                    out.values[f][t] = Some(a == b);
                }
            }
        }
        out
    }

    /// The cells known in both where `self` and `other` differ: `(from, to, self's value)`.
    pub fn mismatches<'a>(&'a self, other: &'a TruthTable) -> Vec<(&'a str, &'a str, bool)> {
        self.cells()
            .filter(|(f, t, v)| other.get(f, t).is_some_and(|o| o != *v))
            .collect()
    }

    /// Counts of reachable and blocked cells.
    pub fn counts(&self) -> (usize, usize) {
        let reachable = self.cells().filter(|c| c.2).count();
        (reachable, self.cells().count() - reachable)
    }
}

fn mark(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => ".",
        Some(false) => "X",
        None => "?",
    }
}

fn unique(names: &[String]) -> Result<(), TableError> {
    let mut seen = std::collections::BTreeSet::new();
    for n in names {
        if !seen.insert(n) {
            return Err(TableError::Duplicate(n.clone()));
        }
    }
    Ok(())
}

/// Tables next to each other under their titles, columns padded to a common width (for a person: the canonical
/// tab-separated form is [`TruthTable::pretty`]). Rows and columns are those of the first table.
pub fn side_by_side(tables: &[(&str, &TruthTable)]) -> String {
    let Some((_, first)) = tables.first() else {
        return String::new();
    };
    let label = first
        .froms
        .iter()
        .chain(first.tos.iter())
        .map(String::len)
        .max()
        .unwrap_or(1)
        .max(1);
    let render = |t: &TruthTable| -> Vec<String> {
        let mut lines = Vec::new();
        let mut header = format!("{:<label$}", "-");
        for to in &first.tos {
            let _ = write!(header, " {to:<label$}");
        }
        lines.push(header);
        for from in &first.froms {
            let mut line = format!("{from:<label$}");
            for to in &first.tos {
                let v = if t.index(from, to).is_some() {
                    t.get(from, to)
                } else {
                    None
                };
                let _ = write!(line, " {:<label$}", mark(v));
            }
            lines.push(line);
        }
        lines
    };
    let blocks: Vec<Vec<String>> = tables.iter().map(|(_, t)| render(t)).collect();
    let width = blocks
        .iter()
        .flat_map(|b| b.iter().map(String::len))
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    let titles: Vec<String> = tables
        .iter()
        .map(|(title, _)| format!("{title:<width$}"))
        .collect();
    let _ = writeln!(out, "{}", titles.join("   ").trim_end());
    for row in 0..=first.froms.len() {
        let cells: Vec<String> = blocks
            .iter()
            .map(|b| format!("{:<width$}", b[row]))
            .collect();
        let _ = writeln!(out, "{}", cells.join("   ").trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn prints_as_the_e2e_suite_does() {
        let mut t = TruthTable::filled(names(&["x/a", "x/b"]), names(&["x/a", "x/b"]), true);
        t.set("x/a", "x/b", false);
        assert_eq!(t.pretty(""), "-\tx/a\tx/b\nx/a\t.\tX\nx/b\t.\t.");
        assert_eq!(t.pretty("  "), "  -\tx/a\tx/b\n  x/a\t.\tX\n  x/b\t.\t.");
        let mut u = TruthTable::new(names(&["x/a"]), names(&["y/b"]));
        assert_eq!(u.pretty(""), "-\ty/b\nx/a\t?");
        assert!(!u.is_complete());
        u.set("x/a", "y/b", true);
        assert!(u.is_complete());
    }

    #[test]
    fn parse_reads_back_what_pretty_writes_and_tolerates_spaces() {
        let mut t = TruthTable::filled(
            names(&["x/a", "x/b", "y/a"]),
            names(&["x/a", "x/b", "y/a"]),
            false,
        );
        t.set("y/a", "x/b", true);
        t.set("x/a", "x/a", true);
        assert_eq!(TruthTable::parse(&t.pretty("\t")).unwrap(), t);
        let spaced =
            "\n   -   x/a x/b  y/a\n   x/a .   X   X\n   x/b X   X   X\n   y/a X   .   X\n";
        assert_eq!(TruthTable::parse(spaced).unwrap(), t);
    }

    #[test]
    fn parse_refuses_malformed_tables() {
        assert_eq!(TruthTable::parse("  \n"), Err(TableError::Empty));
        assert!(matches!(
            TruthTable::parse("x/a\tx/b\nx/a\t.\t."),
            Err(TableError::Header(_))
        ));
        assert_eq!(
            TruthTable::parse("-\tx/a\tx/b\nx/a\t."),
            Err(TableError::Width {
                line: 2,
                found: 1,
                want: 2
            })
        );
        assert_eq!(
            TruthTable::parse("-\tx/a\nx/a\to"),
            Err(TableError::Mark {
                line: 2,
                mark: "o".into()
            })
        );
        assert_eq!(
            TruthTable::parse("-\tx/a\tx/a\nx/a\t.\t."),
            Err(TableError::Duplicate("x/a".into()))
        );
        // `?` is read as unknown.
        let t = TruthTable::parse("-\tx/a\nx/a\t?").unwrap();
        assert_eq!(t.get("x/a", "x/a"), None);
    }

    #[test]
    fn compare_and_mismatches_only_count_cells_known_in_both() {
        let expected = TruthTable::parse("-\tx/a\tx/b\nx/a\t.\tX\nx/b\t?\t.").unwrap();
        let observed = TruthTable::parse("-\tx/a\tx/b\nx/a\t.\t.\nx/b\tX\t.").unwrap();
        let cmp = expected.compare(&observed);
        assert_eq!(cmp.pretty(""), "-\tx/a\tx/b\nx/a\t.\tX\nx/b\t?\t.");
        assert_eq!(expected.mismatches(&observed), vec![("x/a", "x/b", false)]);
        assert_eq!(observed.counts(), (3, 1));
    }

    #[test]
    fn side_by_side_aligns_every_table_on_the_first_ones_rows() {
        let a = TruthTable::parse("-\tx/a\tx/b\nx/a\t.\tX\nx/b\t.\t.").unwrap();
        let b = TruthTable::parse("-\tx/a\tx/b\nx/a\t.\t.\nx/b\t.\t.").unwrap();
        let s = side_by_side(&[("expected", &a), ("observed", &b)]);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("expected") && lines[0].contains("observed"));
        assert_eq!(lines[1], "-   x/a x/b   -   x/a x/b");
        assert_eq!(lines[2], "x/a .   X     x/a .   .");
        assert_eq!(lines[3], "x/b .   .     x/b .   .");
    }
}
