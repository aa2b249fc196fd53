//! InfluxDB line protocol (what Telegraf sends) mapped onto fleetflow records.
//!
//! A line is `measurement,tags fields timestamp`. The server is the tag `serverId`, else
//! `server_id`, else `host`; the other tags, with the measurement, name the *series*. Every
//! series is kept apart, and every value is stored once:
//! - the server's own record (serverId = the server) holds the two headline columns: `cpu`
//!   from `cpu` `usage_active` of `cpu=cpu-total` (or of a cpu line without other tags), and
//!   `ram` from `mem` `used_percent`; a field named `cpu` or `ram` on a line without other
//!   tags goes there too;
//! - every other numeric field goes to the series record, serverId
//!   `<server>|<measurement>[,<tag>=<value>...]` (tags in the order of the line, which
//!   Telegraf sorts), under its own field name (`cpu`, `ram`, `ts`, `timestamp` and `serverId`
//!   become `<measurement>_<field>` so they cannot mean a column). String and boolean fields
//!   are ignored.
//!
//! A series with more than 64 numeric fields (the most a record carries) continues in
//! `<series>|2`, `<series>|3`, ... Lines of one request with the same record serverId and timestamp are merged (Telegraf
//! sends `time_*` and `usage_*` of a CPU as two lines), so one record per series and time:
//! `--dedup natural-key`'s key (serverId, time) is the series and its time. The timestamp,
//! in the request's `precision` (ns by default), becomes `ts`; a line without one gets the
//! gateway's receipt time. The records produced here are JSON and go through the same
//! validation as any other.

use std::collections::HashMap;

use influxdb_line_protocol::{parse_lines, FieldValue};
use serde_json::{Map, Value};

use crate::record::MAX_EXTRA_FIELDS;

/// Timestamp precision of a write (`?precision=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Ns,
    Us,
    Ms,
    S,
}

impl Precision {
    fn to_millis(self, t: i64) -> f64 {
        match self {
            Precision::Ns => t as f64 / 1e6,
            Precision::Us => t as f64 / 1e3,
            Precision::Ms => t as f64,
            Precision::S => t as f64 * 1e3,
        }
    }
}

/// Tags that name the server, in order of preference.
const SERVER_TAGS: [&str; 3] = ["serverId", "server_id", "host"];

/// Field names that would mean something else in a record.
const RESERVED: [&str; 5] = ["cpu", "ram", "ts", "timestamp", "serverId"];

/// The headline column a field feeds on the server's own record, if any.
fn headline(measurement: &str, total: bool, untagged: bool, field: &str) -> Option<&'static str> {
    match (measurement, field) {
        ("cpu", "usage_active") if total => Some("cpu"),
        ("mem", "used_percent") if untagged => Some("ram"),
        (_, "cpu") if untagged => Some("cpu"),
        (_, "ram") if untagged => Some("ram"),
        _ => None,
    }
}

