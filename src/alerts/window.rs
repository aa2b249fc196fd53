//! What the alert rules read: per server and minute, the committed reports folded into a
//! [`MinuteRow`]. Writers fold what each transaction wrote ([`AlertTap`]); at start, worker 0
//! reads the window back from the `metrics` table ([`load_window`]), so the evaluation after a
//! restart sees exactly what is durable.

use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use fleetflow_dataflows::alerts::{MinuteRow, Rules, MINUTE_US};
use tokio_postgres::Client;

use crate::record::Metric;
use crate::sink::{FastMap, SinkError};

/// (server, minute start in µs, what was committed for it).
pub type CommittedMinutes = Vec<(String, i64, MinuteRow)>;

/// Where a writer sends what each committed transaction wrote, when rules are configured.
#[derive(Clone, Debug)]
pub struct AlertTap {
    /// The metrics the rules read, in the order of [`MinuteRow::aggs`].
    pub metrics: Arc<Vec<String>>,
    pub sender: Sender<CommittedMinutes>,
}

impl AlertTap {
    /// Folds written rows into their servers' minutes.
    pub fn fold<'a>(&self, rows: impl IntoIterator<Item = &'a Metric>) -> CommittedMinutes {
        let mut minutes: FastMap<(&str, i64), MinuteRow> = FastMap::default();
        for m in rows {
            let minute = m.time_us.div_euclid(MINUTE_US) * MINUTE_US;
            let row = minutes.entry((m.server_id.as_str(), minute)).or_insert_with(|| MinuteRow {
                count: 0,
                last_us: m.time_us,
                aggs: vec![Default::default(); self.metrics.len()],
            });
            row.count += 1;
            row.last_us = row.last_us.max(m.time_us);
            for (agg, name) in row.aggs.iter_mut().zip(self.metrics.iter()) {
                if let Some(v) = value_of(m, name) {
                    agg.add(v);
                }
            }
        }
        minutes.into_iter().map(|((server, minute), row)| (server.to_owned(), minute, row)).collect()
    }

    /// Hands a committed transaction's minutes to the worker. The worker is gone only in
    /// process teardown; then there is no one left to tell.
    pub fn send(&self, minutes: CommittedMinutes) {
        if !minutes.is_empty() {
            let _ = self.sender.send(minutes);
        }
    }
}

/// A metric's value in a record: cpu, ram, or an extra field (the last of a repeated name,
/// as the stored jsonb keeps it).
fn value_of(m: &Metric, name: &str) -> Option<f64> {
    match name {
        "cpu" => m.cpu,
        "ram" => m.ram,
        other => m.extra.iter().rev().find(|(n, _)| n == other).map(|(_, v)| *v),
    }
}

/// The committed minutes the rules need at start: for every server seen within the rules'
/// `forget_after`, its newest `window_minutes` minutes.
pub async fn load_window(client: &Client, rules: &Rules) -> Result<CommittedMinutes, SinkError> {
    let mut columns = String::new();
    let mut names: Vec<String> = Vec::new();
    for name in rules.metrics.iter() {
        let expr = match name.as_str() {
            "cpu" => "m.cpu".to_owned(),
            "ram" => "m.ram".to_owned(),
            other => {
                names.push(other.to_owned());
                format!("(m.extra->>${})::float8", names.len() + 2)
            }
        };
        columns.push_str(&format!(", count({expr}), sum({expr}), min({expr}), max({expr})"));
    }
    let sql = format!(
        "SELECT m.server_id, time_bucket('1 minute', m.time) AS minute, count(*), max(m.time){columns}
         FROM metrics m
         JOIN (SELECT server_id, max(time) AS newest FROM metrics
               WHERE time > now() - $1::text::interval GROUP BY server_id) r USING (server_id)
         WHERE m.time > now() - $1::text::interval - $2::text::interval
           AND m.time >= time_bucket('1 minute', r.newest) - $2::text::interval
         GROUP BY 1, 2"
    );
    let forget = format!("{} milliseconds", rules.forget_after_ms);
    let window = format!("{} minutes", rules.window_minutes);
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&forget, &window];
    params.extend(names.iter().map(|n| n as &(dyn tokio_postgres::types::ToSql + Sync)));
    let rows = client.query(&sql, &params).await?;
    let us = |t: chrono::DateTime<chrono::Utc>| t.timestamp_micros();
    Ok(rows
        .iter()
        .map(|row| {
            let aggs = (0..rules.metrics.len())
                .map(|i| {
                    let at = 4 + 4 * i;
                    let count: i64 = row.get(at);
                    let mut agg = fleetflow_dataflows::alerts::Agg { count, ..Default::default() };
                    if count > 0 {
                        agg.sum.0 = row.get(at + 1);
                        agg.min.0 = row.get(at + 2);
                        agg.max.0 = row.get(at + 3);
                    }
                    agg
                })
                .collect();
            let row_out = MinuteRow { count: row.get(2), last_us: us(row.get(3)), aggs };
            (row.get(0), us(row.get(1)), row_out)
        })
        .collect())
}

/// A duration as PostgreSQL interval text.
pub fn interval(d: Duration) -> String {
    format!("{} milliseconds", d.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_fold_into_minutes_with_the_metrics_the_rules_read() {
        let (sender, _rx) = std::sync::mpsc::channel();
        let tap = AlertTap { metrics: Arc::new(vec!["cpu".into(), "disk".into()]), sender };
        let m = |server: &str, t: i64, cpu: Option<f64>, extra: Vec<(&str, f64)>| Metric {
            server_id: server.into(),
            time_us: t,
            cpu,
            ram: Some(1.0),
            extra: extra.into_iter().map(|(n, v)| (n.into(), v)).collect(),
        };
        let rows = [
            m("a", 5, Some(10.0), vec![("disk", 1.0), ("disk", 3.0)]),
            m("a", MINUTE_US - 1, Some(30.0), vec![]),
            m("a", MINUTE_US, None, vec![("disk", 7.0)]),
        ];
        let mut folded = tap.fold(&rows);
        folded.sort_by_key(|(s, minute, _)| (s.clone(), *minute));
        assert_eq!(folded.len(), 2);
        let (_, minute, first) = &folded[0];
        assert_eq!((*minute, first.count, first.last_us), (0, 2, MINUTE_US - 1));
        assert_eq!((first.aggs[0].count, first.aggs[0].sum.0, first.aggs[0].max.0), (2, 40.0, 30.0));
        assert_eq!((first.aggs[1].count, first.aggs[1].sum.0), (1, 3.0), "the last of a repeated name");
        let (_, _, second) = &folded[1];
        assert_eq!((second.aggs[0].count, second.aggs[1].count), (0, 1));
    }
}
