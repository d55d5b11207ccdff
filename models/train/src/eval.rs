//! Evaluation metrics: accuracy, macro-F1 and the confusion matrix for
//! classifiers; precision, recall, F1 and ROC-AUC for anomaly detectors.

use serde::Serialize;

/// Classifier metrics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassifierMetrics {
    /// Correct over all.
    pub accuracy: f64,
    /// Unweighted mean of the per-class F1 scores (classes absent from both
    /// truth and prediction are left out).
    pub macro_f1: f64,
    /// `confusion[truth][predicted]`.
    pub confusion: Vec<Vec<u64>>,
    /// Per-class F1, in label order.
    pub per_class_f1: Vec<f64>,
    /// Samples evaluated.
    pub samples: usize,
}

/// Metrics of predicted classes against true classes (`classes` labels).
pub fn classifier_metrics(
    truth: &[usize],
    predicted: &[usize],
    classes: usize,
) -> ClassifierMetrics {
    let mut confusion = vec![vec![0u64; classes]; classes];
    let mut correct = 0usize;
    for (&t, &p) in truth.iter().zip(predicted) {
        if t < classes && p < classes {
            confusion[t][p] += 1;
        }
        if t == p {
            correct += 1;
        }
    }
    let mut per_class_f1 = Vec::with_capacity(classes);
    let mut sum = 0.0;
    let mut counted = 0usize;
    for (c, row) in confusion.iter().enumerate() {
        let tp = row[c] as f64;
        let column: f64 = confusion.iter().map(|r| r[c] as f64).sum();
        let fp = column - tp;
        let fn_ = row.iter().map(|&v| v as f64).sum::<f64>() - tp;
        let f1 = if tp + fp + fn_ == 0.0 {
            per_class_f1.push(f64::NAN);
            continue;
        } else {
            2.0 * tp / (2.0 * tp + fp + fn_)
        };
        per_class_f1.push(f1);
        sum += f1;
        counted += 1;
    }
    let n = truth.len().min(predicted.len());
    ClassifierMetrics {
        accuracy: if n == 0 {
            0.0
        } else {
            correct as f64 / n as f64
        },
        macro_f1: if counted == 0 {
            0.0
        } else {
            sum / counted as f64
        },
        confusion,
        per_class_f1,
        samples: n,
    }
}

/// Detector metrics at a threshold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DetectorMetrics {
    /// TP / (TP + FP); 0 when nothing was flagged.
    pub precision: f64,
    /// TP / (TP + FN); 0 when there is no anomaly.
    pub recall: f64,
    /// Harmonic mean of precision and recall.
    pub f1: f64,
    /// Area under the ROC curve of the scores; `None` when only one class is present.
    pub roc_auc: Option<f64>,
    /// Anomalies in the truth.
    pub positives: usize,
    /// Samples evaluated.
    pub samples: usize,
}

/// Metrics of anomaly `scores` (higher = more anomalous) against `truth`,
/// flagging scores above `threshold`.
pub fn detector_metrics(truth: &[bool], scores: &[f32], threshold: f32) -> DetectorMetrics {
    let (mut tp, mut fp, mut fn_) = (0f64, 0f64, 0f64);
    for (&t, &s) in truth.iter().zip(scores) {
        match (t, s > threshold) {
            (true, true) => tp += 1.0,
            (false, true) => fp += 1.0,
            (true, false) => fn_ += 1.0,
            _ => {}
        }
    }
    let precision = if tp + fp > 0.0 { tp / (tp + fp) } else { 0.0 };
    let recall = if tp + fn_ > 0.0 { tp / (tp + fn_) } else { 0.0 };
    let f1 = if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    };
    DetectorMetrics {
        precision,
        recall,
        f1,
        roc_auc: roc_auc(truth, scores),
        positives: truth.iter().filter(|t| **t).count(),
        samples: truth.len().min(scores.len()),
    }
}

/// ROC-AUC by the rank statistic (Mann-Whitney U), ties counted half.
pub fn roc_auc(truth: &[bool], scores: &[f32]) -> Option<f64> {
    let mut pairs: Vec<(f32, bool)> = scores.iter().copied().zip(truth.iter().copied()).collect();
    let pos = pairs.iter().filter(|p| p.1).count();
    let neg = pairs.len() - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Average ranks over ties.
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < pairs.len() {
        let mut j = i;
        while j + 1 < pairs.len() && pairs[j + 1].0 == pairs[i].0 {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum_pos += avg_rank * pairs[i..=j].iter().filter(|p| p.1).count() as f64;
        i = j + 1;
    }
    let u = rank_sum_pos - (pos * (pos + 1)) as f64 / 2.0;
    Some(u / (pos as f64 * neg as f64))
}

/// The `q` quantile (0..=1) of `values` by linear interpolation.
pub fn quantile(values: &[f32], q: f64) -> f32 {
    if values.is_empty() {
        return f32::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f32::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = (pos - lo as f64) as f32;
    v[lo] + (v[hi] - v[lo]) * frac
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifier() {
        let m = classifier_metrics(&[0, 0, 1, 1, 2], &[0, 1, 1, 1, 2], 3);
        assert!((m.accuracy - 0.8).abs() < 1e-12);
        assert_eq!(
            m.confusion,
            vec![vec![1, 1, 0], vec![0, 2, 0], vec![0, 0, 1]]
        );
        // F1: class0 2/3, class1 0.8, class2 1.
        assert!((m.macro_f1 - (2.0 / 3.0 + 0.8 + 1.0) / 3.0).abs() < 1e-12);
    }

    #[test]
    fn detector_and_auc() {
        let truth = [false, false, true, true];
        let scores = [0.1, 0.4, 0.35, 0.8];
        let m = detector_metrics(&truth, &scores, 0.3);
        assert!((m.precision - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.recall - 1.0).abs() < 1e-12);
        assert!((m.roc_auc.unwrap() - 0.75).abs() < 1e-12);
        assert_eq!(roc_auc(&[false, false], &[0.1, 0.2]), None);
        assert!((roc_auc(&[false, true], &[0.5, 0.5]).unwrap() - 0.5).abs() < 1e-12);
    }

    #[test]
    fn quantiles() {
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), 2.0);
        assert_eq!(quantile(&[1.0, 2.0], 1.0), 2.0);
        assert!((quantile(&[0.0, 10.0], 0.95) - 9.5).abs() < 1e-6);
    }
}
