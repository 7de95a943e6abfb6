//! The sampling decision. Envoy's rule: the first hop decides (at the configured random
//! percentage) and every later hop follows the decision it receives in the headers, so a trace is
//! whole or absent. Istio: "If the upstream has made a sampling decision, it is respected".

use super::context::Extracted;

/// Why a request is (not) traced, for debugging and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionReason {
    /// The caller's headers carried a decision (B3 sampled/flags, W3C flags).
    Parent,
    /// No decision came in: drawn at the configured percentage.
    Random,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub sampled: bool,
    pub reason: DecisionReason,
}

/// Resolution of the random draw: a percentage with four decimals (Envoy's `RandomSampling` is a
/// `Percent`, and Istio documents values such as 0.01).
const SCALE: f64 = 10_000.0;

/// Follows an incoming decision; otherwise draws with probability `percent` / 100. Out-of-range
/// or NaN percentages are clamped (validation rejects them before they get here).
pub fn decide(incoming: &Extracted, percent: f64) -> Decision {
    if let Some(sampled) = incoming.sampled {
        return Decision {
            sampled,
            reason: DecisionReason::Parent,
        };
    }
    Decision {
        sampled: draw(percent),
        reason: DecisionReason::Random,
    }
}

fn draw(percent: f64) -> bool {
    let threshold = if percent.is_nan() {
        0
    } else {
        (percent.clamp(0.0, 100.0) * SCALE).round() as u32
    };
    fastrand::u32(0..(100 * SCALE as u32)) < threshold
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incoming_decision_wins_over_percentage() {
        let no = Extracted {
            parent: None,
            sampled: Some(false),
        };
        let yes = Extracted {
            parent: None,
            sampled: Some(true),
        };
        for _ in 0..100 {
            assert!(!decide(&no, 100.0).sampled);
            assert!(decide(&yes, 0.0).sampled);
        }
        assert_eq!(decide(&no, 100.0).reason, DecisionReason::Parent);
    }

    #[test]
    fn edges_are_exact() {
        let none = Extracted::default();
        for _ in 0..10_000 {
            assert!(!decide(&none, 0.0).sampled);
            assert!(decide(&none, 100.0).sampled);
            assert!(!decide(&none, f64::NAN).sampled);
            assert!(decide(&none, 250.0).sampled);
        }
        assert_eq!(decide(&none, 1.0).reason, DecisionReason::Random);
    }

    #[test]
    fn one_percent_is_about_one_percent() {
        // 200,000 draws at 1 %: mean 2,000, sd ~44.5; ±400 is ~9 sd.
        let none = Extracted::default();
        let hits = (0..200_000).filter(|_| decide(&none, 1.0).sampled).count();
        assert!((1_600..=2_400).contains(&hits), "{hits} of 200000 at 1 %");
    }
}
