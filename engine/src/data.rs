//! WRPO rows: reading (JSON Lines or a JSON array), validation with file:line:field errors, and
//! tokenisation into prompt + completion ids.
//!
//! Row format (the WRPO authors'): `prompt` is a message, a list of messages or a string;
//! `chosen` lists the K ≥ 1 source responses then the target's response; `rejected` lists R ≥ 1
//! responses. Each response is a string, an assistant message, or a list of messages. Pre-tokenized
//! rows `{"prompt_input_ids", "chosen_input_ids", "rejected_input_ids"}` are used as given.
//!
//! Tokenisation (TRL 1.x convention, see ../shared/reference/WRPO.md):
//! - conversational rows (any message in the row): prompt = template(prompt messages, generation
//!   prompt on); completion = template(prompt + response) with the prompt ids removed — an error if
//!   the prompt ids are not a prefix. A string prompt becomes one user message, a string response
//!   one assistant message.
//! - plain rows (only strings): prompt = tokenizer(prompt) with special tokens (BOS where the
//!   tokenizer adds it); completion = tokenizer(text, no special tokens) + EOS.
//! - truncation: if prompt + longest completion > `max_length`, keep the last `max_prompt_length`
//!   prompt tokens, then cut every completion to `max_length − prompt length`.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{value::RawValue, Value};

use crate::tokenizer::{Message, TextTokenizer};

/// Roles accepted in messages.
pub const ROLES: [&str; 6] = [
    "system",
    "user",
    "assistant",
    "tool",
    "ipython",
    "developer",
];

/// A prompt or a response.
#[derive(Debug, Clone, PartialEq)]
pub enum Text {
    /// Plain text.
    Plain(String),
    /// Chat messages.
    Messages(Vec<Message>),
}

/// The content of a row.
#[derive(Debug, Clone, PartialEq)]
pub enum RowBody {
    /// Text (to be tokenised).
    Text {
        /// The prompt.
        prompt: Text,
        /// K sources then the target's best response.
        chosen: Vec<Text>,
        /// R rejected responses.
        rejected: Vec<Text>,
    },
    /// Token ids used as given.
    Tokens {
        /// Prompt ids.
        prompt: Vec<u32>,
        /// Chosen completion ids.
        chosen: Vec<Vec<u32>>,
        /// Rejected completion ids.
        rejected: Vec<Vec<u32>>,
    },
}

/// One parsed row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// 1-based line of the row in its file.
    pub line: usize,
    /// `prompt_id`, if the row has one.
    pub prompt_id: Option<String>,
    /// Content.
    pub body: RowBody,
    /// For a row validated as a WRPO row but written in another shape (an SFT row, see
    /// [`parse_sft_row`]): the fields of the row as written that hold the prompt and the
    /// completion, e.g. `("messages", "messages[2]")`. Errors name them instead of `prompt` and
    /// `chosen[0]` / `rejected[0]`.
    pub written_as: Option<(String, String)>,
}

impl Row {
    /// `field` (a field of the WRPO row this row is validated as) as a field of the row as
    /// written.
    pub fn field_as_written(&self, field: String) -> String {
        match &self.written_as {
            None => field,
            Some((prompt, completion)) => rename_field(field, prompt, completion),
        }
    }
}

/// `prompt…` → `{prompt}…`, `chosen[0]…` and `rejected[0]…` → `{completion}…`.
fn rename_field(field: String, prompt: &str, completion: &str) -> String {
    for (from, to) in [
        ("chosen[0]", completion),
        ("rejected[0]", completion),
        ("prompt", prompt),
    ] {
        if let Some(rest) = field.strip_prefix(from) {
            if rest.is_empty() || rest.starts_with(['.', '[']) {
                return format!("{to}{rest}");
            }
        }
    }
    field
}

