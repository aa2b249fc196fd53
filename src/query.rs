//! `fleetflow query`: the questions an on-call engineer or analyst asks, answered from the
//! rollups (metrics_1m, fleet_1m, silent_servers). Output is an aligned table, or CSV/JSON
//! for scripts.

use std::time::Duration;

use anyhow::bail;
use serde_json::{Map, Value};
use tokio_postgres::types::Type;

use crate::cli::{OutputFormat, QueryArgs, QueryCommand};

/// A query's result: column names and rows of JSON values.
pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

fn interval(d: Duration) -> String {
    format!("{} milliseconds", d.as_millis())
}

/// What an empty answer means.
enum Empty {
    /// Nothing where there should be something (an error: exit code 1).
    Fail(String),
    /// A fine answer, said in words.
    Say(String),
}

/// Runs the query and renders it.
pub async fn run(args: QueryArgs) -> anyhow::Result<String> {
    let client = crate::sink::connect(&args.database.database_url).await?;
    let (sql, params, empty): (String, Vec<String>, Empty) = match &args.command {
        QueryCommand::Top { metric, window, limit } => {
            let m = metric.column();
            (
                format!(
                    "SELECT server_id, sum({m}_sum) / sum({m}_count) AS {m}_avg, max({m}_max) AS {m}_max, sum(count)::bigint AS reports
                     FROM metrics_1m WHERE bucket >= time_bucket('1 minute', now() - $1::text::interval)
                     GROUP BY server_id HAVING sum({m}_count) > 0 ORDER BY 2 DESC, 1 LIMIT {limit}"
                ),
                vec![interval(*window)],
                Empty::Fail(format!("no {m} data in the last {}", humantime::format_duration(*window))),
            )
        }
        QueryCommand::Server { server_id, since } => (
            "SELECT bucket, count AS reports, cpu_min, cpu_avg, cpu_max, ram_min, ram_avg, ram_max FROM metrics_1m
             WHERE server_id = $2 AND bucket >= time_bucket('1 minute', now() - $1::text::interval) ORDER BY bucket"
                .into(),
            vec![interval(*since), server_id.clone()],
            Empty::Fail(format!("server {server_id:?} has no data in the last {}", humantime::format_duration(*since))),
        ),
        QueryCommand::Fleet { since } => (
            "SELECT bucket, servers, reports, cpu_avg, cpu_max, cpu_p50, cpu_p95, cpu_p99,
                    ram_avg, ram_max, ram_p50, ram_p95, ram_p99
             FROM fleet_1m WHERE bucket >= time_bucket('1 minute', now() - $1::text::interval) ORDER BY bucket"
                .into(),
            vec![interval(*since)],
            Empty::Fail(format!("no fleet data in the last {}", humantime::format_duration(*since))),
        ),
        QueryCommand::Silent => (
            "SELECT server_id, last_seen, date_trunc('second', silent_for)::text AS silent_for FROM silent_servers
             ORDER BY last_seen"
                .into(),
            vec![],
            Empty::Say("no silent servers".into()),
        ),
        QueryCommand::Alerts { active, since } => (
            format!(
                "SELECT rule, coalesce(server_id, '(fleet)') AS server, state, started, resolved,
                        round(value::numeric, 2)::float8 AS value, labels::text AS labels
                 FROM alerts WHERE {} ORDER BY started DESC, rule, server",
                if *active {
                    "state = 'firing' AND $1::text IS NOT NULL"
                } else {
                    "(state = 'firing' OR resolved >= now() - $1::text::interval OR started >= now() - $1::text::interval)"
                }
            ),
            vec![interval(*since)],
            Empty::Say(if *active {
                "no alert is firing".into()
            } else {
                format!("no alerts in the last {}", humantime::format_duration(*since))
            }),
        ),
    };
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params.iter().map(|p| p as _).collect();
    let rows = client.query(&sql, &params).await.map_err(|e| {
        if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) {
            anyhow::anyhow!("no fleetflow rollups in this database (has the job run against it?)")
        } else {
            e.into()
        }
    })?;
    let columns: Vec<String> = match rows.first() {
        Some(r) => r.columns().iter().map(|c| c.name().to_owned()).collect(),
        None => match empty {
            Empty::Fail(message) => bail!("{message}"),
            Empty::Say(message) => return Ok(format!("{message}\n")),
        },
    };
    let rows = rows.iter().map(|r| (0..r.len()).map(|i| value(r, i)).collect()).collect();
    Ok(render(&Table { columns, rows }, args.format))
}

fn value(row: &tokio_postgres::Row, i: usize) -> Value {
    let ty = row.columns()[i].type_();
    let v = if *ty == Type::TEXT {
        row.get::<_, Option<String>>(i).map(Value::from)
    } else if *ty == Type::INT8 {
        row.get::<_, Option<i64>>(i).map(Value::from)
    } else if *ty == Type::FLOAT8 {
        row.get::<_, Option<f64>>(i).map(Value::from)
    } else if *ty == Type::TIMESTAMPTZ {
        row.get::<_, Option<chrono::DateTime<chrono::Utc>>>(i)
            .map(|t| Value::from(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)))
    } else {
        Some(Value::from(format!("<{ty}>")))
    };
    v.unwrap_or(Value::Null)
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_f64() => format!("{:.2}", n.as_f64().unwrap_or_default()),
        other => other.to_string(),
    }
}

/// Renders a table as text, CSV or JSON.
pub fn render(table: &Table, format: OutputFormat) -> String {
    match format {
        OutputFormat::Table => {
            let mut t = comfy_table::Table::new();
            t.load_preset(comfy_table::presets::NOTHING);
            t.set_header(&table.columns);
            for row in &table.rows {
                t.add_row(row.iter().map(cell));
            }
            for column in t.column_iter_mut().skip(1) {
                column.set_cell_alignment(comfy_table::CellAlignment::Right);
            }
            format!("{t}\n")
        }
        OutputFormat::Csv => {
            let mut w = csv::Writer::from_writer(Vec::new());
            let _ = w.write_record(&table.columns);
            for row in &table.rows {
                let _ = w.write_record(row.iter().map(cell));
            }
            String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
        }
        OutputFormat::Json => {
            let objects: Vec<Value> = table
                .rows
                .iter()
                .map(|row| Value::Object(table.columns.iter().cloned().zip(row.iter().cloned()).collect::<Map<_, _>>()))
                .collect();
            serde_json::to_string_pretty(&objects).unwrap_or_default() + "\n"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Table {
        Table {
            columns: vec!["server_id".into(), "cpu_avg".into(), "reports".into()],
            rows: vec![vec!["s1".into(), 91.256.into(), 6.into()], vec!["s2".into(), Value::Null, 3.into()]],
        }
    }

    #[test]
    fn csv_and_json_for_scripts() {
        assert_eq!(render(&sample(), OutputFormat::Csv), "server_id,cpu_avg,reports\ns1,91.26,6\ns2,,3\n");
        let json: Value = serde_json::from_str(&render(&sample(), OutputFormat::Json)).unwrap();
        assert_eq!(json[0]["cpu_avg"], 91.256);
        assert_eq!(json[1]["reports"], 3);
    }

    #[test]
    fn table_is_aligned() {
        let text = render(&sample(), OutputFormat::Table);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("server_id") && lines[0].contains("cpu_avg"), "{text}");
        assert!(lines.iter().any(|l| l.contains("s1") && l.contains("91.26")), "{text}");
    }
}
