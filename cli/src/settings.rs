//! The training settings as flags: one `--kebab-case` flag per entry of the engine's
//! [`SETTINGS`] table (name, documentation, value kind), collected by name into the engine's
//! [`TrainArgs`]. The engine knows nothing of clap; this is the only place the two meet.

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Arg, ArgAction, ArgMatches, Command};
use serde_json::{Map, Value};
use wrpo_engine_core::train::config::{Choice, Kind, TrainArgs, SETTINGS};

/// [`TrainArgs`] from the command line.
#[derive(Debug, Clone, Default)]
pub struct Settings(pub TrainArgs);

fn flag(name: &str) -> String {
    name.replace('_', "-")
}

/// The possible values of a [`Kind::Choice`], documented.
fn possible(values: &'static [(&'static str, &'static str)]) -> PossibleValuesParser {
    PossibleValuesParser::new(values.iter().map(|(n, d)| PossibleValue::new(*n).help(*d)))
}

/// A value parser for an engine enum (its serde names, each documented).
pub fn choice<T: Choice + Clone + Send + Sync + 'static>() -> impl TypedValueParser<Value = T> {
    possible(T::VALUES).map(|s| T::from_name(&s).expect("a listed value"))
}

fn arg(s: &wrpo_engine_core::train::config::Setting) -> Arg {
    let doc = s.doc.trim().replace('\n', " ");
    let doc = doc.split_whitespace().collect::<Vec<_>>().join(" ");
    let help = doc
        .split(". ")
        .next()
        .unwrap_or(&doc)
        .trim_end_matches('.')
        .to_string();
    let mut a = Arg::new(s.name)
        .long(&*Box::leak(flag(s.name).into_boxed_str()))
        .help(help)
        .long_help(doc)
        .value_name(&*Box::leak(s.name.to_uppercase().into_boxed_str()))
        .action(ArgAction::Set);
    a = match s.kind {
        Kind::Bool => a.value_name("BOOL").value_parser(clap::value_parser!(bool)),
        Kind::Unsigned => a.value_parser(clap::value_parser!(u64)),
        Kind::Signed => a
            .allow_negative_numbers(true)
            .value_parser(clap::value_parser!(i64)),
        Kind::Float => {
            a.allow_negative_numbers(true)
                .value_parser(|v: &str| -> Result<f64, String> {
                    match v.parse::<f64>() {
                        Ok(x) if x.is_finite() => Ok(x),
                        Ok(_) => Err(format!("{v} is not a finite number")),
                        Err(e) => Err(e.to_string()),
                    }
                })
        }
        Kind::Choice(values) => a.value_parser(possible(values)),
        Kind::Text => a.value_parser(clap::value_parser!(String)),
    };
    if let Some(alias) = s.alias {
        a = a.visible_alias(alias);
    }
    a
}

impl clap::Args for Settings {
    fn augment_args(cmd: Command) -> Command {
        SETTINGS.iter().fold(cmd, |cmd, s| cmd.arg(arg(s)))
    }
    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl clap::FromArgMatches for Settings {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let mut map = Map::new();
        for s in SETTINGS {
            let v = match s.kind {
                Kind::Bool => m.get_one::<bool>(s.name).map(|&b| Value::from(b)),
                Kind::Unsigned => m.get_one::<u64>(s.name).map(|&x| Value::from(x)),
                Kind::Signed => m.get_one::<i64>(s.name).map(|&x| Value::from(x)),
                Kind::Float => m.get_one::<f64>(s.name).map(|&x| Value::from(x)),
                Kind::Choice(_) | Kind::Text => {
                    m.get_one::<String>(s.name).map(|x| Value::from(x.clone()))
                }
            };
            if let Some(v) = v {
                map.insert(s.name.to_string(), v);
            }
        }
        serde_json::from_value(Value::Object(map))
            .map(Settings)
            .map_err(|e| clap::Error::raw(clap::error::ErrorKind::ValueValidation, e))
    }
    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        let new = Self::from_arg_matches(m)?;
        self.0 = new.0.or(std::mem::take(&mut self.0));
        Ok(())
    }
}