/// A bad row: file, line, field and what is wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct RowError {
    /// The data file.
    pub path: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// Field path such as `chosen[1].role` (empty when the row as a whole is bad: not valid JSON,
    /// or not a JSON object).
    pub field: String,
    /// The problem.
    pub msg: String,
}

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}:{}: {}", self.path.display(), self.line, self.msg)
        } else {
            write!(
                f,
                "{}:{}: field `{}`: {}",
                self.path.display(),
                self.line,
                self.field,
                self.msg
            )
        }
    }
}

impl std::error::Error for RowError {}

/// A problem in one row: (field path, message). [`RowError::at`] adds file and line.
pub type FieldError = (String, String);

impl RowError {
    /// A [`FieldError`] located at `path:line`.
    pub fn at(path: &Path, line: usize, (field, msg): FieldError) -> Self {
        Self {
            path: path.to_path_buf(),
            line,
            field,
            msg,
        }
    }
}

/// A [`FieldError`].
pub fn ferr(field: impl Into<String>, msg: impl Into<String>) -> FieldError {
    (field.into(), msg.into())
}

/// Read every row of a file. The outer error is for the file as a whole (unreadable, not JSON);
/// each row is parsed on its own so the caller can fail or skip.
pub fn read_rows(path: &Path) -> Result<Vec<Result<Row, RowError>>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    parse_rows(path, &text)
}

/// [`read_rows`] on text already in memory; `path` names it in errors.
pub fn parse_rows(path: &Path, text: &str) -> Result<Vec<Result<Row, RowError>>> {
    parse_rows_with(path, text, &parse_row)
}

/// A row validator: JSON value and line → row, or the failing field and why.
pub type RowParser = dyn Fn(&Value, usize) -> Result<Row, FieldError>;

/// [`parse_rows`] with another row validator (e.g. [`parse_sft_row`]).
pub fn parse_rows_with(
    path: &Path,
    text: &str,
    parser: &RowParser,
) -> Result<Vec<Result<Row, RowError>>> {
    let mut out = Vec::new();
    if text.trim_start().starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(text).map_err(|e| {
            anyhow::anyhow!("{}:{}: invalid JSON array: {e}", path.display(), e.line())
        })?;
        for raw in items {
            let offset = raw.get().as_ptr() as usize - text.as_ptr() as usize;
            let line = 1 + text[..offset].bytes().filter(|&b| b == b'\n').count();
            out.push(parse_value(path, line, raw.get(), parser));
        }
    } else {
        for (i, l) in text.lines().enumerate() {
            if !l.trim().is_empty() {
                out.push(parse_value(path, i + 1, l, parser));
            }
        }
    }
    Ok(out)
}

fn parse_value(path: &Path, line: usize, src: &str, parser: &RowParser) -> Result<Row, RowError> {
    let mk = |(field, msg): FieldError| RowError {
        path: path.to_path_buf(),
        line,
        field,
        msg,
    };
    let v: Value =
        serde_json::from_str(src).map_err(|e| mk(ferr("", format!("invalid JSON: {e}"))))?;
    parser(&v, line).map_err(mk)
}

/// Validate one JSON row.
pub fn parse_row(v: &Value, line: usize) -> Result<Row, FieldError> {
    let obj = v
        .as_object()
        .ok_or_else(|| ferr("", "a row must be a JSON object"))?;
    let prompt_id = parse_prompt_id(obj.get("prompt_id"))?;
    let body = if obj.contains_key("prompt_input_ids") {
        RowBody::Tokens {
            prompt: ids(obj.get("prompt_input_ids"), "prompt_input_ids", true)?,
            chosen: id_lists(obj.get("chosen_input_ids"), "chosen_input_ids")?,
            rejected: id_lists(obj.get("rejected_input_ids"), "rejected_input_ids")?,
        }
    } else {
        let prompt = parse_prompt(obj.get("prompt"))?;
        RowBody::Text {
            prompt,
            chosen: responses(obj.get("chosen"), "chosen")?,
            rejected: responses(obj.get("rejected"), "rejected")?,
        }
    };
    Ok(Row {
        line,
        prompt_id,
        body,
        written_as: None,
    })
}

