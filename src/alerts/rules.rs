//! The `[[alert]]` tables of the config file, checked into the rules the dataflow evaluates.
//!
//! ```toml
//! [[alert]]
//! name = "cpu-hot"
//! metric = "cpu"          # cpu, ram, or any extra numeric field
//! aggregate = "avg"       # avg | max | min over each minute of a server (default avg)
//! above = 90.0            # or below = ...
//! for = "3m"              # consecutive complete minutes (default 1m)
//! labels = { severity = "page" }
//!
//! [[alert]]
//! name = "fleet-cpu-p95"
//! metric = "cpu"
//! fleet = "p95"           # avg | min | max | pNN across the servers' per-minute values
//! above = 80.0
//! for = "5m"
//!
//! [[alert]]
//! name = "server-silent"
//! silent_for = "30s"      # no report for this long (a server seen in the last hour)
//! ```
//!
//! Everything is checked when the file is read, so a bad rule stops `fleetflow run` (and
//! `check`) before it starts, with one line naming the rule and what is wrong.

use std::collections::BTreeMap;
use std::time::Duration;

use fleetflow_dataflows::alerts::{Aggregate, Comparison, Condition, FleetAggregate, Rule, Rules};
use serde::Deserialize;

/// The longest `for`: the window each server keeps grows with it.
pub const MAX_FOR_MINUTES: u32 = 60;

/// A server not heard from for this long is forgotten: its silence alert ends, as it leaves
/// the `silent_servers` view.
pub const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// Servers each worker evaluates at most (about 1 KiB of memory each with a 21-minute
/// window): a producer inventing server ids cannot make the job run out of memory.
pub const MAX_SERVERS_PER_WORKER: usize = 200_000;

/// Label names the job sets itself.
const RESERVED_LABELS: [&str; 3] = ["alertname", "server", "scope"];

/// One `[[alert]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    name: String,
    metric: Option<String>,
    aggregate: Option<String>,
    fleet: Option<String>,
    above: Option<f64>,
    below: Option<f64>,
    #[serde(rename = "for")]
    for_: Option<String>,
    silent_for: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// The checked rules of a config file, before the lateness allowance is known.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AlertRules {
    pub rules: Vec<Rule>,
    pub metrics: Vec<String>,
    /// Per rule, the labels the user gave it.
    pub labels: Vec<BTreeMap<String, String>>,
}

impl AlertRules {
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules as the dataflow takes them: each server keeps the longest `for` plus
    /// `lateness` of minutes.
    pub fn evaluated(&self, lateness: Duration) -> Rules {
        let longest_for = self
            .rules
            .iter()
            .map(|r| match r.condition {
                Condition::Threshold { for_minutes, .. } => for_minutes,
                Condition::Silent { .. } => 1,
            })
            .max()
            .unwrap_or(1);
        let late_minutes = lateness.as_secs().div_ceil(60) as u32;
        Rules {
            rules: self.rules.clone(),
            metrics: self.metrics.clone(),
            // One more: the newest, incomplete minute.
            window_minutes: longest_for + late_minutes + 1,
            forget_after_ms: FORGET_AFTER.as_millis() as u64,
            max_servers: MAX_SERVERS_PER_WORKER,
        }
    }
}

/// Why a rule is refused: one line naming the rule.
#[derive(Debug, thiserror::Error)]
#[error("alert rule {position} ({name:?}): {problem}")]
pub struct RuleError {
    position: usize,
    name: String,
    problem: String,
}

/// Checks the `alert` array of a config file.
pub fn parse_rules(value: toml::Value) -> Result<AlertRules, RuleError> {
    let refuse = |position: usize, name: &str, problem: String| RuleError { position, name: name.to_owned(), problem };
    let toml::Value::Array(tables) = value else {
        return Err(refuse(1, "", "`alert` must be an array of tables: write each rule under [[alert]]".into()));
    };
    let mut rules = AlertRules::default();
    for (i, table) in tables.into_iter().enumerate() {
        let position = i + 1;
        let name_hint = table.get("name").and_then(toml::Value::as_str).unwrap_or("").to_owned();
        let spec: RuleSpec =
            table.try_into().map_err(|e: toml::de::Error| refuse(position, &name_hint, e.message().to_owned()))?;
        let name = spec.name.clone();
        let condition = condition(&spec, &mut rules.metrics).map_err(|p| refuse(position, &name, p))?;
        check_name(&name).map_err(|p| refuse(position, &name, p))?;
        if rules.rules.iter().any(|r| r.name == name) {
            return Err(refuse(position, &name, "another rule has this name; names identify alerts".into()));
        }
        for (label, value) in &spec.labels {
            check_label(label, value).map_err(|p| refuse(position, &name, p))?;
        }
        rules.rules.push(Rule { name, condition });
        rules.labels.push(spec.labels);
    }
    if rules.rules.len() > usize::from(u16::MAX) {
        return Err(refuse(rules.rules.len(), "", "too many rules".into()));
    }
    Ok(rules)
}

