//! `wrpo-engine build-dataset`: WRPO rows from scored source responses and scored target samples
//! (../shared/reference/WRPO.md, "Data"). Pure data code: no model.
//!
//! Inputs (JSON Lines):
//! - sources, from any number of files: `{"prompt_id", "prompt", "model", "response", "score"}`,
//!   one response per row (`model` optional; a response is a string or one assistant message);
//! - targets: `score` output of `sample` rows, `{"prompt_id", "prompt", "responses": [...],
//!   "scores": [...]}`, one row per prompt.
//!
//! Outputs:
//! - WRPO rows in the authors' format, `chosen` order sources first, target last:
//!   `{"prompt_id", "prompt", "chosen": [y_ws…, y_wt], "rejected": [y_l]}` with
//!   `{"role": "assistant", "content": …}` messages. y_ws: the best response of each source model
//!   (rows without `model` count as separate sources), then the `sources_k` best of those, best
//!   first (K = 1: the best source response overall); y_wt / y_l: the best / worst target sample
//!   (first on equal scores).
//! - With `sft_fraction`: the prompts of the sources are split, seeded, into an SFT part
//!   (`round(fraction · prompts)` prompts; rows `{"prompt_id", "prompt", "chosen": [best source
//!   response]}`: `sft`'s default input, prompt + `chosen[0]`; no `rejected`, so not WRPO rows)
//!   and a WRPO part. The split depends
//!   only on the set of source `prompt_id`s and the seed, so the same sources and seed give the
//!   same split before sampling (to write the prompts to sample) and after (to build the WRPO
//!   rows).
//! - The WRPO part's prompts as `{"prompt_id", "prompt"}` rows: the prompt file of `sample`.
//!
//! What is dropped is always counted ([`Report`]): ties (all target scores equal: no preference)
//! are dropped; a target prompt with no source response, fewer than K sources or fewer than 2
//! samples, and every bad row (missing score, duplicate prompt_id, a prompt that differs from
//! the sources' for the same id, …) is an error naming `file:line: field`, or with
//! `skip_bad_rows` a counted skip.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Result;
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use serde_json::{json, Map, Value};

use super::parse_objects;
use crate::data::{
    ferr, parse_prompt, parse_prompt_id, parse_response, FieldError, RowError, Text,
};
use crate::tokenizer::Message;

/// One scored source response.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceRow {
    /// Source file.
    pub path: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// `prompt_id`.
    pub prompt_id: String,
    /// `prompt` as read.
    pub prompt: Value,
    /// The prompt as messages (for comparisons).
    pub messages: Vec<Message>,
    /// `model`, if given.
    pub model: Option<String>,
    /// The response text.
    pub response: String,
    /// Its score.
    pub score: f64,
}

/// The scored samples of the target for one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetRow {
    /// Targets file.
    pub path: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// `prompt_id`.
    pub prompt_id: String,
    /// The prompt as messages (for comparisons).
    pub messages: Vec<Message>,
    /// The sample texts.
    pub responses: Vec<String>,
    /// Their scores.
    pub scores: Vec<f64>,
}

fn common(obj: &Map<String, Value>) -> Result<(String, Text), FieldError> {
    if let Some(reason) = obj.get("skipped") {
        let reason = reason.as_str().unwrap_or("no reason given");
        return Err(ferr(
            "skipped",
            format!("the row was skipped by an earlier step: {reason}"),
        ));
    }
    let id = parse_prompt_id(obj.get("prompt_id"))?.ok_or_else(|| {
        ferr(
            "prompt_id",
            "missing (sources and targets are joined by prompt_id)",
        )
    })?;
    Ok((id, parse_prompt(obj.get("prompt"))?))
}

/// The text of a response that must be a string or a single assistant message.
fn content(t: Text, field: &str) -> Result<String, FieldError> {
    match t {
        Text::Plain(s) => Ok(s),
        Text::Messages(mut m) if m.len() == 1 => Ok(m.remove(0).content),
        Text::Messages(_) => Err(ferr(
            field,
            "must be a string or one assistant message (multi-turn responses are not supported)",
        )),
    }
}

