//! The [`Governor`]: the shadow/probation state machine, without I/O.

use crate::aggregate::Aggregate;

use super::{GovernanceConfig, RegistryState};

/// What the governor learns from one aggregate.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// The active model (`name@version`).
    pub active: String,
    /// Inferences of the active model in the window.
    pub inferences: u64,
    /// Its anomaly rate (detectors).
    pub anomaly_rate: Option<f64>,
    /// Its mean score.
    pub mean_score: Option<f64>,
    /// The shadow model, its inferences and its agreement with the active one.
    pub shadow: Option<(String, u64, f64)>,
}

impl Observation {
    /// From an aggregate.
    pub fn of(a: &Aggregate) -> Self {
        Self {
            active: format!("{}@{}", a.model.name, a.model.version),
            inferences: a.inferences,
            anomaly_rate: a.anomaly_rate,
            mean_score: a.score.as_ref().map(|s| s.mean),
            shadow: a.shadow.as_ref().map(|s| {
                (
                    format!("{}@{}", s.model.name, s.model.version),
                    s.inferences,
                    s.agreement,
                )
            }),
        }
    }
}

/// What the governor decides. Each verdict names the state it was made in,
/// so that it is only carried out if the registry is still in that state (an
/// operator may have changed it meanwhile).
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Nothing to do.
    Continue,
    /// Stop the candidate's shadow run.
    RejectCandidate {
        /// The candidate.
        candidate: String,
        /// Why.
        why: String,
    },
    /// Roll the model on probation back to its baseline.
    Rollback {
        /// The model on probation.
        model: String,
        /// The model it replaced.
        baseline: String,
        /// Why.
        why: String,
    },
    /// The probation is over.
    ProbationPassed {
        /// The model that passed.
        model: String,
        /// The model it replaced.
        baseline: String,
    },
}

/// Thresholds of the governor.
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    /// Least agreement with the shadow / baseline.
    pub min_agreement: f64,
    /// Fewest inferences (active, or shadow for agreement) for an aggregate to count.
    pub min_inferences: u64,
    /// Aggregates that must pass before a probation ends.
    pub probation_windows: u32,
    /// Highest anomaly rate of a model on probation.
    pub max_anomaly_rate: Option<f64>,
    /// Lowest mean score of a model on probation.
    pub min_mean_score: Option<f64>,
}

impl From<&GovernanceConfig> for Thresholds {
    fn from(c: &GovernanceConfig) -> Self {
        Self {
            min_agreement: c.min_agreement,
            min_inferences: c.min_inferences,
            probation_windows: c.probation_windows,
            max_anomaly_rate: c.max_anomaly_rate,
            min_mean_score: c.min_mean_score,
        }
    }
}

/// What the governor watches for.
#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Steady,
    Shadow {
        candidate: String,
    },
    Probation {
        model: String,
        baseline: String,
        passed: u32,
    },
}

/// The shadow/probation state machine. No I/O: it reads observations and
/// returns verdicts; the governance task acts on them.
#[derive(Debug, Clone)]
pub struct Governor {
    thresholds: Thresholds,
    phase: Phase,
}

impl Governor {
    /// A governor with these thresholds, watching nothing yet.
    pub fn new(thresholds: Thresholds) -> Self {
        Self {
            thresholds,
            phase: Phase::Steady,
        }
    }

    /// Follow the registry's desired state.
    pub fn follow(&mut self, state: &RegistryState) {
        let next = if let Some(c) = &state.candidate {
            Phase::Shadow {
                candidate: c.clone(),
            }
        } else if let Some(b) = &state.probation {
            let model = state.active_id().to_string();
            match &self.phase {
                // Keep the count of a probation already under way.
                Phase::Probation {
                    model: m,
                    baseline,
                    passed,
                } if *m == model && baseline == b => Phase::Probation {
                    model,
                    baseline: b.clone(),
                    passed: *passed,
                },
                _ => Phase::Probation {
                    model,
                    baseline: b.clone(),
                    passed: 0,
                },
            }
        } else {
            Phase::Steady
        };
        self.phase = next;
    }