/// Converts a body into JSON records (or a reason per line that could not be used), in the
/// order their first value appeared.
pub fn to_records(body: &str, precision: Precision) -> Vec<Result<String, String>> {
    let mut out: Vec<Result<Map<String, Value>, String>> = Vec::new();
    let mut index: HashMap<(String, Option<i64>), usize> = HashMap::new();
    let mut slot_of = |out: &mut Vec<Result<Map<String, Value>, String>>, id: &str, ts: Option<i64>| {
        *index.entry((id.to_owned(), ts)).or_insert_with(|| {
            let mut record = Map::new();
            record.insert("serverId".into(), Value::String(id.to_owned()));
            if let Some(t) = ts {
                record.insert("ts".into(), precision.to_millis(t).into());
            }
            out.push(Ok(record));
            out.len() - 1
        })
    };
    for (n, line) in parse_lines(body).enumerate() {
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                out.push(Err(format!("line {}: {e}", n + 1)));
                continue;
            }
        };
        let measurement = line.series.measurement.as_str();
        let tags: Vec<(&str, &str)> =
            line.series.tag_set.iter().flatten().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let Some(server_tag) = SERVER_TAGS.iter().find(|want| tags.iter().any(|(k, _)| k == *want)) else {
            out.push(Err(format!("line {}: no serverId, server_id or host tag", n + 1)));
            continue;
        };
        let server = tags.iter().find(|(k, _)| k == server_tag).map(|(_, v)| *v).unwrap_or_default();
        let others: Vec<&(&str, &str)> = tags.iter().filter(|(k, _)| k != server_tag).collect();
        let untagged = others.is_empty();
        let total = measurement == "cpu"
            && (untagged || (others.len() == 1 && others[0].0 == "cpu" && others[0].1 == "cpu-total"));
        let mut series = format!("{server}|{measurement}");
        for (k, v) in &others {
            series.push_str(&format!(",{k}={v}"));
        }
        for (name, value) in &line.field_set {
            let number = match value {
                FieldValue::I64(v) => *v as f64,
                FieldValue::U64(v) => *v as f64,
                FieldValue::F64(v) => *v,
                FieldValue::String(_) | FieldValue::Boolean(_) => continue,
            };
            let number = serde_json::Number::from_f64(number).map(Value::Number).unwrap_or(Value::Null);
            let name = name.as_str();
            let (id, key) = match headline(measurement, total, untagged, name) {
                Some(column) => (server, column.to_owned()),
                None if RESERVED.contains(&name) => (series.as_str(), format!("{measurement}_{name}")),
                None => (series.as_str(), name.to_owned()),
            };
            // A series with more fields than a record may carry (Telegraf's `net,interface=all`
            // has about 90) continues in `<series>|2`, `<series>|3`, ...: the same split for
            // the same fields every time, so a retry maps onto the same rows.
            let mut part = 1;
            loop {
                let id = if part == 1 { id.to_owned() } else { format!("{id}|{part}") };
                let slot = slot_of(&mut out, &id, line.timestamp);
                let Ok(record) = &mut out[slot] else { break };
                let extras = record.keys().filter(|k| !matches!(k.as_str(), "serverId" | "ts" | "cpu" | "ram")).count();
                if record.contains_key(&key) || extras < MAX_EXTRA_FIELDS || matches!(key.as_str(), "cpu" | "ram") {
                    record.insert(key, number);
                    break;
                }
                part += 1;
            }
        }
    }
    out.into_iter().map(|r| r.map(|m| Value::Object(m).to_string())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(records: &[Result<String, String>]) -> Vec<Value> {
        records.iter().map(|r| serde_json::from_str(r.as_ref().unwrap()).unwrap()).collect()
    }

    #[test]
    fn headline_columns_and_series_records() {
        let body = "cpu,cpu=cpu-total,host=s17 usage_active=45.5,usage_idle=54.5 1700000000000000000\n\
                    mem,host=s17 used_percent=60,available=123i 1700000000000000000\n";
        let v = parse(&to_records(body, Precision::Ns));
        assert_eq!(v.len(), 3, "{v:?}");
        assert_eq!(v[0]["serverId"], "s17");
        assert_eq!(v[0]["cpu"], 45.5);
        assert_eq!(v[0]["ram"], 60.0);
        assert_eq!(v[0]["ts"], 1_700_000_000_000.0);
        assert_eq!(v[1]["serverId"], "s17|cpu,cpu=cpu-total");
        assert_eq!(v[1]["usage_idle"], 54.5);
        assert!(v[1].get("usage_active").is_none(), "stored once, as the cpu column");
        assert_eq!(v[2]["serverId"], "s17|mem");
        assert_eq!(v[2]["available"], 123.0);
    }

    #[test]
    fn per_cpu_lines_stay_apart_and_merge_per_series() {
        let body = "cpu,cpu=cpu0,host=h time_idle=1 1700000000000000000\n\
                    cpu,cpu=cpu0,host=h usage_idle=2,usage_active=98 1700000000000000000\n\
                    cpu,cpu=cpu1,host=h usage_idle=3,cpu=7 1700000000000000000\n";
        let v = parse(&to_records(body, Precision::Ns));
        assert_eq!(v.len(), 2, "{v:?}");
        assert_eq!(v[0]["serverId"], "h|cpu,cpu=cpu0");
        assert_eq!(
            (&v[0]["time_idle"], &v[0]["usage_idle"], &v[0]["usage_active"]),
            (&1.0.into(), &2.0.into(), &98.0.into())
        );
        assert_eq!(v[1]["serverId"], "h|cpu,cpu=cpu1");
        assert_eq!(v[1]["cpu_cpu"], 7.0);
        assert!(v[1].get("cpu").is_none());
    }

    #[test]
    fn wide_series_continue_in_numbered_parts() {
        let fields: Vec<String> = (0..150).map(|i| format!("f{i}={i}i")).collect();
        let v = parse(&to_records(
            &format!("net,host=h,interface=all {} 1700000000000000000", fields.join(",")),
            Precision::Ns,
        ));
        let ids: Vec<&str> = v.iter().map(|r| r["serverId"].as_str().unwrap()).collect();
        assert_eq!(ids, ["h|net,interface=all", "h|net,interface=all|2", "h|net,interface=all|3"]);
        assert_eq!(v[0].as_object().unwrap().len(), 2 + MAX_EXTRA_FIELDS);
        assert_eq!(v[2]["f149"], 149.0);
        for record in &v {
            crate::record::decode(record.to_string().as_bytes(), None, None, 1_700_000_000_000, &Default::default())
                .unwrap();
        }
    }

    #[test]
    fn precision_and_missing_host() {
        let records = to_records(
            "metrics,serverId=a cpu=1 1700000000\nmetrics cpu=2 1700000000\nnot line protocol\nm,host=b x=1",
            Precision::S,
        );
        assert_eq!(records.len(), 4);
        let v: Value = serde_json::from_str(records[0].as_ref().unwrap()).unwrap();
        assert_eq!((&v["serverId"], &v["cpu"], &v["ts"]), (&"a".into(), &1.0.into(), &1_700_000_000_000.0.into()));
        assert!(records[1].as_ref().unwrap_err().contains("no serverId"));
        assert!(records[2].is_err());
        let v: Value = serde_json::from_str(records[3].as_ref().unwrap()).unwrap();
        assert_eq!((&v["serverId"], &v["x"]), (&"b|m".into(), &1.0.into()));
        assert!(v.get("ts").is_none(), "no timestamp: the gateway stamps its receipt time");
    }
}
