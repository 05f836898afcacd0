//! The WRPO data pipeline around the trainer (../shared/reference/WRPO.md, "Data"): sample the
//! target ([`sample`]), score (prompt, response) pairs with a reward model ([`score`]), and build
//! WRPO rows from scored source and target responses ([`build`]).
//!
//! Every step reads and writes JSON Lines; a bad row is an error naming `file:line: field`, or,
//! where the command has `--skip-bad-rows`, a skip that is reported and counted.

pub mod build;
pub mod sample;
pub mod sampler;
pub mod score;

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Map, Value};

use crate::data::{ferr, RowError};

/// A row of a JSON Lines file: its 1-based line and its object (or what is wrong with it).
pub type ObjectRow = (usize, Result<Map<String, Value>, RowError>);

/// The JSON objects of a JSON Lines file (blank lines ignored) with their 1-based line numbers;
/// a line that is not a JSON object is an `Err` for that line only.
pub fn parse_objects(path: &Path, text: &str) -> Vec<ObjectRow> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let line = i + 1;
            let r = match serde_json::from_str::<Value>(l) {
                Ok(Value::Object(o)) => Ok(o),
                Ok(_) => Err(RowError::at(
                    path,
                    line,
                    ferr("", "a row must be a JSON object"),
                )),
                Err(e) => Err(RowError::at(
                    path,
                    line,
                    ferr("", format!("invalid JSON: {e}")),
                )),
            };
            (line, r)
        })
        .collect()
}

/// [`parse_objects`] of a file.
pub fn read_objects(path: &Path) -> Result<Vec<ObjectRow>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(parse_objects(path, &text))
}

/// JSON Lines text of `rows`, one object per line.
pub fn to_jsonl<'a>(rows: impl IntoIterator<Item = &'a Value>) -> String {
    let mut text = String::new();
    for r in rows {
        text += &serde_json::to_string(r).expect("JSON values serialise");
        text.push('\n');
    }
    text
}
