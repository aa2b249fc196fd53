//! Per-minute rollups, maintained in the same transaction as the raw rows they summarise.
//!
//! Each write transaction folds the rows it writes (after the exactly-once filter) into
//! per-(server, minute) partial aggregates and per-minute fleet histograms, and adds them to
//! the stored ones with upserts. Because the raw rows, the rollups and the watermarks commit
//! together, a crash can never leave a rollup that disagrees with the raw table, a replayed
//! record is never counted twice, and a late record simply updates its minute. No rollup
//! state lives in the job's memory, so memory does not grow with the number of buckets, and
//! there is no lateness bound: a record of any age inside `--max-age` updates its minute.
//!
//! Tables and views (migration 2): `metrics_1m` (per server and minute: count, sum, min,
//! max, avg of cpu and ram, newest record time), `fleet_hist_1m` (per minute, metric and
//! writing worker: one array of counts in 0.1-point bins over [0, 100]), `fleet_1m` (per
//! minute: servers reporting, avg/max and p50/p95/p99 of cpu and ram; the percentiles are
//! exact `percentile_disc` of the values rounded to 0.1, values outside [0, 100] counted at
//! the nearest end), and `silent_servers`, derived from `metrics_1m`.
//!
//! What each transaction costs the database is what limits ingest speed (see the README's
//! performance section), so the delta is shaped to need few row versions: one upsert per
//! (server, minute) in `metrics_1m`, whose spare page room (fillfactor) lets the update stay
//! on its page without touching the indexes, and one array row per (minute, metric) in the
//! histogram instead of one row per bin.

use tokio_postgres::Transaction;

use super::{FastMap, SinkError};
use crate::record::Metric;

const MINUTE_US: i64 = 60_000_000;

/// Histogram bins: tenths of a point over [0, 100].
pub const BINS: usize = 1001;

/// The metrics the fleet histogram covers, in the order of its `metric` column values.
const HISTOGRAM_METRICS: [&str; 2] = ["cpu", "ram"];

/// Partial aggregates of one (server, minute).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MinuteAgg {
    pub count: i64,
    pub last_time_us: i64,
    pub cpu: Agg,
    pub ram: Agg,
}

/// count, sum, min, max of one metric (count 0: no value seen).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Agg {
    pub count: i64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

impl Agg {
    fn add(&mut self, v: Option<f64>) {
        let Some(v) = v else { return };
        if self.count == 0 {
            (self.min, self.max) = (v, v);
        }
        self.count += 1;
        self.sum += v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    fn column(&self) -> (Option<i64>, Option<f64>, Option<f64>, Option<f64>) {
        if self.count == 0 {
            (None, None, None, None)
        } else {
            (Some(self.count), Some(self.sum), Some(self.min), Some(self.max))
        }
    }
}

/// The histogram bin of a percentage: tenths of a point, clamped to [0, 1000].
pub fn bin(v: f64) -> usize {
    (v * 10.0).round().clamp(0.0, (BINS - 1) as f64) as usize
}

/// What one transaction adds to the rollups. Keys borrow the server ids of the rows
/// being written, so folding a row in allocates nothing but new map entries.
#[derive(Debug, Default)]
pub struct RollupDelta<'a> {
    pub minutes: FastMap<(&'a str, i64), MinuteAgg>,
    /// (minute, index into `HISTOGRAM_METRICS`) -> counts per bin
    pub histogram: FastMap<(i64, usize), Vec<i64>>,
}

impl<'a> RollupDelta<'a> {
    /// Folds one written row in.
    pub fn add(&mut self, m: &'a Metric) {
        let minute = m.time_us.div_euclid(MINUTE_US) * MINUTE_US;
        let agg = self.minutes.entry((m.server_id.as_str(), minute)).or_default();
        agg.count += 1;
        agg.last_time_us = agg.last_time_us.max(m.time_us);
        agg.cpu.add(m.cpu);
        agg.ram.add(m.ram);
        for (metric, v) in [m.cpu, m.ram].into_iter().enumerate() {
            if let Some(v) = v {
                self.histogram.entry((minute, metric)).or_insert_with(|| vec![0; BINS])[bin(v)] += 1;
            }
        }
    }