/// `prompt_id`: a string or a number (kept as its decimal text); absent or null → `None`.
pub fn parse_prompt_id(v: Option<&Value>) -> Result<Option<String>, FieldError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(ferr("prompt_id", "must be a string")),
    }
}

/// `prompt`: a string, a message, or a non-empty list of messages.
pub fn parse_prompt(v: Option<&Value>) -> Result<Text, FieldError> {
    Ok(match v {
        None => return Err(ferr("prompt", "missing")),
        Some(Value::String(s)) => Text::Plain(s.clone()),
        Some(m @ Value::Object(_)) => Text::Messages(vec![message(m, "prompt", false)?]),
        Some(Value::Array(a)) => {
            if a.is_empty() {
                return Err(ferr("prompt", "empty message list"));
            }
            Text::Messages(
                a.iter()
                    .enumerate()
                    .map(|(i, m)| message(m, &format!("prompt[{i}]"), false))
                    .collect::<Result<_, _>>()?,
            )
        }
        Some(_) => {
            return Err(ferr(
                "prompt",
                "must be a string, a message or a list of messages",
            ))
        }
    })
}

fn message(v: &Value, field: &str, completion: bool) -> Result<Message, FieldError> {
    let o = v.as_object().ok_or_else(|| {
        ferr(
            field,
            "a message must be an object with `role` and `content`",
        )
    })?;
    let role = match o.get("role") {
        Some(Value::String(r)) => r.clone(),
        Some(_) => return Err(ferr(format!("{field}.role"), "must be a string")),
        None => return Err(ferr(format!("{field}.role"), "missing")),
    };
    if !ROLES.contains(&role.as_str()) {
        return Err(ferr(
            format!("{field}.role"),
            format!(
                "unknown role {role:?} (expected one of {})",
                ROLES.join(", ")
            ),
        ));
    }
    if completion && role != "assistant" {
        return Err(ferr(
            format!("{field}.role"),
            format!("a response must be an assistant message, found {role:?}"),
        ));
    }
    let content = match o.get("content") {
        Some(Value::String(c)) => c.clone(),
        Some(_) => return Err(ferr(format!("{field}.content"), "must be a string")),
        None => return Err(ferr(format!("{field}.content"), "missing")),
    };
    Ok(Message { role, content })
}

fn responses(v: Option<&Value>, field: &str) -> Result<Vec<Text>, FieldError> {
    let a = match v {
        None => return Err(ferr(field, "missing")),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ferr(field, "must be a list of responses")),
    };
    if a.is_empty() {
        return Err(ferr(field, "must hold at least one response"));
    }
    a.iter()
        .enumerate()
        .map(|(i, item)| parse_response(item, &format!("{field}[{i}]")))
        .collect()
}

/// One response at `field`: a non-empty string, an assistant message, or a non-empty list of
/// assistant messages.
pub fn parse_response(item: &Value, field: &str) -> Result<Text, FieldError> {
    let f = field.to_string();
    match item {
        Value::String(s) if s.is_empty() => Err(ferr(f, "empty completion")),
        Value::String(s) => Ok(Text::Plain(s.clone())),
        Value::Object(_) => {
            let m = message(item, &f, true)?;
            if m.content.is_empty() {
                return Err(ferr(format!("{f}.content"), "empty completion"));
            }
            Ok(Text::Messages(vec![m]))
        }
        Value::Array(ms) if !ms.is_empty() => Ok(Text::Messages(
            ms.iter()
                .enumerate()
                .map(|(j, m)| message(m, &format!("{f}[{j}]"), true))
                .collect::<Result<_, _>>()?,
        )),
        _ => Err(ferr(
            f,
            "must be a string, an assistant message or a non-empty list of messages",
        )),
    }
}

fn ids(v: Option<&Value>, field: &str, allow_empty: bool) -> Result<Vec<u32>, FieldError> {
    let a = v
        .and_then(Value::as_array)
        .ok_or_else(|| ferr(field, "missing or not a list of token ids"))?;
    if a.is_empty() && !allow_empty {
        return Err(ferr(field, "empty completion"));
    }
    a.iter()
        .enumerate()
        .map(|(i, x)| {
            x.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| ferr(format!("{field}[{i}]"), format!("{x} is not a token id")))
        })
        .collect()
}