fn condition(spec: &RuleSpec, metrics: &mut Vec<String>) -> Result<Condition, String> {
    if let Some(silent_for) = &spec.silent_for {
        if spec.metric.is_some() || spec.above.is_some() || spec.below.is_some() || spec.for_.is_some() {
            return Err("a silent_for rule takes no metric, above, below or for".into());
        }
        if spec.aggregate.is_some() || spec.fleet.is_some() {
            return Err("a silent_for rule takes no aggregate or fleet".into());
        }
        let after = duration("silent_for", silent_for)?;
        if after < Duration::from_secs(1) || after >= FORGET_AFTER {
            return Err(format!("silent_for {silent_for:?} must be at least 1s and less than 1h"));
        }
        return Ok(Condition::Silent { after_ms: after.as_millis() as u64 });
    }
    let Some(metric) = &spec.metric else {
        return Err("give a metric with above or below (or silent_for)".into());
    };
    check_metric(metric)?;
    let compare = match (spec.above, spec.below) {
        (Some(x), None) if x.is_finite() => Comparison::Above(x),
        (None, Some(x)) if x.is_finite() => Comparison::Below(x),
        (None, None) => return Err(format!("metric {metric:?} needs a threshold: above = ... or below = ...")),
        (Some(_), Some(_)) => return Err("give above or below, not both (write two rules)".into()),
        _ => return Err("the threshold must be a finite number".into()),
    };
    let aggregate = match spec.aggregate.as_deref().unwrap_or("avg") {
        "avg" => Aggregate::Avg,
        "min" => Aggregate::Min,
        "max" => Aggregate::Max,
        other => return Err(format!("aggregate {other:?} is not avg, min or max")),
    };
    let fleet = spec.fleet.as_deref().map(fleet_aggregate).transpose()?;
    let for_text = spec.for_.as_deref().unwrap_or("1m");
    let for_ = duration("for", for_text)?;
    if for_.as_secs() % 60 != 0 || for_.subsec_nanos() != 0 || for_.is_zero() {
        return Err(format!("for {for_text:?} must be a whole number of minutes (rules read complete minutes)"));
    }
    let for_minutes = (for_.as_secs() / 60) as u32;
    if for_minutes > MAX_FOR_MINUTES {
        return Err(format!("for {for_text:?} is longer than {MAX_FOR_MINUTES} minutes"));
    }
    let index = metrics.iter().position(|m| m == metric).unwrap_or_else(|| {
        metrics.push(metric.clone());
        metrics.len() - 1
    });
    Ok(Condition::Threshold { metric: index, aggregate, fleet, compare, for_minutes })
}

fn duration(key: &str, text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{key} {text:?} is not a duration like 30s or 3m ({e})"))
}

fn fleet_aggregate(text: &str) -> Result<FleetAggregate, String> {
    Ok(match text {
        "avg" => FleetAggregate::Avg,
        "min" => FleetAggregate::Min,
        "max" => FleetAggregate::Max,
        p => match p.strip_prefix('p').and_then(|n| n.parse::<f64>().ok()) {
            Some(n) if n > 0.0 && n <= 100.0 => FleetAggregate::Quantile(n / 100.0),
            _ => return Err(format!("fleet {text:?} is not avg, min, max or a percentile such as p95")),
        },
    })
}

/// cpu, ram, or a name a record can carry as an extra numeric field.
fn check_metric(metric: &str) -> Result<(), String> {
    let reason = if metric.is_empty() {
        "is empty"
    } else if ["serverId", "ts", "timestamp"].contains(&metric) {
        "names the record's key or time, not a measurement"
    } else if metric.len() > crate::record::MAX_FIELD_NAME_BYTES {
        "is longer than a record's field name may be"
    } else if metric.chars().any(char::is_control) || metric.trim() != metric {
        "has control characters or surrounding spaces"
    } else {
        return Ok(());
    };
    Err(format!("metric {metric:?} {reason} (metrics: cpu, ram, or the name of an extra numeric field)"))
}

