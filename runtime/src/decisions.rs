//! Local decisions: per-window results published to the site broker so that
//! machines and operators on site can act within milliseconds, without the
//! cloud. Decisions never go to the cloud uplink (they are a different type,
//! on a different connection).

mod config;
pub use config::{DecisionMode, DecisionsConfig};

use std::collections::HashMap;
use std::sync::Arc;

use rumqttc::{AsyncClient, QoS};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::inference::Inferred;
use crate::metrics::Metrics;
use crate::mqtt::render_topic;

/// One window's decision.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// Sensor.
    pub sensor: String,
    /// Group.
    pub group: String,
    /// Event time of the window's last sample.
    pub ts: i64,
    /// Class (classifiers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// Score.
    pub score: f32,
    /// Anomaly (detectors).
    pub anomaly: bool,
}

/// Most sensors whose last class [`DecisionFilter`] remembers.
const LAST_MAX: usize = 100_000;

/// Chooses which windows become decisions.
#[derive(Debug)]
pub struct DecisionFilter {
    mode: DecisionMode,
    labels: Vec<String>,
    last: HashMap<Arc<str>, Option<usize>>,
}

impl DecisionFilter {
    /// A filter for `mode` over a model with `labels`.
    pub fn new(mode: DecisionMode, labels: Vec<String>) -> Self {
        Self {
            mode,
            labels,
            last: HashMap::new(),
        }
    }

    /// The decision for a result, if the mode wants one.
    pub fn decide(&mut self, inf: &Inferred) -> Option<Decision> {
        let p = inf.prediction.as_ref()?;
        let wanted = match self.mode {
            DecisionMode::All => true,
            DecisionMode::Anomalies => p.anomaly,
            DecisionMode::Changes => {
                // Bounded under sensor churn (issue 18, item 8): when full,
                // forgotten at once; each sensor's next window then counts
                // as a change.
                if self.last.len() >= LAST_MAX && !self.last.contains_key(&inf.sensor) {
                    self.last.clear();
                }
                let prev = self.last.insert(inf.sensor.clone(), p.class);
                prev != Some(p.class) || p.anomaly
            }
        };
        wanted.then(|| Decision {
            sensor: inf.sensor.to_string(),
            group: inf.group.to_string(),
            ts: inf.ts_ms,
            class: p.class.and_then(|c| self.labels.get(c).cloned()),
            score: p.score,
            anomaly: p.anomaly,
        })
    }
}

/// Publish decisions to the site broker until the channel closes or shutdown.
pub async fn run_sink(
    cfg: DecisionsConfig,
    gateway: String,
    rx: flume::Receiver<Decision>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), crate::mqtt::MqttSetupError> {
    let options = crate::mqtt::options(&cfg.broker, &gateway, "decisions")?;
    let (client, mut eventloop) = AsyncClient::new(options, cfg.queue_capacity.max(1));
    let poller = tokio::spawn(async move {
        loop {
            if let Err(e) = eventloop.poll().await {
                tracing::warn!(error = %e, "site broker (decisions) connection failed");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    });
    loop {
        let d = tokio::select! {
            d = rx.recv_async() => match d { Ok(d) => d, Err(_) => break },
            _ = shutdown.cancelled() => break,
        };
        let topic = render_topic(
            &cfg.topic,
            &[
                ("gateway", &gateway),
                ("group", &d.group),
                ("sensor", &d.sensor),
            ],
        );
        let payload = serde_json::to_vec(&d).unwrap_or_default();
        match client.try_publish(topic, QoS::AtMostOnce, false, payload) {
            Ok(()) => metrics.decisions_published.inc(),
            Err(_) => metrics.decisions_dropped.inc(),
        };
    }
    let _ = client.try_disconnect();
    poller.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_models::Prediction;

    fn inf(sensor: &str, class: usize, anomaly: bool) -> Inferred {
        Inferred {
            sensor: Arc::from(sensor),
            group: Arc::from("g"),
            ts_ms: 1,
            readings: vec![1],
            prediction: Some(Prediction {
                class: Some(class),
                score: 0.9,
                anomaly,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn modes() {
        let labels = vec!["a".to_string(), "b".to_string()];
        let mut changes = DecisionFilter::new(DecisionMode::Changes, labels.clone());
        let seq = [
            inf("s", 0, false),
            inf("s", 0, false),
            inf("s", 1, false),
            inf("t", 1, false),
            inf("s", 1, true),
        ];
        let got: Vec<bool> = seq.iter().map(|i| changes.decide(i).is_some()).collect();
        assert_eq!(got, vec![true, false, true, true, true]);
        let mut anomalies = DecisionFilter::new(DecisionMode::Anomalies, labels.clone());
        assert!(anomalies.decide(&inf("s", 0, false)).is_none());
        assert!(anomalies.decide(&inf("s", 0, true)).is_some());
        let mut all = DecisionFilter::new(DecisionMode::All, labels);
        let d = all.decide(&inf("s", 1, false)).unwrap();
        assert_eq!(d.class.as_deref(), Some("b"));
        let mut tail = inf("s", 0, false);
        tail.prediction = None;
        assert!(all.decide(&tail).is_none(), "tails carry no decision");
    }
}