fn number(v: Option<&Value>, field: &str, missing: &str) -> Result<f64, FieldError> {
    match v {
        None => Err(ferr(field, format!("missing ({missing})"))),
        Some(Value::Null) => Err(ferr(field, "is null (a non-finite score?)")),
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| ferr(field, "must be a finite number")),
        Some(_) => Err(ferr(field, "must be a number")),
    }
}

const SCORE_HINT: &str = "score the responses first with `wrpo-engine score`, or write a `score` field with any other scorer";

/// Validate a source row.
pub fn parse_source(obj: &Map<String, Value>) -> Result<SourceRow, FieldError> {
    let (prompt_id, text) = common(obj)?;
    let model = match obj.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(ferr("model", "must be a string")),
    };
    let response = match obj.get("response") {
        None => return Err(ferr("response", "missing")),
        Some(r) => content(parse_response(r, "response")?, "response")?,
    };
    let score = number(obj.get("score"), "score", SCORE_HINT)?;
    Ok(SourceRow {
        path: PathBuf::new(),
        line: 0,
        prompt_id,
        prompt: obj["prompt"].clone(),
        messages: text.messages("user"),
        model,
        response,
        score,
    })
}

/// Validate a target row.
pub fn parse_target(obj: &Map<String, Value>) -> Result<TargetRow, FieldError> {
    let (prompt_id, text) = common(obj)?;
    let list = match obj.get("responses") {
        Some(Value::Array(a)) => a,
        None => {
            return Err(ferr(
                "responses",
                "missing (target rows are `sample` output rows)",
            ))
        }
        Some(_) => return Err(ferr("responses", "must be a list of responses")),
    };
    let responses = list
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let f = format!("responses[{i}]");
            content(parse_response(r, &f)?, &f)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let scores =
        match obj.get("scores") {
            None => return Err(ferr(
                "scores",
                "missing (score the samples first with `wrpo-engine score`, which writes `scores`)",
            )),
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, s)| number(Some(s), &format!("scores[{i}]"), SCORE_HINT))
                .collect::<Result<Vec<_>, _>>()?,
            Some(_) => return Err(ferr("scores", "must be a list of numbers")),
        };
    if scores.len() != responses.len() {
        return Err(ferr(
            "scores",
            format!(
                "has {} scores for {} responses",
                scores.len(),
                responses.len()
            ),
        ));
    }
    Ok(TargetRow {
        path: PathBuf::new(),
        line: 0,
        prompt_id,
        messages: text.messages("user"),
        responses,
        scores,
    })
}

/// Source rows of a JSON Lines text; each bad row is an `Err` of its own.
pub fn parse_sources(path: &Path, text: &str) -> Vec<Result<SourceRow, RowError>> {
    parse_objects(path, text)
        .into_iter()
        .map(|(line, obj)| {
            let mut row = parse_source(&obj?).map_err(|e| RowError::at(path, line, e))?;
            (row.path, row.line) = (path.to_path_buf(), line);
            Ok(row)
        })
        .collect()
}

/// Target rows of a JSON Lines text; each bad row is an `Err` of its own.
pub fn parse_targets(path: &Path, text: &str) -> Vec<Result<TargetRow, RowError>> {
    parse_objects(path, text)
        .into_iter()
        .map(|(line, obj)| {
            let mut row = parse_target(&obj?).map_err(|e| RowError::at(path, line, e))?;
            (row.path, row.line) = (path.to_path_buf(), line);
            Ok(row)
        })
        .collect()
}

/// Settings.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// K: source responses (from distinct source models) per WRPO row.
    pub sources_k: usize,
    /// Fraction of the source prompts that goes to the SFT split (`None`: no split).
    pub sft_fraction: Option<f64>,
    /// Seed of the split.
    pub seed: u64,
    /// Skip and count bad rows and unusable target prompts instead of failing.
    pub skip_bad_rows: bool,
}

/// Why a target prompt gave no WRPO row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// All target scores are equal: no preference pair.
    Tie,
    /// No source response for the prompt_id.
    NoSource,
    /// Fewer source models than `sources_k`.
    TooFewSources,
    /// Fewer than two target samples.
    TooFewSamples,
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DropReason::Tie => "tie (all target scores equal)",
            DropReason::NoSource => "no source response",
            DropReason::TooFewSources => "fewer source models than --sources-k",
            DropReason::TooFewSamples => "fewer than 2 target samples",
        })
    }
}