    /// Adds the delta to the stored rollups, inside the caller's transaction. `shard` (the
    /// writing worker) keeps concurrent writers off each other's histogram rows; rows are
    /// upserted in key order so concurrent transactions never deadlock.
    pub async fn apply(&self, tx: &Transaction<'_>, shard: i32) -> Result<(), SinkError> {
        if self.minutes.is_empty() {
            return Ok(());
        }
        let ts = |us: i64| chrono::DateTime::from_timestamp_micros(us).unwrap_or_default();
        let mut servers = Vec::with_capacity(self.minutes.len());
        let mut buckets = Vec::with_capacity(self.minutes.len());
        let mut counts = Vec::with_capacity(self.minutes.len());
        let mut lasts = Vec::with_capacity(self.minutes.len());
        let (mut cc, mut cs, mut cmin, mut cmax) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut rc, mut rs, mut rmin, mut rmax) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut minutes: Vec<_> = self.minutes.iter().collect();
        minutes.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for ((server, minute), agg) in minutes {
            servers.push(*server);
            buckets.push(ts(*minute));
            counts.push(agg.count);
            lasts.push(ts(agg.last_time_us));
            let (a, b, c, d) = agg.cpu.column();
            cc.push(a);
            cs.push(b);
            cmin.push(c);
            cmax.push(d);
            let (a, b, c, d) = agg.ram.column();
            rc.push(a);
            rs.push(b);
            rmin.push(c);
            rmax.push(d);
        }
        tx.execute(
            "INSERT INTO metrics_1m AS t (server_id, bucket, count, last_time,
                 cpu_count, cpu_sum, cpu_min, cpu_max, ram_count, ram_sum, ram_min, ram_max)
             SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::int8[], $4::timestamptz[],
                 $5::int8[], $6::float8[], $7::float8[], $8::float8[], $9::int8[], $10::float8[], $11::float8[], $12::float8[])
             -- A metric with no value yet stays NULL until one comes, as SQL's sum() does.
             ON CONFLICT (server_id, bucket) DO UPDATE SET
                 count = t.count + EXCLUDED.count,
                 last_time = GREATEST(t.last_time, EXCLUDED.last_time),
                 cpu_count = coalesce(t.cpu_count + EXCLUDED.cpu_count, t.cpu_count, EXCLUDED.cpu_count),
                 cpu_sum = coalesce(t.cpu_sum + EXCLUDED.cpu_sum, t.cpu_sum, EXCLUDED.cpu_sum),
                 cpu_min = LEAST(t.cpu_min, EXCLUDED.cpu_min),
                 cpu_max = GREATEST(t.cpu_max, EXCLUDED.cpu_max),
                 ram_count = coalesce(t.ram_count + EXCLUDED.ram_count, t.ram_count, EXCLUDED.ram_count),
                 ram_sum = coalesce(t.ram_sum + EXCLUDED.ram_sum, t.ram_sum, EXCLUDED.ram_sum),
                 ram_min = LEAST(t.ram_min, EXCLUDED.ram_min),
                 ram_max = GREATEST(t.ram_max, EXCLUDED.ram_max)",
            &[&servers, &buckets, &counts, &lasts, &cc, &cs, &cmin, &cmax, &rc, &rs, &rmin, &rmax],
        )
        .await?;

        // One row per (minute, metric); the stored counts and the delta are added bin by bin.
        let add_counts = tx
            .prepare(
                "INSERT INTO fleet_hist_1m AS t (bucket, metric, shard, counts) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (bucket, metric, shard) DO UPDATE SET counts = ARRAY(
                     SELECT a + b FROM unnest(t.counts, EXCLUDED.counts) WITH ORDINALITY AS u(a, b, i) ORDER BY i)",
            )
            .await?;
        let mut histogram: Vec<_> = self.histogram.iter().collect();
        histogram.sort_unstable_by_key(|(key, _)| **key);
        for ((minute, metric), bins) in histogram {
            tx.execute(&add_counts, &[&ts(*minute), &HISTOGRAM_METRICS[*metric], &shard, bins]).await?;
        }
        Ok(())
    }
}