    /// Judge one aggregate.
    pub fn observe(&mut self, o: &Observation) -> Verdict {
        let t = &self.thresholds;
        match &mut self.phase {
            Phase::Steady => Verdict::Continue,
            Phase::Shadow { candidate } => match &o.shadow {
                Some((id, n, agreement)) if id == candidate && *n >= t.min_inferences => {
                    if *agreement < t.min_agreement {
                        let why = format!(
                            "agreement {agreement:.3} with {} under {} over {n} windows",
                            o.active, t.min_agreement
                        );
                        let candidate = candidate.clone();
                        self.phase = Phase::Steady;
                        Verdict::RejectCandidate { candidate, why }
                    } else {
                        Verdict::Continue
                    }
                }
                _ => Verdict::Continue,
            },
            Phase::Probation {
                model,
                baseline,
                passed,
            } => {
                if o.active != *model || o.inferences < t.min_inferences {
                    return Verdict::Continue;
                }
                let mut why = Vec::new();
                if let Some((id, n, agreement)) = &o.shadow
                    && id == baseline
                    && *n >= t.min_inferences
                    && *agreement < t.min_agreement
                {
                    why.push(format!(
                        "agreement {agreement:.3} with {baseline} under {}",
                        t.min_agreement
                    ));
                }
                if let (Some(max), Some(rate)) = (t.max_anomaly_rate, o.anomaly_rate)
                    && rate > max
                {
                    why.push(format!("anomaly rate {rate:.3} above {max}"));
                }
                if let (Some(min), Some(mean)) = (t.min_mean_score, o.mean_score)
                    && mean < min
                {
                    why.push(format!("mean score {mean:.3} under {min}"));
                }
                if !why.is_empty() {
                    let why = format!("{model} on probation: {}", why.join("; "));
                    let (model, baseline) = (model.clone(), baseline.clone());
                    self.phase = Phase::Steady;
                    return Verdict::Rollback {
                        model,
                        baseline,
                        why,
                    };
                }
                *passed += 1;
                if *passed >= t.probation_windows {
                    let (model, baseline) = (model.clone(), baseline.clone());
                    self.phase = Phase::Steady;
                    Verdict::ProbationPassed { model, baseline }
                } else {
                    Verdict::Continue
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::governance::CONFIGURED;

    fn thresholds() -> Thresholds {
        Thresholds {
            min_agreement: 0.8,
            min_inferences: 5,
            probation_windows: 3,
            max_anomaly_rate: Some(0.5),
            min_mean_score: None,
        }
    }

    fn obs(
        active: &str,
        shadow: Option<(&str, u64, f64)>,
        anomaly_rate: Option<f64>,
    ) -> Observation {
        Observation {
            active: active.into(),
            inferences: 10,
            anomaly_rate,
            mean_score: Some(0.9),
            shadow: shadow.map(|(id, n, a)| (id.to_string(), n, a)),
        }
    }

    #[test]
    fn a_disagreeing_candidate_is_rejected() {
        let mut s = RegistryState::default();
        s.shadow("m@2.0.0", "cli").unwrap();
        let mut g = Governor::new(thresholds());
        g.follow(&s);
        assert_eq!(
            g.observe(&obs("m@1.0.0", Some(("m@2.0.0", 10, 0.95)), None)),
            Verdict::Continue
        );
        assert_eq!(
            g.observe(&obs("m@1.0.0", Some(("m@2.0.0", 3, 0.1)), None)),
            Verdict::Continue,
            "too few windows to judge"
        );
        match g.observe(&obs("m@1.0.0", Some(("m@2.0.0", 10, 0.5)), None)) {
            Verdict::RejectCandidate { candidate, why } => {
                assert_eq!(candidate, "m@2.0.0");
                assert!(why.contains("0.500"), "{why}")
            }
            v => panic!("expected a rejection, got {v:?}"),
        }
    }

    #[test]
    fn probation_rolls_back_on_a_breach_and_passes_otherwise() {
        let mut s = RegistryState::default();
        s.promote(Some("m@2.0.0"), true, "cli").unwrap();
        let mut g = Governor::new(thresholds());
        g.follow(&s);
        // Another model's aggregates (before the swap reached inference) do not count.
        assert_eq!(
            g.observe(&obs(CONFIGURED, None, Some(0.9))),
            Verdict::Continue
        );
        assert_eq!(
            g.observe(&obs("m@2.0.0", Some((CONFIGURED, 10, 0.9)), Some(0.1))),
            Verdict::Continue
        );
        match g.observe(&obs("m@2.0.0", Some((CONFIGURED, 10, 0.9)), Some(0.7))) {
            Verdict::Rollback {
                model,
                baseline,
                why,
            } => {
                assert_eq!((model.as_str(), baseline.as_str()), ("m@2.0.0", CONFIGURED));
                assert!(why.contains("anomaly rate 0.700"), "{why}")
            }
            v => panic!("expected a rollback, got {v:?}"),
        }
        let mut g = Governor::new(thresholds());
        g.follow(&s);
        match g.observe(&obs("m@2.0.0", Some((CONFIGURED, 10, 0.2)), Some(0.1))) {
            Verdict::Rollback { why, .. } => assert!(why.contains("agreement 0.200"), "{why}"),
            v => panic!("expected a rollback, got {v:?}"),
        }
        let mut g = Governor::new(thresholds());
        g.follow(&s);
        let good = obs("m@2.0.0", Some((CONFIGURED, 10, 0.9)), Some(0.1));
        assert_eq!(g.observe(&good), Verdict::Continue);
        assert_eq!(g.observe(&good), Verdict::Continue);
        // Re-reading the same state keeps the count.
        g.follow(&s);
        assert!(matches!(g.observe(&good), Verdict::ProbationPassed { .. }));
        assert_eq!(g.observe(&good), Verdict::Continue, "steady afterwards");
    }
}