/// Counts of a build.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Source rows used.
    pub source_rows: usize,
    /// Distinct source prompts.
    pub source_prompts: usize,
    /// Target rows read (usable), when targets were given.
    pub target_rows: Option<usize>,
    /// WRPO rows written.
    pub kept: usize,
    /// Prompts in the SFT split (= SFT rows).
    pub sft: usize,
    /// Prompts in the WRPO split (all source prompts without a split).
    pub wrpo_prompts: usize,
    /// Target prompts dropped, by reason, with the prompt_ids.
    pub dropped: BTreeMap<DropReason, Vec<String>>,
    /// Target rows whose prompt is in the SFT split (not used for WRPO rows).
    pub targets_in_sft_split: usize,
    /// WRPO-split prompts with no target row.
    pub without_targets: usize,
    /// Bad rows skipped (with `skip_bad_rows`).
    pub skipped_rows: Vec<RowError>,
}

impl Report {
    /// Ties (all target scores equal).
    pub fn ties(&self) -> usize {
        self.dropped.get(&DropReason::Tie).map_or(0, Vec::len)
    }

    /// Target prompts dropped for any reason.
    pub fn dropped_total(&self) -> usize {
        self.dropped.values().map(Vec::len).sum()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "sources: {} responses for {} prompts",
            self.source_rows, self.source_prompts
        )?;
        if self.sft > 0 || self.wrpo_prompts != self.source_prompts {
            writeln!(
                f,
                "split: {} prompts for SFT, {} for WRPO",
                self.sft, self.wrpo_prompts
            )?;
        }
        if let Some(t) = self.target_rows {
            writeln!(f, "targets: {t} prompts with samples")?;
            writeln!(f, "kept: {} WRPO rows", self.kept)?;
            write!(f, "dropped: {}", self.dropped_total())?;
            let parts: Vec<String> = self
                .dropped
                .iter()
                .map(|(r, ids)| format!("{r}: {}", ids.len()))
                .collect();
            if !parts.is_empty() {
                write!(f, " ({})", parts.join(", "))?;
            }
            writeln!(f)?;
            writeln!(f, "ties: {}", self.ties())?;
            if self.targets_in_sft_split > 0 {
                writeln!(
                    f,
                    "not used: {} target rows of SFT-split prompts",
                    self.targets_in_sft_split
                )?;
            }
            if self.without_targets > 0 {
                writeln!(
                    f,
                    "WRPO-split prompts without target samples: {}",
                    self.without_targets
                )?;
            }
        }
        if !self.skipped_rows.is_empty() {
            writeln!(f, "bad rows skipped: {}", self.skipped_rows.len())?;
        }
        Ok(())
    }
}

/// What a build produced.
#[derive(Debug, Clone, Default)]
pub struct BuildOutput {
    /// WRPO rows, in target order.
    pub wrpo: Vec<Value>,
    /// SFT rows, in source order.
    pub sft: Vec<Value>,
    /// `{"prompt_id", "prompt"}` of the WRPO split, in source order.
    pub prompts: Vec<Value>,
    /// Counts.
    pub report: Report,
}

struct Group {
    prompt_id: String,
    prompt: Value,
    messages: Vec<Message>,
    at: (PathBuf, usize),
    /// (model key, response, score), file order.
    responses: Vec<(String, String, f64)>,
}

fn assistant(text: &str) -> Value {
    json!({"role": "assistant", "content": text})
}

/// The index of the first largest (`better = >`) or smallest (`<`) score.
fn first_by(scores: &[f64], better: fn(f64, f64) -> bool) -> usize {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if better(s, scores[best]) {
            best = i;
        }
    }
    best
}

/// Fail on `e`, or count it as skipped with `skip`.
fn bad(report: &mut Report, e: RowError, skip: bool, what: &str) -> Result<()> {
    if skip {
        report.skipped_rows.push(e);
        Ok(())
    } else {
        Err(anyhow::Error::new(e).context(format!(
            "bad {what} row (pass --skip-bad-rows to skip and count such rows)"
        )))
    }
}