fn id_lists(v: Option<&Value>, field: &str) -> Result<Vec<Vec<u32>>, FieldError> {
    let a = v
        .and_then(Value::as_array)
        .ok_or_else(|| ferr(field, "missing or not a list of id lists"))?;
    if a.is_empty() {
        return Err(ferr(field, "must hold at least one completion"));
    }
    a.iter()
        .enumerate()
        .map(|(i, x)| ids(Some(x), &format!("{field}[{i}]"), false))
        .collect()
}

/// Tokenisation settings.
#[derive(Debug, Clone, Default)]
pub struct EncodeOptions {
    /// Longest prompt + completion, in tokens.
    pub max_length: Option<usize>,
    /// Prompt tokens kept (from the end) when a row is too long.
    pub max_prompt_length: Option<usize>,
    /// The model's vocabulary size: ids at or above it are rejected.
    pub vocab_size: usize,
}

/// A tokenised row.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// 1-based line in the data file.
    pub line: usize,
    /// Prompt ids.
    pub prompt: Vec<u32>,
    /// Chosen completion ids (K sources, then the target).
    pub chosen: Vec<Vec<u32>>,
    /// Rejected completion ids.
    pub rejected: Vec<Vec<u32>>,
}

impl Text {
    /// The messages of this text; plain text becomes one message of role `as_role`.
    pub fn messages(&self, as_role: &str) -> Vec<Message> {
        match self {
            Text::Plain(s) => vec![Message {
                role: as_role.into(),
                content: s.clone(),
            }],
            Text::Messages(m) => m.clone(),
        }
    }
}

/// Tokenise and truncate one row. Errors name the row's fields as written: `prompt_input_ids`,
/// `chosen_input_ids[i]`, … for pre-tokenized rows; see [`Row::written_as`].
pub fn encode_row(
    tok: Option<&TextTokenizer>,
    row: &Row,
    opts: &EncodeOptions,
) -> Result<Encoded, FieldError> {
    encode(tok, row, opts).map_err(|(field, msg)| (row.field_as_written(field), msg))
}

