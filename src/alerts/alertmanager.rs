//! Telling Prometheus Alertmanager, through its v2 API (`POST /api/v2/alerts`), the way
//! Prometheus does: every alert with its labels, `startsAt`, and an `endsAt` that is the
//! moment it ended or, while it fires, a few resend intervals ahead (so an Alertmanager that
//! stops hearing from a dead job resolves its alerts by itself). Firing and recently ended
//! alerts are sent again every resend interval; Alertmanager deduplicates by labels.
//!
//! An Alertmanager that cannot be reached is logged once when it goes away and once when it
//! is back; the `alerts` table stays the record, and the next resend catches up.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

/// One alert as Alertmanager should hold it.
#[derive(Clone, Debug, PartialEq)]
pub struct AmAlert {
    pub labels: BTreeMap<String, String>,
    pub summary: String,
    pub value: Option<f64>,
    pub starts_at: DateTime<Utc>,
    /// `None` while firing.
    pub ends_at: Option<DateTime<Utc>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PostableAlert<'a> {
    labels: &'a BTreeMap<String, String>,
    annotations: BTreeMap<&'static str, String>,
    starts_at: String,
    ends_at: String,
}

/// An Alertmanager to tell.
#[derive(Debug)]
pub struct Alertmanager {
    url: String,
    client: reqwest::Client,
    /// How far ahead `endsAt` of a firing alert lies.
    valid_for: chrono::Duration,
    reachable: AtomicBool,
}

/// A URL that is not http(s)://host[:port][/path].
#[derive(Debug, thiserror::Error)]
#[error("--alertmanager-url {0:?} is not an http:// URL such as http://127.0.0.1:9093")]
pub struct BadUrl(pub String);

impl Alertmanager {
    pub fn new(url: &str, resend_interval: Duration) -> Result<Alertmanager, BadUrl> {
        let parsed = reqwest::Url::parse(url).map_err(|_| BadUrl(url.to_owned()))?;
        if parsed.scheme() != "http" || parsed.host_str().is_none() {
            return Err(BadUrl(url.to_owned()));
        }
        let client =
            reqwest::Client::builder().timeout(Duration::from_secs(10)).build().map_err(|_| BadUrl(url.to_owned()))?;
        Ok(Alertmanager {
            url: format!("{}/api/v2/alerts", url.trim_end_matches('/')),
            client,
            // As Prometheus: four resend intervals.
            valid_for: chrono::Duration::from_std(resend_interval * 4).unwrap_or(chrono::Duration::minutes(4)),
            reachable: AtomicBool::new(true),
        })
    }

    /// Sends the alerts; a failure is logged (once per outage) and left to the next resend.
    pub async fn send(&self, alerts: &[AmAlert]) {
        if alerts.is_empty() {
            return;
        }
        let now = Utc::now();
        let body: Vec<PostableAlert> = alerts.iter().map(|a| self.postable(a, now)).collect();
        let body = serde_json::to_vec(&body).expect("alerts serialize");
        let result = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .and_then(|r| r.error_for_status());
        match result {
            Ok(_) => {
                if !self.reachable.swap(true, Ordering::Relaxed) {
                    tracing::info!(url = %self.url, "Alertmanager is reachable again");
                }
            }
            Err(e) => {
                if self.reachable.swap(false, Ordering::Relaxed) {
                    tracing::warn!(url = %self.url, error = %e, "cannot reach Alertmanager; alerts stay in the alerts table and are sent again every resend interval");
                }
            }
        }
    }

    fn postable<'a>(&self, alert: &'a AmAlert, now: DateTime<Utc>) -> PostableAlert<'a> {
        let mut annotations = BTreeMap::from([("summary", alert.summary.clone())]);
        if let Some(v) = alert.value {
            annotations.insert("value", format!("{v}"));
        }
        let ends_at = alert.ends_at.unwrap_or(now + self.valid_for);
        let rfc3339 = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Millis, true);
        PostableAlert {
            labels: &alert.labels,
            annotations,
            starts_at: rfc3339(alert.starts_at),
            ends_at: rfc3339(ends_at),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_http() {
        assert!(Alertmanager::new("http://127.0.0.1:9093", Duration::from_secs(60)).is_ok());
        for bad in ["127.0.0.1:9093", "ftp://x", "http://", "not a url"] {
            let err = Alertmanager::new(bad, Duration::from_secs(60)).unwrap_err();
            assert!(err.to_string().contains("is not an http:// URL"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_firing_alert_ends_four_resend_intervals_ahead_and_a_resolved_one_when_it_ended() {
        let am = Alertmanager::new("http://127.0.0.1:9093/", Duration::from_secs(60)).unwrap();
        assert_eq!(am.url, "http://127.0.0.1:9093/api/v2/alerts");
        let now = DateTime::from_timestamp(1_000_000, 0).unwrap();
        let mut alert = AmAlert {
            labels: BTreeMap::from([("alertname".into(), "cpu-hot".into())]),
            summary: "cpu avg above 90 for 3m".into(),
            value: Some(93.5),
            starts_at: now - chrono::Duration::minutes(3),
            ends_at: None,
        };
        let p = am.postable(&alert, now);
        assert_eq!(p.ends_at, (now + chrono::Duration::minutes(4)).to_rfc3339_opts(SecondsFormat::Millis, true));
        assert_eq!(p.annotations["value"], "93.5");
        alert.ends_at = Some(now);
        let json = serde_json::to_value(am.postable(&alert, now)).unwrap();
        assert_eq!(json["endsAt"], "1970-01-12T13:46:40.000Z");
        assert_eq!(json["labels"]["alertname"], "cpu-hot");
        assert_eq!(json["startsAt"], "1970-01-12T13:43:40.000Z");
    }
}