/// Build the outputs (see the module docs).
pub fn build(
    sources: Vec<Result<SourceRow, RowError>>,
    targets: Option<Vec<Result<TargetRow, RowError>>>,
    opts: &BuildOptions,
) -> Result<BuildOutput> {
    anyhow::ensure!(opts.sources_k >= 1, "--sources-k must be at least 1");
    if let Some(f) = opts.sft_fraction {
        anyhow::ensure!(
            (0.0..=1.0).contains(&f),
            "--sft-fraction must be in [0, 1], got {f}"
        );
    }
    let skip = opts.skip_bad_rows;
    let mut report = Report::default();
    // Group source responses by prompt_id, in order of first appearance.
    let mut groups: Vec<Group> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for r in sources {
        let row = match r {
            Ok(row) => row,
            Err(e) => {
                bad(&mut report, e, skip, "source")?;
                continue;
            }
        };
        let key = row
            .model
            .clone()
            .unwrap_or_else(|| format!("{}:{}", row.path.display(), row.line));
        match index.get(&row.prompt_id) {
            Some(&g) => {
                let g = &mut groups[g];
                if g.messages != row.messages {
                    let e = RowError::at(
                        &row.path,
                        row.line,
                        ferr(
                            "prompt",
                            format!(
                                "differs from the prompt of prompt_id {:?} at {}:{}",
                                row.prompt_id,
                                g.at.0.display(),
                                g.at.1
                            ),
                        ),
                    );
                    bad(&mut report, e, skip, "source")?;
                    continue;
                }
                g.responses.push((key, row.response, row.score));
            }
            None => {
                index.insert(row.prompt_id.clone(), groups.len());
                groups.push(Group {
                    prompt_id: row.prompt_id,
                    prompt: row.prompt,
                    messages: row.messages,
                    at: (row.path, row.line),
                    responses: vec![(key, row.response, row.score)],
                });
            }
        }
        report.source_rows += 1;
    }
    anyhow::ensure!(!groups.is_empty(), "no usable source rows");
    report.source_prompts = groups.len();

    // The seeded split: sort the ids (input order does not matter), shuffle, take the first part.
    let mut sft_ids: HashSet<&str> = HashSet::new();
    if let Some(f) = opts.sft_fraction {
        let mut ids: Vec<&str> = groups.iter().map(|g| g.prompt_id.as_str()).collect();
        ids.sort_unstable();
        ids.shuffle(&mut StdRng::seed_from_u64(opts.seed));
        let n = (f * ids.len() as f64).round() as usize;
        sft_ids.extend(&ids[..n]);
    }
    let mut out = BuildOutput::default();
    for g in &groups {
        if sft_ids.contains(g.prompt_id.as_str()) {
            let scores: Vec<f64> = g.responses.iter().map(|r| r.2).collect();
            let best = &g.responses[first_by(&scores, |a, b| a > b)].1;
            out.sft.push(
                json!({"prompt_id": g.prompt_id, "prompt": g.prompt, "chosen": [assistant(best)]}),
            );
        } else {
            out.prompts
                .push(json!({"prompt_id": g.prompt_id, "prompt": g.prompt}));
        }
    }
    report.sft = out.sft.len();
    report.wrpo_prompts = out.prompts.len();

    if let Some(targets) = targets {
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut usable = 0;
        for r in targets {
            let t = match r {
                Ok(t) => t,
                Err(e) => {
                    bad(&mut report, e, skip, "target")?;
                    continue;
                }
            };
            let at = |field: &str, msg: String| RowError::at(&t.path, t.line, ferr(field, msg));
            if let Some(first) = seen.get(&t.prompt_id) {
                let e = at(
                    "prompt_id",
                    format!(
                        "duplicate prompt_id {:?} (first at line {first})",
                        t.prompt_id
                    ),
                );
                bad(&mut report, e, skip, "target")?;
                continue;
            }
            seen.insert(t.prompt_id.clone(), t.line);
            let unusable = |report: &mut Report, reason: DropReason, e: RowError| -> Result<()> {
                if skip || reason == DropReason::Tie {
                    report
                        .dropped
                        .entry(reason)
                        .or_default()
                        .push(t.prompt_id.clone());
                    Ok(())
                } else {
                    Err(anyhow::Error::new(e).context(
                        "unusable target prompt (pass --skip-bad-rows to drop and count such prompts)",
                    ))
                }
            };
            let Some(&gi) = index.get(&t.prompt_id) else {
                let e = at(
                    "prompt_id",
                    format!("{:?} has no source response", t.prompt_id),
                );
                unusable(&mut report, DropReason::NoSource, e)?;
                continue;
            };
            let g = &groups[gi];
            if g.messages != t.messages {
                let e = at(
                    "prompt",
                    format!(
                        "differs from the sources' prompt for prompt_id {:?} ({}:{})",
                        t.prompt_id,
                        g.at.0.display(),
                        g.at.1
                    ),
                );
                bad(&mut report, e, skip, "target")?;
                continue;
            }
            usable += 1;
            if sft_ids.contains(t.prompt_id.as_str()) {
                report.targets_in_sft_split += 1;
                continue;
            }
            if t.responses.len() < 2 {
                let e = at(
                    "responses",
                    format!(
                        "{} sample(s): best and worst need at least 2",
                        t.responses.len()
                    ),
                );
                unusable(&mut report, DropReason::TooFewSamples, e)?;
                continue;
            }
            // Each source model's best response (first on equal scores), then the K best models.
            let mut best_per_model: Vec<(&str, &str, f64)> = Vec::new();
            for (key, resp, score) in &g.responses {
                let entry = (key.as_str(), resp.as_str(), *score);
                match best_per_model.iter_mut().find(|b| b.0 == entry.0) {
                    Some(b) if entry.2 > b.2 => *b = entry,
                    Some(_) => {}
                    None => best_per_model.push(entry),
                }
            }
            best_per_model.sort_by(|a, b| b.2.total_cmp(&a.2));
            if best_per_model.len() < opts.sources_k {
                let e = at(
                    "prompt_id",
                    format!(
                        "{:?} has responses from {} source model(s); --sources-k is {}",
                        t.prompt_id,
                        best_per_model.len(),
                        opts.sources_k
                    ),
                );
                unusable(&mut report, DropReason::TooFewSources, e)?;
                continue;
            }
            let hi = first_by(&t.scores, |a, b| a > b);
            let lo = first_by(&t.scores, |a, b| a < b);
            if t.scores[hi] == t.scores[lo] {
                let e = at("scores", String::new());
                unusable(&mut report, DropReason::Tie, e)?;
                continue;
            }
            let mut chosen: Vec<Value> = best_per_model[..opts.sources_k]
                .iter()
                .map(|b| assistant(b.1))
                .collect();
            chosen.push(assistant(&t.responses[hi]));
            out.wrpo.push(json!({
                "prompt_id": t.prompt_id,
                "prompt": g.prompt,
                "chosen": chosen,
                "rejected": [assistant(&t.responses[lo])],
            }));
        }
        report.target_rows = Some(usable);
        report.kept = out.wrpo.len();
        report.without_targets = groups
            .iter()
            .filter(|g| !sft_ids.contains(g.prompt_id.as_str()) && !seen.contains_key(&g.prompt_id))
            .count();
    }
    out.report = report;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: &str = "sources.jsonl";
    const T: &str = "targets.jsonl";

    fn src(lines: &[Value]) -> Vec<Result<SourceRow, RowError>> {
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        parse_sources(Path::new(S), &text)
    }

    fn tgt(lines: &[Value]) -> Vec<Result<TargetRow, RowError>> {
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        parse_targets(Path::new(T), &text)
    }

    fn opts(k: usize, skip: bool) -> BuildOptions {
        BuildOptions {
            sources_k: k,
            sft_fraction: None,
            seed: 0,
            skip_bad_rows: skip,
        }
    }

    fn s(id: &str, model: &str, resp: &str, score: f64) -> Value {
        json!({"prompt_id": id, "prompt": {"role": "user", "content": format!("q{id}")}, "model": model, "response": resp, "score": score})
    }

    fn t(id: &str, resps: &[&str], scores: &[f64]) -> Value {
        json!({"prompt_id": id, "prompt": format!("q{id}"), "responses": resps, "scores": scores})
    }

    fn contents(v: &Value) -> Vec<&str> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|m| {
                assert_eq!(m["role"], "assistant");
                m["content"].as_str().unwrap()
            })
            .collect()
    }

    fn sources() -> Vec<Value> {
        vec![
            s("1", "a", "a1", 0.5),
            s("1", "b", "b1", 0.9),
            s("1", "a", "a1-better", 0.7),
            s("2", "a", "a2", 0.1),
            s("2", "c", "c2", 0.3),
            s("3", "b", "b3", 1.0),
        ]
    }

    #[test]
    fn picks_best_sources_and_best_and_worst_target() {
        let targets = vec![
            t("2", &["x", "y", "z"], &[0.2, -1.0, 0.8]),
            t("1", &["p", "q"], &[0.0, 0.0]),
            t("3", &["m", "n"], &[1.0, 2.0]),
        ];
        let out = build(src(&sources()), Some(tgt(&targets)), &opts(1, false)).unwrap();
        // Row order follows the targets; prompt 1 is a tie.
        assert_eq!(out.wrpo.len(), 2);
        let r = &out.wrpo[0];
        assert_eq!(r["prompt_id"], "2");
        // The prompt is written as the sources had it (a message); the target's string prompt
        // is the same conversation.
        assert_eq!(r["prompt"], json!({"role": "user", "content": "q2"}));
        assert_eq!(contents(&r["chosen"]), ["c2", "z"]);
        assert_eq!(contents(&r["rejected"]), ["y"]);
        assert_eq!(contents(&out.wrpo[1]["chosen"]), ["b3", "n"]);
        let rep = &out.report;
        assert_eq!((rep.kept, rep.ties(), rep.dropped_total()), (2, 1, 1));
        assert_eq!(rep.dropped[&DropReason::Tie], ["1"]);
        assert_eq!((rep.source_rows, rep.source_prompts), (6, 3));
        assert!(rep.to_string().contains("ties: 1"), "{rep}");
        // K = 2: one response per model, best models first; prompt 3 has one model.
        let targets = vec![t("1", &["p", "q"], &[0.0, 1.0])];
        let out = build(src(&sources()), Some(tgt(&targets)), &opts(2, false)).unwrap();
        assert_eq!(contents(&out.wrpo[0]["chosen"]), ["b1", "a1-better", "q"]);
        let err = build(
            src(&sources()),
            Some(tgt(&[t("3", &["m", "n"], &[1.0, 2.0])])),
            &opts(2, false),
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("targets.jsonl:1: field `prompt_id`: \"3\" has responses from 1 source model(s); --sources-k is 2"), "{msg}");
    }

    #[test]
    fn bad_input_is_an_error_or_a_counted_skip() {
        let mut bad_sources = sources();
        bad_sources.push(json!({"prompt_id": "4", "prompt": "q4", "model": "a", "response": "r"}));
        let e = build(src(&bad_sources), None, &opts(1, false)).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("sources.jsonl:7: field `score`: missing (score the responses first"),
            "{msg}"
        );
        let out = build(src(&bad_sources), None, &opts(1, true)).unwrap();
        assert_eq!(out.report.skipped_rows.len(), 1);
        assert_eq!(out.report.source_prompts, 3);

        let cases: Vec<(Value, &str)> = vec![
            (
                t("9", &["a", "b"], &[1.0, 2.0]),
                "targets.jsonl:1: field `prompt_id`: \"9\" has no source response",
            ),
            (
                t("2", &["a"], &[1.0]),
                "targets.jsonl:1: field `responses`: 1 sample(s)",
            ),
            (
                json!({"prompt_id": "2", "prompt": "q2", "responses": ["a", "b"]}),
                "targets.jsonl:1: field `scores`: missing",
            ),
            (
                json!({"prompt_id": "2", "prompt": "q2", "responses": ["a", "b"], "scores": [1.0]}),
                "field `scores`: has 1 scores for 2 responses",
            ),
            (
                json!({"prompt_id": "2", "prompt": "q2", "responses": ["a", "b"], "scores": [1.0, null]}),
                "field `scores[1]`: is null",
            ),
            (
                json!({"prompt": "q2", "responses": ["a", "b"], "scores": [1.0, 2.0]}),
                "field `prompt_id`: missing",
            ),
            (
                t("2", &["a", ""], &[1.0, 2.0]),
                "field `responses[1]`: empty completion",
            ),
            (
                json!({"prompt_id": "2", "prompt": "other", "responses": ["a", "b"], "scores": [1.0, 2.0]}),
                "field `prompt`: differs from the sources' prompt",
            ),
            (
                json!({"skipped": "x.jsonl:3: bad"}),
                "field `skipped`: the row was skipped by an earlier step: x.jsonl:3: bad",
            ),
        ];
        for (row, want) in cases {
            let e = build(
                src(&sources()),
                Some(tgt(std::slice::from_ref(&row))),
                &opts(1, false),
            )
            .unwrap_err();
            let msg = format!("{e:#}");
            assert!(msg.contains(want), "{row}: {msg}");
            // Skipped instead: counted, never silent.
            let out = build(
                src(&sources()),
                Some(tgt(std::slice::from_ref(&row))),
                &opts(1, true),
            )
            .unwrap();
            assert_eq!(out.wrpo.len(), 0);
            assert_eq!(
                out.report.skipped_rows.len() + out.report.dropped_total(),
                1,
                "{row}"
            );
        }
        // Duplicate prompt_id in targets.
        let dup = vec![
            t("2", &["a", "b"], &[1.0, 2.0]),
            t("2", &["a", "b"], &[1.0, 2.0]),
        ];
        let msg = format!(
            "{:#}",
            build(src(&sources()), Some(tgt(&dup)), &opts(1, false)).unwrap_err()
        );
        assert!(
            msg.contains(
                "targets.jsonl:2: field `prompt_id`: duplicate prompt_id \"2\" (first at line 1)"
            ),
            "{msg}"
        );
        // A source row whose prompt differs from an earlier row of the same id.
        let mut clash = sources();
        clash.push(
            json!({"prompt_id": "1", "prompt": "something else", "response": "r", "score": 1.0}),
        );
        let msg = format!(
            "{:#}",
            build(src(&clash), None, &opts(1, false)).unwrap_err()
        );
        assert!(msg.contains("sources.jsonl:7: field `prompt`: differs from the prompt of prompt_id \"1\" at sources.jsonl:1"), "{msg}");
    }

    #[test]
    fn sft_split_is_seeded_exact_and_independent_of_order() {
        let many: Vec<Value> = (0..30)
            .map(|i| s(&format!("p{i:02}"), "a", &format!("r{i}"), i as f64))
            .collect();
        let o = |seed| BuildOptions {
            sources_k: 1,
            sft_fraction: Some(0.333),
            seed,
            skip_bad_rows: false,
        };
        let a = build(src(&many), None, &o(5)).unwrap();
        assert_eq!((a.sft.len(), a.prompts.len()), (10, 20));
        let mut reversed = many.clone();
        reversed.reverse();
        let b = build(src(&reversed), None, &o(5)).unwrap();
        let ids = |v: &[Value]| {
            let mut x: Vec<String> = v.iter().map(|r| r["prompt_id"].to_string()).collect();
            x.sort();
            x
        };
        assert_eq!(ids(&a.sft), ids(&b.sft));
        let c = build(src(&many), None, &o(6)).unwrap();
        assert_ne!(ids(&a.sft), ids(&c.sft));
        // SFT rows hold the best source response; the WRPO split's prompts are sample input.
        let r = &a.sft[0];
        let i: usize = r["prompt_id"].as_str().unwrap()[1..].parse().unwrap();
        assert_eq!(contents(&r["chosen"]), [format!("r{i}").as_str()]);
        assert_eq!(a.prompts[0].as_object().unwrap().len(), 2);
        // Targets of SFT-split prompts are counted, not used; WRPO prompts without targets too.
        let sft_id = r["prompt_id"].as_str().unwrap();
        let wrpo_id = a.prompts[0]["prompt_id"].as_str().unwrap();
        let targets = vec![
            json!({"prompt_id": sft_id, "prompt": {"role": "user", "content": format!("q{sft_id}")}, "responses": ["a", "b"], "scores": [1.0, 2.0]}),
            json!({"prompt_id": wrpo_id, "prompt": {"role": "user", "content": format!("q{wrpo_id}")}, "responses": ["a", "b"], "scores": [1.0, 2.0]}),
        ];
        let out = build(src(&many), Some(tgt(&targets)), &o(5)).unwrap();
        assert_eq!(out.wrpo.len(), 1);
        assert_eq!(out.report.targets_in_sft_split, 1);
        assert_eq!(out.report.without_targets, 19);
    }
}