fn encode(
    tok: Option<&TextTokenizer>,
    row: &Row,
    opts: &EncodeOptions,
) -> Result<Encoded, FieldError> {
    let (prompt_name, chosen_name, rejected_name) = match &row.body {
        RowBody::Tokens { .. } => ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"),
        RowBody::Text { .. } => ("prompt", "chosen", "rejected"),
    };
    let (prompt, mut chosen, mut rejected) = match &row.body {
        RowBody::Tokens {
            prompt,
            chosen,
            rejected,
        } => (prompt.clone(), chosen.clone(), rejected.clone()),
        RowBody::Text {
            prompt,
            chosen,
            rejected,
        } => {
            let tok = tok.ok_or_else(|| {
                ferr(
                    "prompt",
                    "text rows need a tokenizer (tokenizer.json in the model folder)",
                )
            })?;
            let conversational = matches!(prompt, Text::Messages(_))
                || chosen
                    .iter()
                    .chain(rejected)
                    .any(|c| matches!(c, Text::Messages(_)));
            let tk =
                |field: &str, r: Result<Vec<u32>>| r.map_err(|e| ferr(field, format!("{e:#}")));
            if conversational {
                let pm = prompt.messages("user");
                let p = tk("prompt", tok.chat_ids(&pm, true))?;
                let complete = |field: String, c: &Text| -> Result<Vec<u32>, FieldError> {
                    let mut all = pm.clone();
                    all.extend(c.messages("assistant"));
                    let full = tk(&field, tok.chat_ids(&all, false))?;
                    if full.len() < p.len() || full[..p.len()] != p[..] {
                        return Err(ferr(field, "the chat template's rendering of prompt + response does not start with its rendering of the prompt (with the generation prompt), so the completion cannot be separated"));
                    }
                    Ok(full[p.len()..].to_vec())
                };
                let ch = chosen
                    .iter()
                    .enumerate()
                    .map(|(i, c)| complete(format!("chosen[{i}]"), c))
                    .collect::<Result<Vec<_>, _>>()?;
                let rj = rejected
                    .iter()
                    .enumerate()
                    .map(|(i, c)| complete(format!("rejected[{i}]"), c))
                    .collect::<Result<Vec<_>, _>>()?;
                (p, ch, rj)
            } else {
                let Text::Plain(ptext) = prompt else {
                    unreachable!("plain row")
                };
                let eos = tok.eos.as_ref().map(|(_, id)| *id).ok_or_else(|| {
                    ferr(
                        "chosen",
                        "plain-text completions need an eos_token in tokenizer_config.json",
                    )
                })?;
                let p = tk("prompt", tok.encode(ptext, true))?;
                let plain = |field: String, c: &Text| -> Result<Vec<u32>, FieldError> {
                    let Text::Plain(s) = c else {
                        unreachable!("plain row")
                    };
                    let mut ids = tk(&field, tok.encode(s, false))?;
                    ids.push(eos);
                    Ok(ids)
                };
                let ch = chosen
                    .iter()
                    .enumerate()
                    .map(|(i, c)| plain(format!("chosen[{i}]"), c))
                    .collect::<Result<Vec<_>, _>>()?;
                let rj = rejected
                    .iter()
                    .enumerate()
                    .map(|(i, c)| plain(format!("rejected[{i}]"), c))
                    .collect::<Result<Vec<_>, _>>()?;
                (p, ch, rj)
            }
        }
    };
    for (field, seq) in std::iter::once((prompt_name.to_string(), &prompt))
        .chain(
            chosen
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("{chosen_name}[{i}]"), c)),
        )
        .chain(
            rejected
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("{rejected_name}[{i}]"), c)),
        )
    {
        if field != prompt_name && seq.is_empty() {
            return Err(ferr(field, "empty completion"));
        }
        if let Some(bad) = seq.iter().find(|&&id| id as usize >= opts.vocab_size) {
            return Err(ferr(
                field,
                format!(
                    "token id {bad} is outside the model's vocabulary ({})",
                    opts.vocab_size
                ),
            ));
        }
    }
    let mut prompt = prompt;
    if let Some(max_len) = opts.max_length {
        let longest = chosen
            .iter()
            .chain(&rejected)
            .map(Vec::len)
            .max()
            .unwrap_or(0);
        if prompt.len() + longest > max_len {
            if let Some(mp) = opts.max_prompt_length {
                if prompt.len() > mp {
                    prompt.drain(..prompt.len() - mp);
                }
            }
            let room = max_len.saturating_sub(prompt.len());
            for (name, list) in [(chosen_name, &mut chosen), (rejected_name, &mut rejected)] {
                for (i, c) in list.iter_mut().enumerate() {
                    c.truncate(room);
                    if c.is_empty() {
                        return Err(ferr(
                            format!("{name}[{i}]"),
                            format!("truncation leaves the completion empty (prompt {} tokens, max_length {max_len}; set max_prompt_length below max_length)", prompt.len()),
                        ));
                    }
                }
            }
        }
    }
    Ok(Encoded {
        line: row.line,
        prompt,
        chosen,
        rejected,
    })
}

/// Rows of a file, tokenised. Bad rows fail the load, or are skipped and counted with
/// `skip_bad_rows`.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Tokenised rows in file order.
    pub rows: Vec<Encoded>,
    /// Rows skipped as bad (only with `skip_bad_rows`), with their errors.
    pub skipped: Vec<RowError>,
}

impl Dataset {
    /// Read, validate and tokenise `path`.
    pub fn load(
        path: &Path,
        tok: Option<&TextTokenizer>,
        opts: &EncodeOptions,
        skip_bad_rows: bool,
    ) -> Result<Self> {
        Self::from_rows(path, read_rows(path)?, tok, opts, skip_bad_rows)
    }

