//! Tokenizer (`tokenizer.json` through the `tokenizers` crate) and chat template
//! (`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`) rendered with minijinja,
//! configured like transformers' `apply_chat_template` (trim_blocks, lstrip_blocks, loop controls,
//! Python string methods, `raise_exception`, `strftime_now`, `tools`/`documents` = none).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use minijinja::{context, Environment, Error as JinjaError, ErrorKind, Value};
use serde::Serialize;
use serde_json::Value as Json;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, `tool`, `ipython` or `developer`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// A loaded tokenizer with its special tokens and chat template.
pub struct TextTokenizer {
    tok: tokenizers::Tokenizer,
    template: Option<String>,
    env: Environment<'static>,
    /// Beginning-of-sequence token and id, from `tokenizer_config.json`.
    pub bos: Option<(String, u32)>,
    /// End-of-sequence token and id (appended to plain-text completions).
    pub eos: Option<(String, u32)>,
    /// Padding token and id, if configured (padding positions are masked, so any id works).
    pub pad: Option<(String, u32)>,
    /// Folder it was loaded from.
    pub dir: PathBuf,
}

/// `"<s>"` or `{"content": "<s>", ...}` (an AddedToken dict) → the token text.
fn token_text(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// Load `DIR/tokenizer.json` plus `tokenizer_config.json` and `chat_template.jinja` if present.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let json = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let read_opt = |name: &str| -> Result<Option<String>> {
            let p = dir.join(name);
            if p.is_file() {
                Ok(Some(std::fs::read_to_string(&p).with_context(|| {
                    format!("{}: cannot read", p.display())
                })?))
            } else {
                Ok(None)
            }
        };
        let config = read_opt("tokenizer_config.json")?;
        let jinja = read_opt("chat_template.jinja")?;
        Self::from_parts(dir, &json, config.as_deref(), jinja.as_deref())
    }

    /// Build from file contents; `dir` names the source in error messages.
    pub fn from_parts(
        dir: &Path,
        tokenizer_json: &str,
        tokenizer_config: Option<&str>,
        chat_template_jinja: Option<&str>,
    ) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let tok: tokenizers::Tokenizer = tokenizer_json
            .parse()
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Json = match tokenizer_config {
            Some(text) => serde_json::from_str(text)
                .map_err(|e| anyhow!("{}: invalid JSON: {e}", cfg_path.display()))?,
            None => Json::Null,
        };
        // transformers prefers chat_template.jinja over the config's `chat_template`.
        let template = match chat_template_jinja {
            Some(t) => Some(t.to_string()),
            None => match cfg.get("chat_template") {
                Some(Json::String(s)) => Some(s.clone()),
                // A list of named templates: transformers uses the one named "default".
                Some(Json::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(Json::as_str)
                    .map(str::to_string),
                _ => None,
            },
        };
        let lookup = |field: &str| -> Result<Option<(String, u32)>> {
            match token_text(cfg.get(field)) {
                None => Ok(None),
                Some(t) => match tok.token_to_id(&t) {
                    Some(id) => Ok(Some((t, id))),
                    None => bail!(
                        "{}: {field} {t:?} is not in tokenizer.json",
                        cfg_path.display()
                    ),
                },
            }
        };
        let (bos, eos, pad) = (
            lookup("bos_token")?,
            lookup("eos_token")?,
            lookup("pad_token")?,
        );
        Ok(Self {
            tok,
            template,
            env: chat_env(),
            bos,
            eos,
            pad,
            dir: dir.to_path_buf(),
        })
    }

    /// Number of token ids the tokenizer can produce (base vocabulary + added tokens).
    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    /// Whether a chat template is configured.
    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// Token ids of `text`; `add_special_tokens` runs the tokenizer's post-processor (e.g. BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .tok
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("tokenizer: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decode ids back to text (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tok
            .decode(ids, false)
            .map_err(|e| anyhow!("tokenizer: {e}"))
    }

    /// Decode generated ids to text, dropping special tokens (what `batch_decode(...,
    /// skip_special_tokens=True)` and vLLM return as a response).
    pub fn decode_text(&self, ids: &[u32]) -> Result<String> {
        self.tok
            .decode(ids, true)
            .map_err(|e| anyhow!("tokenizer: {e}"))
    }

    /// The id of a token (special or not), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tok.token_to_id(token)
    }

    /// Render `messages` with the chat template, as `apply_chat_template(tokenize=False)`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let Some(src) = &self.template else {
            bail!(
                "{}: the tokenizer has no chat template (no chat_template.jinja and no chat_template in tokenizer_config.json); use plain-string rows or add a template",
                self.dir.display()
            );
        };
        let tmpl = self.env.template_from_str(src).map_err(|e| {
            anyhow!(
                "{}: chat template does not compile: {e:#}",
                self.dir.display()
            )
        })?;
        let tok =
            |t: &Option<(String, u32)>| t.as_ref().map(|(s, _)| s.clone()).unwrap_or_default();
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => tok(&self.bos),
            eos_token => tok(&self.eos),
            pad_token => tok(&self.pad),
            tools => Value::from(()),
            documents => Value::from(()),
        })
        .map_err(|e| anyhow!("{}: chat template failed: {e:#}", self.dir.display()))
    }

    /// `apply_chat_template(tokenize=True)`: render, then encode without adding special tokens
    /// (the template carries them).
    pub fn chat_ids(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Vec<u32>> {
        self.encode(&self.render(messages, add_generation_prompt)?, false)
    }
}

fn chat_env() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<Value, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", |fmt: String| -> String {
        strftime_now(&fmt)
    });
    env
}

/// A small `strftime` for the formats chat templates use (`%d %b %Y`, `%Y-%m-%d`, …), in UTC.
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    format_time(secs, fmt)
}

fn format_time(secs: i64, fmt: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out += &format!("{d:02}"),
            Some('m') => out += &format!("{m:02}"),
            Some('Y') => out += &y.to_string(),
            Some('y') => out += &format!("{:02}", y % 100),
            Some('b') => out += &MONTHS[(m - 1) as usize][..3],
            Some('B') => out += MONTHS[(m - 1) as usize],
            Some('H') => out += &format!("{:02}", rem / 3600),
            Some('M') => out += &format!("{:02}", rem % 3600 / 60),
            Some('S') => out += &format!("{:02}", rem % 60),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_formats() {
        // 2024-07-23 14:05:09 UTC
        assert_eq!(
            format_time(1_721_743_509, "%d %b %Y %H:%M:%S"),
            "23 Jul 2024 14:05:09"
        );
        assert_eq!(format_time(0, "%Y-%m-%d %B"), "1970-01-01 January");
    }

    #[test]
    fn python_methods_and_raise() {
        let env = chat_env();
        let t = env
            .template_from_str("{{ ' x '.strip() }}|{% if 'ab'.startswith('a') %}y{% endif %}")
            .unwrap();
        assert_eq!(t.render(()).unwrap(), "x|y");
        let t = env
            .template_from_str("{{ raise_exception('bad role') }}")
            .unwrap();
        assert!(t.render(()).unwrap_err().to_string().contains("bad role"));
    }
}