fn check_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty() || name.chars().any(char::is_control) || name.len() > 200 {
        return Err("name must be 1 to 200 printable characters".into());
    }
    Ok(())
}

/// Prometheus label names: [a-zA-Z_][a-zA-Z0-9_]*, not starting with __ (reserved).
fn check_label(label: &str, value: &str) -> Result<(), String> {
    let mut chars = label.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !label.starts_with("__");
    if !valid {
        return Err(format!("label {label:?} is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)"));
    }
    if RESERVED_LABELS.contains(&label) {
        return Err(format!("label {label:?} is set by fleetflow itself"));
    }
    if value.contains('\0') {
        return Err(format!("label {label:?} has a NUL character"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AlertRules, String> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
        parse_rules(table.remove("alert").expect("an alert array")).map_err(|e| e.to_string())
    }

    #[test]
    fn the_three_forms_parse() {
        let rules = parse(
            r#"
            [[alert]]
            name = "cpu-hot"
            metric = "cpu"
            aggregate = "avg"
            above = 90.0
            for = "3m"
            labels = { severity = "page" }
            [[alert]]
            name = "fleet-disk"
            metric = "disk"
            fleet = "p95"
            below = 5
            for = "5m"
            [[alert]]
            name = "server-silent"
            silent_for = "30s"
            "#,
        )
        .unwrap();
        assert_eq!(rules.metrics, vec!["cpu".to_owned(), "disk".to_owned()]);
        assert_eq!(
            rules.rules[0].condition,
            Condition::Threshold {
                metric: 0,
                aggregate: Aggregate::Avg,
                fleet: None,
                compare: Comparison::Above(90.0),
                for_minutes: 3
            }
        );
        assert_eq!(
            rules.rules[1].condition,
            Condition::Threshold {
                metric: 1,
                aggregate: Aggregate::Avg,
                fleet: Some(FleetAggregate::Quantile(0.95)),
                compare: Comparison::Below(5.0),
                for_minutes: 5
            }
        );
        assert_eq!(rules.rules[2].condition, Condition::Silent { after_ms: 30_000 });
        assert_eq!(rules.labels[0]["severity"], "page");
        let evaluated = rules.evaluated(Duration::from_secs(600));
        assert_eq!(evaluated.window_minutes, 5 + 10 + 1);
    }

    #[test]
    fn bad_rules_are_refused_with_one_line_naming_the_rule() {
        let cases = [
            (
                r#"name = "a"
                metric = "serverId"
                above = 1"#,
                "alert rule 1 (\"a\"): metric \"serverId\" names the record's key",
            ),
            (
                r#"name = "b"
                metric = "cpu"
                above = 1
                for = "3 parsecs""#,
                "alert rule 1 (\"b\"): for \"3 parsecs\" is not a duration",
            ),
            (
                r#"name = "c"
                metric = "cpu"
                above = 1
                for = "90s""#,
                "must be a whole number of minutes",
            ),
            (
                r#"name = "d"
                silent_for = "soon""#,
                "silent_for \"soon\" is not a duration",
            ),
            (
                r#"name = "e"
                metric = "cpu""#,
                "needs a threshold",
            ),
            (
                r#"name = "f"
                metric = "cpu"
                above = 1
                below = 2"#,
                "not both",
            ),
            (
                r#"name = "g"
                metric = "cpu"
                abov = 1"#,
                "unknown field `abov`",
            ),
            (
                r#"name = "h"
                metric = "cpu"
                above = 1
                aggregate = "median""#,
                "aggregate \"median\" is not avg, min or max",
            ),
            (
                r#"name = "i"
                metric = "cpu"
                above = 1
                fleet = "p101""#,
                "is not avg, min, max or a percentile",
            ),
            (
                r#"name = "j"
                metric = ""
                above = 1"#,
                "metric \"\" is empty",
            ),
            (
                r#"name = "k"
                metric = "cpu"
                above = 1
                labels = { alertname = "x" }"#,
                "set by fleetflow itself",
            ),
            (
                r#"name = "l"
                silent_for = "2h""#,
                "less than 1h",
            ),
        ];
        for (body, expected) in cases {
            let err = parse(&format!("[[alert]]\n{body}\n")).unwrap_err();
            assert!(err.contains(expected), "{body}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
        let err = parse("[[alert]]\nname = \"x\"\nsilent_for = \"1m\"\n[[alert]]\nname = \"x\"\nsilent_for = \"2m\"\n")
            .unwrap_err();
        assert!(err.starts_with("alert rule 2 (\"x\"): another rule has this name"), "{err}");
    }
}