    /// Validate and tokenise rows read with [`read_rows`] or [`parse_rows`].
    pub fn from_rows(
        path: &Path,
        parsed_rows: Vec<Result<Row, RowError>>,
        tok: Option<&TextTokenizer>,
        opts: &EncodeOptions,
        skip_bad_rows: bool,
    ) -> Result<Self> {
        let mut rows = Vec::new();
        let mut skipped = Vec::new();
        for parsed in parsed_rows {
            let result = parsed.and_then(|row| {
                encode_row(tok, &row, opts).map_err(|(field, msg)| RowError {
                    path: path.to_path_buf(),
                    line: row.line,
                    field,
                    msg,
                })
            });
            match result {
                Ok(e) => rows.push(e),
                Err(e) if skip_bad_rows => skipped.push(e),
                Err(e) => {
                    return Err(anyhow::Error::new(e)
                        .context("bad row (pass --skip-bad-rows to skip such rows)"))
                }
            }
        }
        if rows.is_empty() {
            anyhow::bail!(
                "{}: no usable rows{}",
                path.display(),
                if skipped.is_empty() {
                    String::new()
                } else {
                    format!(" ({} skipped as bad)", skipped.len())
                }
            );
        }
        Ok(Self { rows, skipped })
    }
}

/// Validate one supervised fine-tuning row as a [`Row`] whose single chosen response is the
/// target (and whose `rejected` repeats it, so WRPO tokenisation and truncation apply unchanged).
/// Accepted forms: `{"messages": [..., {"role": "assistant", ...}]}` (the last message is the
/// completion), a WRPO row (`prompt` + `chosen[0]`, the best source response; `rejected` optional),
/// or `{"prompt", "completion"}`. Errors, here and in [`encode_row`], name the fields as written
/// (`messages[3].content`, `completion`), not those of the rewritten row.
pub fn parse_sft_row(v: &Value, line: usize) -> Result<Row, FieldError> {
    let obj = v
        .as_object()
        .ok_or_else(|| ferr("", "a row must be a JSON object"))?;
    let (prompt, completion, written_as) = if let Some(m) = obj.get("messages") {
        let msgs = m
            .as_array()
            .filter(|a| a.len() >= 2)
            .ok_or_else(|| ferr("messages", "must be a list of at least two messages"))?;
        let last_at = format!("messages[{}]", msgs.len() - 1);
        let last = &msgs[msgs.len() - 1];
        let must = "the last message must be the assistant's (the completion to learn)";
        match last.as_object().map(|o| o.get("role")) {
            None => {
                return Err(ferr(
                    last_at,
                    format!("{must}, an object with `role` and `content`"),
                ))
            }
            Some(None) => return Err(ferr(format!("{last_at}.role"), format!("missing ({must})"))),
            Some(Some(role)) if role.as_str() != Some("assistant") => {
                return Err(ferr(format!("{last_at}.role"), must))
            }
            Some(Some(_)) => {}
        }
        (
            Value::Array(msgs[..msgs.len() - 1].to_vec()),
            last.clone(),
            ("messages".to_string(), last_at),
        )
    } else {
        let prompt = obj.get("prompt").cloned().ok_or_else(|| {
            ferr(
                "prompt",
                "missing (an SFT row needs `messages`, or `prompt` with `chosen` or `completion`)",
            )
        })?;
        let (completion, at) = match (obj.get("chosen"), obj.get("completion")) {
            (Some(Value::Array(c)), _) if !c.is_empty() => (c[0].clone(), "chosen[0]"),
            (Some(_), _) => return Err(ferr("chosen", "must hold at least one response")),
            (None, Some(c)) => (c.clone(), "completion"),
            (None, None) => return Err(ferr("completion", "missing (or give `chosen`)")),
        };
        (prompt, completion, ("prompt".to_string(), at.to_string()))
    };
    let mut row = serde_json::Map::new();
    if let Some(id) = obj.get("prompt_id") {
        row.insert("prompt_id".into(), id.clone());
    }
    row.insert("prompt".into(), prompt);
    row.insert("chosen".into(), Value::Array(vec![completion.clone()]));
    row.insert("rejected".into(), Value::Array(vec![completion]));
    let mut parsed = parse_row(&Value::Object(row), line)
        .map_err(|(field, msg)| (rename_field(field, &written_as.0, &written_as.1), msg))?;
    parsed.written_as = Some(written_as);
    Ok(parsed)
}

