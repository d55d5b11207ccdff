//! Feature extractors over a window, shared by the runtime (inference) and the
//! trainer (`outpost_train::features`, over a whole dataset), so a feature
//! model sees the same numbers in both.
//!
//! Names: `rms`, `peak`, `crest`, `kurtosis`, `bands:N` (N energies of equal
//! width over the real FFT's bins, DC excluded). Output is channel-major:
//! for each channel, each extractor in order.

use std::sync::Arc;

use realfft::{RealFftPlanner, RealToComplex};

/// One feature extractor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// Root mean square.
    Rms,
    /// Largest absolute value.
    Peak,
    /// Peak over RMS.
    Crest,
    /// Fourth standardized moment (3 for a normal distribution).
    Kurtosis,
    /// Energies of this many equal-width frequency bands.
    Bands(usize),
}

impl Feature {
    /// Parse a name (`rms`, `bands:4`, ...).
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "rms" => Ok(Feature::Rms),
            "peak" => Ok(Feature::Peak),
            "crest" => Ok(Feature::Crest),
            "kurtosis" => Ok(Feature::Kurtosis),
            _ => match name.strip_prefix("bands:").map(str::parse::<usize>) {
                Some(Ok(n)) if n > 0 => Ok(Feature::Bands(n)),
                _ => Err(format!(
                    "unknown feature {name:?} (rms, peak, crest, kurtosis, bands:N)"
                )),
            },
        }
    }

    /// Values this extractor adds per channel.
    pub fn width(self) -> usize {
        match self {
            Feature::Bands(n) => n,
            _ => 1,
        }
    }
}

/// A set of extractors with a reusable FFT plan and scratch buffers.
pub struct Extractor {
    features: Vec<Feature>,
    length: usize,
    fft: Arc<dyn RealToComplex<f32>>,
    input: Vec<f32>,
    spectrum: Vec<realfft::num_complex::Complex<f32>>,
    scratch: Vec<realfft::num_complex::Complex<f32>>,
}

impl std::fmt::Debug for Extractor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Extractor")
            .field("features", &self.features)
            .field("length", &self.length)
            .finish()
    }
}

impl Extractor {
    /// Extractors `names` over series of `length` samples.
    pub fn new(names: &[String], length: usize) -> Result<Self, String> {
        let features = names
            .iter()
            .map(|n| Feature::parse(n))
            .collect::<Result<Vec<_>, _>>()?;
        if length < 2 {
            return Err("feature windows need at least 2 samples".into());
        }
        let fft = RealFftPlanner::<f32>::new().plan_fft_forward(length);
        let spectrum = fft.make_output_vec();
        let scratch = fft.make_scratch_vec();
        Ok(Self {
            features,
            length,
            input: vec![0.0; length],
            fft,
            spectrum,
            scratch,
        })
    }

    /// Values per channel.
    pub fn width(&self) -> usize {
        self.features.iter().map(|f| f.width()).sum()
    }

    /// Extract from one window laid out `[channels][length]`, appending
    /// `channels × width()` values to `out`.
    pub fn extract(&mut self, window: &[f32], out: &mut Vec<f32>) {
        for series in window.chunks_exact(self.length) {
            let n = series.len() as f64;
            let mean = series.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = series
                .iter()
                .map(|&v| (v as f64 - mean).powi(2))
                .sum::<f64>()
                / n;
            let rms = (series.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n).sqrt();
            let peak = series.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
            let mut spectrum_done = false;
            for f in &self.features {
                match *f {
                    Feature::Rms => out.push(rms as f32),
                    Feature::Peak => out.push(peak as f32),
                    Feature::Crest => out.push(if rms > 1e-12 {
                        (peak / rms) as f32
                    } else {
                        0.0
                    }),
                    Feature::Kurtosis => {
                        let m4 = series
                            .iter()
                            .map(|&v| (v as f64 - mean).powi(4))
                            .sum::<f64>()
                            / n;
                        out.push(if var > 1e-12 {
                            (m4 / (var * var)) as f32
                        } else {
                            0.0
                        });
                    }
                    Feature::Bands(bands) => {
                        if !spectrum_done {
                            for (dst, &v) in self.input.iter_mut().zip(series) {
                                *dst = v - mean as f32;
                            }
                            // Lengths match by construction (planned for `length`), so this cannot fail.
                            let _ = self.fft.process_with_scratch(
                                &mut self.input,
                                &mut self.spectrum,
                                &mut self.scratch,
                            );
                            spectrum_done = true;
                        }
                        let bins = &self.spectrum[1..];
                        for b in 0..bands {
                            let lo = b * bins.len() / bands;
                            let hi = ((b + 1) * bins.len() / bands).max(lo + 1).min(bins.len());
                            let e: f32 = bins[lo.min(bins.len())..hi]
                                .iter()
                                .map(|c| c.norm_sqr())
                                .sum();
                            out.push(e / n as f32);
                        }
                    }
                }
            }
        }
    }
}

/// Default extractors of a feature model: amplitude statistics and the
/// spectrum in eight bands, per channel.
pub const DEFAULT_FEATURES: [&str; 5] = ["rms", "peak", "crest", "kurtosis", "bands:8"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_statistics() {
        let names: Vec<String> = ["rms", "peak", "crest", "kurtosis", "bands:2"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut ex = Extractor::new(&names, 8).unwrap();
        assert_eq!(ex.width(), 6);
        let w = [1.0f32, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0];
        let mut out = Vec::new();
        ex.extract(&w, &mut out);
        assert!((out[0] - 1.0).abs() < 1e-6);
        assert!((out[1] - 1.0).abs() < 1e-6);
        assert!((out[2] - 1.0).abs() < 1e-6);
        assert!((out[3] - 1.0).abs() < 1e-6);
        // A Nyquist-rate square wave: all energy in the upper band.
        assert!(out[4] < 1e-6 && out[5] > 1.0);
        assert!(Feature::parse("bands:0").is_err());
    }
}
