//! InfluxDB line protocol (what Telegraf sends) mapped onto fleetflow records.
//!
//! Mapping, per line `measurement,tags fields timestamp`:
//! - serverId: the tag `serverId`, else `server_id`, else `host`;
//! - `cpu` measurement field `usage_active` and any field named `cpu` -> `cpu`;
//!   `mem` measurement field `used_percent` and any field named `ram` -> `ram`;
//!   every other numeric field -> `<measurement>_<field>`; string and boolean fields are ignored;
//! - the timestamp, in the request's `precision` (ns by default), becomes `ts`; lines of one
//!   request with the same serverId and timestamp become one record (Telegraf sends `cpu`
//!   and `mem` as separate lines).
//!
//! The records produced here are JSON and go through the same validation as any other.

use std::collections::HashMap;

use influxdb_line_protocol::{parse_lines, FieldValue};
use serde_json::{Map, Value};

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

/// The metric name a line-protocol field maps to.
fn field_name(measurement: &str, field: &str) -> String {
    match (measurement, field) {
        ("cpu", "usage_active") | (_, "cpu") => "cpu".into(),
        ("mem", "used_percent") | (_, "ram") => "ram".into(),
        _ => format!("{measurement}_{field}"),
    }
}

/// Converts a body into JSON records (or a reason per line that could not be used), in the
/// order their first line appeared.
pub fn to_records(body: &str, precision: Precision) -> Vec<Result<String, String>> {
    let mut out: Vec<Result<Map<String, Value>, String>> = Vec::new();
    let mut index: HashMap<(String, Option<i64>), usize> = HashMap::new();
    for (n, line) in parse_lines(body).enumerate() {
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                out.push(Err(format!("line {}: {e}", n + 1)));
                continue;
            }
        };
        let measurement = line.series.measurement.as_str();
        let tags = line.series.tag_set.as_ref();
        let server = ["serverId", "server_id", "host"].iter().find_map(|want| {
            tags.and_then(|t| t.iter().find(|(k, _)| k.as_str() == *want).map(|(_, v)| v.as_str().to_owned()))
        });
        let Some(server) = server else {
            out.push(Err(format!("line {}: no serverId, server_id or host tag", n + 1)));
            continue;
        };
        let key = (server.clone(), line.timestamp);
        let slot = *index.entry(key).or_insert_with(|| {
            let mut record = Map::new();
            record.insert("serverId".into(), Value::String(server));
            if let Some(t) = line.timestamp {
                record.insert("ts".into(), precision.to_millis(t).into());
            }
            out.push(Ok(record));
            out.len() - 1
        });
        let Ok(record) = &mut out[slot] else { continue };
        for (name, value) in &line.field_set {
            let number = match value {
                FieldValue::I64(v) => *v as f64,
                FieldValue::U64(v) => *v as f64,
                FieldValue::F64(v) => *v,
                FieldValue::String(_) | FieldValue::Boolean(_) => continue,
            };
            let number = serde_json::Number::from_f64(number).map(Value::Number).unwrap_or(Value::Null);
            record.insert(field_name(measurement, name.as_str()), number);
        }
    }
    out.into_iter().map(|r| r.map(|m| Value::Object(m).to_string())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telegraf_cpu_and_mem_lines_become_one_record() {
        let body = "cpu,cpu=cpu-total,host=s17 usage_active=45.5,usage_idle=54.5 1700000000000000000\n\
                    mem,host=s17 used_percent=60,available=123i 1700000000000000000\n";
        let records = to_records(body, Precision::Ns);
        assert_eq!(records.len(), 1);
        let v: Value = serde_json::from_str(records[0].as_ref().unwrap()).unwrap();
        assert_eq!(v["serverId"], "s17");
        assert_eq!(v["cpu"], 45.5);
        assert_eq!(v["ram"], 60.0);
        assert_eq!(v["cpu_usage_idle"], 54.5);
        assert_eq!(v["mem_available"], 123.0);
        assert_eq!(v["ts"], 1_700_000_000_000.0);
    }

    #[test]
    fn precision_and_missing_host() {
        let records = to_records(
            "metrics,serverId=a cpu=1 1700000000\nmetrics cpu=2 1700000000\nnot line protocol",
            Precision::S,
        );
        assert_eq!(records.len(), 3);
        let v: Value = serde_json::from_str(records[0].as_ref().unwrap()).unwrap();
        assert_eq!(v["ts"], 1_700_000_000_000.0);
        assert!(records[1].as_ref().unwrap_err().contains("no serverId"));
        assert!(records[2].is_err());
    }
}