/// Load `path`, or the bundled dataset of the embedded default when `None`.
pub fn load_or_bundled(
    path: Option<&Path>,
    tok: Option<&TextTokenizer>,
    opts: &EncodeOptions,
    skip_bad_rows: bool,
) -> Result<Dataset> {
    match path {
        Some(path) => {
            crate::model::require_file(path, "--data")?;
            Dataset::load(path, tok, opts, skip_bad_rows)
        }
        None => {
            let label = Path::new(crate::embedded::LABEL).join("wrpo_tiny.jsonl");
            let parsed = parse_rows(&label, crate::embedded::DATASET)?;
            Dataset::from_rows(&label, parsed, tok, opts, skip_bad_rows)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(v: Value) -> (String, String) {
        parse_row(&v, 1).unwrap_err()
    }

    #[test]
    fn field_errors_name_the_field() {
        assert_eq!(err(json!({"chosen": ["a"], "rejected": ["b"]})).0, "prompt");
        assert_eq!(
            err(json!({"prompt": "p", "chosen": [], "rejected": ["b"]})).0,
            "chosen"
        );
        assert_eq!(
            err(json!({"prompt": "p", "chosen": ["a"], "rejected": [""]})).0,
            "rejected[0]"
        );
        let (f, m) = err(
            json!({"prompt": [{"role": "bot", "content": "x"}], "chosen": ["a"], "rejected": ["b"]}),
        );
        assert_eq!(f, "prompt[0].role");
        assert!(m.contains("bot"));
        assert_eq!(err(json!({"prompt": "p", "chosen": ["a", {"role": "assistant", "content": 3}], "rejected": ["b"]})).0, "chosen[1].content");
        assert_eq!(err(json!({"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": ["b"]})).0, "chosen[0].role");
        assert_eq!(err(json!({"prompt_input_ids": [1], "chosen_input_ids": [[1, -2]], "rejected_input_ids": [[1]]})).0, "chosen_input_ids[0][1]");
        assert_eq!(err(json!({"prompt_input_ids": [1], "chosen_input_ids": [[]], "rejected_input_ids": [[1]]})).0, "chosen_input_ids[0]");
    }

    #[test]
    fn truncation_keeps_prompt_end_then_cuts_completions() {
        let row = Row {
            line: 1,
            prompt_id: None,
            body: RowBody::Tokens {
                prompt: (0..10).collect(),
                chosen: vec![(10..16).collect()],
                rejected: vec![(20..23).collect()],
            },
            written_as: None,
        };
        let opts = EncodeOptions {
            max_length: Some(8),
            max_prompt_length: Some(4),
            vocab_size: 100,
        };
        let e = encode_row(None, &row, &opts).unwrap();
        assert_eq!(e.prompt, vec![6, 7, 8, 9]);
        assert_eq!(e.chosen, vec![vec![10, 11, 12, 13]]);
        assert_eq!(e.rejected, vec![vec![20, 21, 22]]);
        // Fits: untouched.
        let opts = EncodeOptions {
            max_length: Some(16),
            max_prompt_length: Some(4),
            vocab_size: 100,
        };
        assert_eq!(encode_row(None, &row, &opts).unwrap().prompt.len(), 10);
        // Prompt alone fills max_length: error, not an empty sequence. A pre-tokenized row's
        // errors name its own fields (issue 16: they named `chosen[0]`, absent from the row).
        let opts = EncodeOptions {
            max_length: Some(8),
            max_prompt_length: None,
            vocab_size: 100,
        };
        assert_eq!(
            encode_row(None, &row, &opts).unwrap_err().0,
            "chosen_input_ids[0]"
        );
        // Out-of-vocabulary ids.
        let opts = EncodeOptions {
            vocab_size: 20,
            ..Default::default()
        };
        assert_eq!(
            encode_row(None, &row, &opts).unwrap_err().0,
            "rejected_input_ids[0]"
        );
        let opts = EncodeOptions {
            vocab_size: 5,
            ..Default::default()
        };
        assert_eq!(
            encode_row(None, &row, &opts).unwrap_err().0,
            "prompt_input_ids"
        );
    }

    /// SFT rows are validated as WRPO rows; their errors still name the fields as written
    /// (issue 16: they named `prompt[0]`, `chosen[0]` of the rewritten row).
    #[test]
    fn sft_errors_name_the_fields_as_written() {
        let err = |v: Value| parse_sft_row(&v, 1).unwrap_err();
        let user = json!({"role": "user", "content": "q"});
        let (f, m) = err(json!({"messages": [user, {"role": "assistant", "content": ""}]}));
        assert_eq!(
            (f.as_str(), m.as_str()),
            ("messages[1].content", "empty completion")
        );
        let bot = json!({"role": "bot", "content": "q"});
        let answer = json!({"role": "assistant", "content": "a"});
        assert_eq!(
            err(json!({"messages": [bot, answer]})).0,
            "messages[0].role"
        );
        assert_eq!(err(json!({"messages": [user, "a"]})).0, "messages[1]");
        let (f, m) = err(json!({"messages": [user, {"content": "a"}]}));
        assert_eq!(f, "messages[1].role");
        assert!(m.starts_with("missing"), "{m}");
        assert_eq!(err(json!({"messages": [user, user]})).0, "messages[1].role");
        assert_eq!(
            err(json!({"prompt": "p", "completion": ""})).0,
            "completion"
        );
        let as_user = json!([{"role": "user", "content": "x"}]);
        assert_eq!(
            err(json!({"prompt": "p", "completion": as_user})).0,
            "completion[0].role"
        );
        assert_eq!(err(json!({"prompt": "p", "chosen": [""]})).0, "chosen[0]");
        assert_eq!(err(json!({"prompt": 3, "completion": "c"})).0, "prompt");
        assert_eq!(
            err(json!({"prompt_id": [], "prompt": "p", "completion": "c"})).0,
            "prompt_id"
        );

        // Encoding errors too.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer-chatml");
        let tok = TextTokenizer::load(&dir).unwrap();
        let opts = EncodeOptions {
            max_length: Some(1),
            max_prompt_length: None,
            vocab_size: tok.vocab_size(),
        };
        let row = parse_sft_row(&json!({"messages": [user, answer]}), 1).unwrap();
        assert_eq!(
            encode_row(Some(&tok), &row, &opts).unwrap_err().0,
            "messages[1]"
        );
        assert_eq!(encode_row(None, &row, &opts).unwrap_err().0, "messages");
        let row = parse_sft_row(&json!({"prompt": "p", "completion": "c"}), 1).unwrap();
        assert_eq!(
            encode_row(Some(&tok), &row, &opts).unwrap_err().0,
            "completion"
        );
        let row = parse_sft_row(&json!({"prompt": "p", "chosen": ["c"]}), 1).unwrap();
        assert_eq!(
            encode_row(Some(&tok), &row, &opts).unwrap_err().0,
            "chosen[0]"
        );
    }

    #[test]
    fn json_array_rows_get_their_line() {
        let dir = std::env::temp_dir().join(format!("wrpo-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("rows.json");
        std::fs::write(&p, "[\n {\"prompt\": \"a\", \"chosen\": [\"x\"], \"rejected\": [\"y\"]},\n\n {\"prompt\": 5}\n]").unwrap();
        let rows = read_rows(&p).unwrap();
        assert_eq!(rows[0].as_ref().unwrap().line, 2);
        let e = rows[1].as_ref().unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (4, "prompt"));
        assert!(e
            .to_string()
            .starts_with(&format!("{}:4: field `prompt`", p.display())));
    }
}