/// Migration 2: the rollup tables and views.
pub const MIGRATION: &str = r#"
    -- Updates of a minute's row find room on its page (fillfactor), so they stay
    -- heap-only and leave the indexes alone; chunks take the setting from the hypertable.
    CREATE TABLE metrics_1m (
        server_id text        NOT NULL,
        bucket    timestamptz NOT NULL,
        count     bigint      NOT NULL,
        last_time timestamptz NOT NULL,
        cpu_count bigint, cpu_sum double precision, cpu_min double precision, cpu_max double precision,
        ram_count bigint, ram_sum double precision, ram_min double precision, ram_max double precision,
        cpu_avg double precision GENERATED ALWAYS AS (cpu_sum / NULLIF(cpu_count, 0)) STORED,
        ram_avg double precision GENERATED ALWAYS AS (ram_sum / NULLIF(ram_count, 0)) STORED,
        PRIMARY KEY (server_id, bucket)
    ) WITH (fillfactor = 50);
    SELECT create_hypertable('metrics_1m', 'bucket', chunk_time_interval => interval '7 days');

    -- Per minute, metric and writing worker (shard: concurrent writers never wait on each
    -- other's rows; readers sum the shards): counts[i] is the number of values that round
    -- to (i - 1) / 10 points, clamped to [0, 100].
    CREATE TABLE fleet_hist_1m (
        bucket timestamptz NOT NULL,
        metric text        NOT NULL,
        shard  integer     NOT NULL,
        counts bigint[]    NOT NULL,
        PRIMARY KEY (bucket, metric, shard)
    );

    -- The q-quantile (percentile_disc) of a minute's histogram, in points.
    CREATE FUNCTION fleetflow_percentile(b timestamptz, m text, q double precision) RETURNS double precision
    LANGUAGE sql STABLE AS $$
        SELECT (i - 1) / 10.0 FROM (
            SELECT i, sum(sum(c)) OVER (ORDER BY i) AS cumulative, sum(sum(c)) OVER () AS total
            FROM fleet_hist_1m, unnest(counts) WITH ORDINALITY AS u(c, i)
            WHERE bucket = b AND metric = m GROUP BY i) h
        WHERE cumulative >= q * total ORDER BY i LIMIT 1
    $$;

    CREATE VIEW fleet_1m AS
    SELECT bucket,
           count(*)                                   AS servers,
           sum(count)::bigint                         AS reports,
           sum(cpu_sum) / NULLIF(sum(cpu_count), 0)   AS cpu_avg,
           max(cpu_max)                               AS cpu_max,
           fleetflow_percentile(bucket, 'cpu', 0.50)  AS cpu_p50,
           fleetflow_percentile(bucket, 'cpu', 0.95)  AS cpu_p95,
           fleetflow_percentile(bucket, 'cpu', 0.99)  AS cpu_p99,
           sum(ram_sum) / NULLIF(sum(ram_count), 0)   AS ram_avg,
           max(ram_max)                               AS ram_max,
           fleetflow_percentile(bucket, 'ram', 0.50)  AS ram_p50,
           fleetflow_percentile(bucket, 'ram', 0.95)  AS ram_p95,
           fleetflow_percentile(bucket, 'ram', 0.99)  AS ram_p99
    FROM metrics_1m GROUP BY bucket;

    -- Settings the job sets on start for the views (silent_after: --silent-after).
    CREATE TABLE fleetflow_settings (
        key   text PRIMARY KEY,
        value text NOT NULL
    );

    -- Servers whose newest record is within the last hour but older than silent_after.
    -- Derived from metrics_1m, so ingest keeps no separate last-seen table.
    CREATE VIEW silent_servers AS
    SELECT server_id, max(last_time) AS last_seen, now() - max(last_time) AS silent_for
    FROM metrics_1m WHERE bucket > now() - interval '61 minutes'
    GROUP BY server_id
    HAVING max(last_time) > now() - interval '1 hour'
       AND max(last_time) < now() - coalesce(
           (SELECT value::interval FROM fleetflow_settings WHERE key = 'silent_after'), interval '30 seconds');
"#;

/// Sets the `silent_after` threshold the `silent_servers` view reads (the view is fixed SQL,
/// so several processes starting at once never race on DDL).
pub async fn set_silent_after(
    client: &tokio_postgres::Client,
    silent_after: std::time::Duration,
) -> Result<(), SinkError> {
    client
        .execute(
            "INSERT INTO fleetflow_settings (key, value) VALUES ('silent_after', $1)
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[&format!("{} milliseconds", silent_after.as_millis())],
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(server: &str, time_us: i64, cpu: Option<f64>, ram: Option<f64>) -> Metric {
        Metric { server_id: server.into(), time_us, cpu, ram, extra: Default::default() }
    }

    #[test]
    fn rows_fold_into_minutes_and_histograms() {
        let rows = [
            m("a", 60_000_000 + 5, Some(10.0), Some(50.0)),
            m("a", 119_999_999, Some(30.0), None),
            m("a", 120_000_000, Some(20.04), Some(1.0)),
            m("b", 61_000_000, Some(250.0), None),
        ];
        let mut d = RollupDelta::default();
        for row in &rows {
            d.add(row);
        }
        let a1 = &d.minutes[&("a", 60_000_000)];
        assert_eq!(a1.count, 2);
        assert_eq!(a1.last_time_us, 119_999_999);
        assert_eq!(a1.cpu, Agg { count: 2, sum: 40.0, min: 10.0, max: 30.0 });
        assert_eq!(a1.ram, Agg { count: 1, sum: 50.0, min: 50.0, max: 50.0 });
        assert_eq!(d.minutes[&("a", 120_000_000)].count, 1);
        assert_eq!(d.histogram[&(120_000_000, 0)][200], 1);
        assert_eq!(d.histogram[&(120_000_000, 1)][10], 1);
        let cpu_first_minute = &d.histogram[&(60_000_000, 0)];
        assert_eq!(cpu_first_minute[1000], 1, "values over 100 count at the top");
        assert_eq!((cpu_first_minute[100], cpu_first_minute[300]), (1, 1));
        assert_eq!(cpu_first_minute.iter().sum::<i64>(), 3);
        assert_eq!(d.histogram[&(60_000_000, 1)].iter().sum::<i64>(), 1, "ram of the first minute");
    }

    #[test]
    fn negative_times_bucket_downwards() {
        let row = m("a", -1, Some(-3.0), None);
        let mut d = RollupDelta::default();
        d.add(&row);
        assert!(d.minutes.contains_key(&("a", -60_000_000)));
        assert_eq!(d.histogram[&(-60_000_000, 0)][0], 1, "values below 0 count at the bottom");
    }
}
