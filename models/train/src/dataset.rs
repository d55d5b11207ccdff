//! Dataset loaders for training and evaluation.
//!
//! * [`load_ts`] / [`load_ts_with`] read the sktime/aeon `.ts` format of the
//!   UCR/UEA archive (`BasicMotions`, `ItalyPowerDemand`, `ACSF1`, ...).
//! * [`load_csv_windows`] cuts a CSV recording with a label column (such as
//!   the Daphnet freezing-of-gait recording, whose label is `is_anomaly`) into
//!   fixed-length windows.
//!
//! Both produce a [`Dataset`]: samples stored row-major as
//! `[n][channels][length]` `f32` values, with class indices into
//! [`Dataset::labels`]. Bad input gives a [`DatasetError`] naming the file and
//! line; the loaders never panic on it.
//!
//! `scripts/fetch-datasets.sh` puts the datasets into `<repo>/.cache/datasets/`.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Longest token quoted in an error message, in characters.
const MAX_TOKEN_IN_ERROR: usize = 40;

/// Errors from the dataset loaders. Every variant names the file; those about
/// its contents also give the 1-based line number.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DatasetError {
    /// The file could not be read (missing, unreadable, not UTF-8).
    #[error("{}: {}", .path.display(), .source)]
    Io {
        /// File being read.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file's structure is wrong: bad header line, data before `@data`,
    /// missing label, wrong number of CSV fields, ...
    #[error("{}:{}: {}", .path.display(), .line, .message)]
    Syntax {
        /// File being read.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A value is missing (`?`, `NaN` or, in a CSV, an empty field): the
    /// loaders do not impute missing values.
    #[error(
        "{}:{}: missing value in {} (missing values are not supported)",
        .path.display(), .line, .column
    )]
    MissingValue {
        /// File being read.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Where on the line: `channel N` (0-based) in a `.ts` file, the column
        /// name in a CSV file.
        column: String,
    },
    /// A value is not a finite number.
    #[error("{}:{}: {}: `{}` is not a finite number", .path.display(), .line, .column, .token)]
    BadNumber {
        /// File being read.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Where on the line: `channel N` (0-based) in a `.ts` file, the column
        /// name in a CSV file.
        column: String,
        /// The offending text (shortened when long).
        token: String,
    },
    /// A series has a different number of channels than the others (or than
    /// `@dimensions`).
    #[error("{}:{}: {} channels, expected {}", .path.display(), .line, .found, .expected)]
    ChannelCount {
        /// File being read.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Channels expected.
        expected: usize,
        /// Channels found.
        found: usize,
    },
    /// A channel has a different length than expected, with
    /// [`UnequalLength::Refuse`].
    #[error(
        "{}:{}: channel {} has {} values, expected {} (unequal lengths are refused; \
         load with UnequalLength::PadLast to pad)",
        .path.display(), .line, .channel, .found, .expected
    )]
    UnequalLength {
        /// File being read.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// 0-based channel index.
        channel: usize,
        /// Length expected (`@seriesLength`, or that of the first series).
        expected: usize,
        /// Length found.
        found: usize,
    },
    /// A series' class label is not among those declared by `@classLabel`.
    #[error("{}:{}: class label `{}` is not declared by @classLabel", .path.display(), .line, .label)]
    UnknownLabel {
        /// File being read.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The undeclared label (shortened when long).
        label: String,
    },
    /// The file holds no samples.
    #[error("{}: no samples", .path.display())]
    Empty {
        /// File being read.
        path: PathBuf,
    },
    /// The loader's arguments do not fit the file (window or hop of zero,
    /// window longer than the recording, unknown label column, ...).
    #[error("{}: {}", .path.display(), .message)]
    InvalidArgument {
        /// File being read.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// A labelled set of fixed-length multichannel time series.
///
/// Invariants kept by the loaders: `x.len() == y.len() * channels * length`
/// and every `y[i] < labels.len()`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Problem name: `@problemName` of a `.ts` file, else the file stem.
    pub name: String,
    /// Channels (dimensions) per sample.
    pub channels: usize,
    /// Time steps per channel.
    pub length: usize,
    /// Class names, indexed by `y`: in `@classLabel` order when the file
    /// declares them, else in order of first appearance.
    pub labels: Vec<String>,
    /// Channel names (the CSV feature columns); empty for `.ts` files.
    pub channel_names: Vec<String>,
    /// Sample values, row-major `[n][channels][length]`.
    pub x: Vec<f32>,
    /// Class of each sample, as an index into `labels`.
    pub y: Vec<usize>,
}

impl Dataset {
    /// Number of samples.
    #[must_use]
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Whether there are no samples.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Values per sample: `channels * length`.
    #[must_use]
    pub fn sample_len(&self) -> usize {
        self.channels * self.length
    }

    /// Number of classes: `labels.len()`.
    #[must_use]
    pub fn num_classes(&self) -> usize {
        self.labels.len()
    }

    /// Sample `i`: `channels * length` values, channel after channel.
    ///
    /// # Panics
    ///
    /// If `i >= self.len()`.
    #[must_use]
    pub fn sample(&self, i: usize) -> &[f32] {
        let n = self.sample_len();
        &self.x[i * n..(i + 1) * n]
    }

    /// Samples per class, indexed like `labels`.
    #[must_use]
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.labels.len()];
        for &c in &self.y {
            if let Some(n) = counts.get_mut(c) {
                *n += 1;
            }
        }
        counts
    }

    /// A dataset of the samples at `indices`, in that order, with the same
    /// name, shape and labels.
    ///
    /// # Panics
    ///
    /// If an index is `>= self.len()`.
    #[must_use]
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let n = self.sample_len();
        let mut x = Vec::with_capacity(indices.len() * n);
        let mut y = Vec::with_capacity(indices.len());
        for &i in indices {
            x.extend_from_slice(self.sample(i));
            y.push(self.y[i]);
        }
        Dataset {
            name: self.name.clone(),
            channels: self.channels,
            length: self.length,
            labels: self.labels.clone(),
            channel_names: self.channel_names.clone(),
            x,
            y,
        }
    }

    /// Deterministic stratified split into `(train, validation)`.
    ///
    /// Of each class, `round(count * fraction)` samples, picked by a shuffle
    /// seeded with `seed`, go to `validation`, the rest to `train`. `fraction`
    /// is clamped to `[0, 1]` (NaN counts as 0). Both parts keep the original
    /// sample order, and the labels, name and shape of `self`. The same data,
    /// fraction and seed always give the same split, on every platform.
    #[must_use]
    pub fn split_stratified(&self, fraction: f64, seed: u64) -> (Dataset, Dataset) {
        let fraction = if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 1.0)
        };
        let mut by_class: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, &c) in self.y.iter().enumerate() {
            by_class.entry(c).or_default().push(i);
        }
        let mut rng = SplitMix64::new(seed);
        let mut to_validation = vec![false; self.len()];
        for members in by_class.values_mut() {
            rng.shuffle(members);
            let k = (members.len() as f64 * fraction).round() as usize;
            for &i in members.iter().take(k) {
                to_validation[i] = true;
            }
        }
        let (validation, train): (Vec<usize>, Vec<usize>) =
            (0..self.len()).partition(|&i| to_validation[i]);
        (self.subset(&train), self.subset(&validation))
    }

    /// A stable content hash: hex SHA-256 over the shape, the labels, the bits
    /// of every value and the classes (not the name or channel names).
    #[must_use]
    pub fn fingerprint(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(b"outpost-dataset-v1\0");
        hasher.update((self.channels as u64).to_le_bytes());
        hasher.update((self.length as u64).to_le_bytes());
        hasher.update((self.labels.len() as u64).to_le_bytes());
        for label in &self.labels {
            hasher.update((label.len() as u64).to_le_bytes());
            hasher.update(label.as_bytes());
        }
        hasher.update((self.x.len() as u64).to_le_bytes());
        let mut buf: Vec<u8> = Vec::with_capacity(8 * 4096);
        for chunk in self.x.chunks(4096) {
            buf.clear();
            for v in chunk {
                buf.extend_from_slice(&v.to_bits().to_le_bytes());
            }
            hasher.update(buf.as_slice());
        }
        hasher.update((self.y.len() as u64).to_le_bytes());
        for chunk in self.y.chunks(4096) {
            buf.clear();
            for &c in chunk {
                buf.extend_from_slice(&(c as u64).to_le_bytes());
            }
            hasher.update(buf.as_slice());
        }
        hex::encode(hasher.finalize())
    }
}

/// What [`load_ts_with`] does when channels differ in length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnequalLength {
    /// Fail with [`DatasetError::UnequalLength`] unless every channel of every
    /// series has the same length (`@seriesLength` when declared).
    #[default]
    Refuse,
    /// Pad every channel to the longest length seen (at least
    /// `@seriesLength`) by repeating its last value.
    PadLast,
}

/// Load a `.ts` file (sktime/aeon format), refusing unequal lengths.
///
/// Same as [`load_ts_with`]`(path, UnequalLength::Refuse)`.
///
/// # Errors
///
/// As [`load_ts_with`].
pub fn load_ts(path: &Path) -> Result<Dataset, DatasetError> {
    load_ts_with(path, UnequalLength::Refuse)
}

/// Load a `.ts` file (sktime/aeon format).
///
/// The file has `#` comment lines and `@` header lines (keywords are
/// case-insensitive): `@problemName`, `@timeStamps`, `@missing`,
/// `@univariate`, `@dimensions N`, `@equalLength`, `@seriesLength N`,
/// `@classLabel true <labels...>` or `@classLabel false`, `@targetLabel`,
/// then `@data`. Each data line is one series: channels separated by `:`,
/// values by `,`, the class label after the last `:`.
///
/// Not supported, with an error naming file and line: missing values (`?`),
/// `@timeStamps true`, and files without labels (`@classLabel false` without
/// `@targetLabel true`; with it, targets are read as string labels). Unequal
/// lengths are handled as `unequal` says. Unknown header lines are ignored.
///
/// # Errors
///
/// [`DatasetError::Io`] when the file cannot be read; otherwise a variant
/// naming the file and line of the first problem in it.
pub fn load_ts_with(path: &Path, unequal: UnequalLength) -> Result<Dataset, DatasetError> {
    let text = read_text(path)?;
    parse_ts(path, &text, unequal)
}

/// Header of a `.ts` file, as far as read.
#[derive(Default)]
struct TsHeader {
    name: Option<String>,
    timestamps: bool,
    univariate: Option<bool>,
    dimensions: Option<usize>,
    series_length: Option<usize>,
    class_label: Option<bool>,
    declared_labels: Vec<String>,
    target_label: Option<bool>,
}

/// One parsed data line of a `.ts` file.
struct TsSeries {
    line: usize,
    channels: Vec<Vec<f32>>,
    class: usize,
}

fn parse_ts(path: &Path, text: &str, unequal: UnequalLength) -> Result<Dataset, DatasetError> {
    let syntax = |line: usize, message: String| DatasetError::Syntax {
        path: path.to_path_buf(),
        line,
        message,
    };

    let mut header = TsHeader::default();
    let mut in_data = false;
    let mut last_line = 0;
    let mut labels: Vec<String> = Vec::new();
    let mut label_index: HashMap<String, usize> = HashMap::new();
    let mut labels_declared = false;
    let mut expected_channels: Option<usize> = None;
    let mut expected_length: Option<usize> = None;
    let mut series: Vec<TsSeries> = Vec::new();

    for (idx, raw) in text.lines().enumerate() {
        let line_no = idx + 1;
        last_line = line_no;
        let line = raw.trim_start_matches('\u{feff}').trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }

        if !in_data {
            let Some(rest) = line.strip_prefix('@') else {
                return Err(syntax(
                    line_no,
                    "data line before `@data` (expected a `@` header or `#` comment)".to_string(),
                ));
            };
            let mut words = rest.split_whitespace();
            let keyword = words.next().unwrap_or_default().to_ascii_lowercase();
            let args: Vec<&str> = words.collect();
            match keyword.as_str() {
                "problemname" => header.name = Some(args.join(" ")),
                "timestamps" => header.timestamps = header_bool(path, line_no, &keyword, &args)?,
                "missing" | "equallength" => {
                    header_bool(path, line_no, &keyword, &args)?;
                }
                "univariate" => {
                    header.univariate = Some(header_bool(path, line_no, &keyword, &args)?);
                }
                "dimensions" => {
                    header.dimensions = Some(header_count(path, line_no, &keyword, &args)?);
                }
                "serieslength" => {
                    header.series_length = Some(header_count(path, line_no, &keyword, &args)?);
                }
                "classlabel" => {
                    let flag = header_bool(path, line_no, &keyword, &args)?;
                    header.class_label = Some(flag);
                    header.declared_labels = if flag {
                        args.iter().skip(1).map(|s| (*s).to_string()).collect()
                    } else {
                        Vec::new()
                    };
                }
                "targetlabel" => {
                    header.target_label = Some(header_bool(path, line_no, &keyword, &args)?);
                }
                "data" => {
                    if header.timestamps {
                        return Err(syntax(
                            line_no,
                            "`@timeStamps true` is not supported".to_string(),
                        ));
                    }
                    if header.class_label == Some(false) && header.target_label != Some(true) {
                        return Err(syntax(
                            line_no,
                            "no labels (`@classLabel false`): a labelled dataset is required"
                                .to_string(),
                        ));
                    }
                    for label in &header.declared_labels {
                        if label_index.insert(label.clone(), labels.len()).is_some() {
                            return Err(syntax(
                                line_no,
                                format!("@classLabel declares `{}` twice", shorten(label)),
                            ));
                        }
                        labels.push(label.clone());
                    }
                    labels_declared = !labels.is_empty();
                    expected_channels = header
                        .dimensions
                        .or((header.univariate == Some(true)).then_some(1));
                    expected_length = header.series_length;
                    in_data = true;
                }
                _ => {} // Unknown header lines are ignored.
            }
            continue;
        }

        // A data line: `v,v,...:v,v,...:label`.
        let Some((body, label)) = line.rsplit_once(':') else {
            return Err(syntax(
                line_no,
                "missing class label (expected `values:...:label`)".to_string(),
            ));
        };
        let label = label.trim();
        if label.is_empty() {
            return Err(syntax(line_no, "empty class label".to_string()));
        }
        let class = match label_index.get(label) {
            Some(&c) => c,
            None if labels_declared => {
                return Err(DatasetError::UnknownLabel {
                    path: path.to_path_buf(),
                    line: line_no,
                    label: shorten(label),
                });
            }
            None => {
                label_index.insert(label.to_string(), labels.len());
                labels.push(label.to_string());
                labels.len() - 1
            }
        };

        let mut channels = Vec::new();
        for (c, chan) in body.split(':').enumerate() {
            let column = || format!("channel {c}");
            if chan.trim().is_empty() {
                return Err(syntax(line_no, format!("channel {c} has no values")));
            }
            let mut values = Vec::new();
            for token in chan.split(',') {
                let token = token.trim();
                match parse_value(token) {
                    Ok(v) => values.push(v),
                    Err(ValueProblem::Missing) => {
                        return Err(DatasetError::MissingValue {
                            path: path.to_path_buf(),
                            line: line_no,
                            column: column(),
                        });
                    }
                    Err(ValueProblem::Malformed) => {
                        return Err(DatasetError::BadNumber {
                            path: path.to_path_buf(),
                            line: line_no,
                            column: column(),
                            token: shorten(token),
                        });
                    }
                }
            }
            if unequal == UnequalLength::Refuse {
                let expected = *expected_length.get_or_insert(values.len());
                if values.len() != expected {
                    return Err(DatasetError::UnequalLength {
                        path: path.to_path_buf(),
                        line: line_no,
                        channel: c,
                        expected,
                        found: values.len(),
                    });
                }
            }
            channels.push(values);
        }
        let expected = *expected_channels.get_or_insert(channels.len());
        if channels.len() != expected {
            return Err(DatasetError::ChannelCount {
                path: path.to_path_buf(),
                line: line_no,
                expected,
                found: channels.len(),
            });
        }
        series.push(TsSeries {
            line: line_no,
            channels,
            class,
        });
    }

    if !in_data {
        return Err(syntax(last_line.max(1), "no `@data` line".to_string()));
    }
    if series.is_empty() {
        return Err(DatasetError::Empty {
            path: path.to_path_buf(),
        });
    }

    let channels = expected_channels.unwrap_or(0);
    let longest = series
        .iter()
        .flat_map(|s| s.channels.iter().map(Vec::len))
        .max()
        .unwrap_or(0);
    let length = match unequal {
        UnequalLength::Refuse => expected_length.unwrap_or(longest),
        UnequalLength::PadLast => longest.max(header.series_length.unwrap_or(0)),
    };

    let mut x = Vec::with_capacity(series.len() * channels * length);
    let mut y = Vec::with_capacity(series.len());
    for s in &series {
        for (c, values) in s.channels.iter().enumerate() {
            // Channels are never empty (checked above), and with `Refuse`
            // they all have `length` values already.
            let Some(&last) = values.last() else {
                return Err(syntax(s.line, format!("channel {c} has no values")));
            };
            x.extend_from_slice(values);
            x.extend(std::iter::repeat_n(
                last,
                length.saturating_sub(values.len()),
            ));
        }
        y.push(s.class);
    }

    let name = header
        .name
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| stem_name(path));
    Ok(Dataset {
        name,
        channels,
        length,
        labels,
        channel_names: Vec::new(),
        x,
        y,
    })
}

/// Load a CSV recording as windows of `window` consecutive rows, starting
/// every `hop` rows (windows that would run past the end are dropped).
///
/// The first non-empty line is a header of column names. `label_column`
/// names the label column; every other column is a numeric feature (a
/// channel), except a first column named `timestamp`, `time` or nothing
/// (an index), which is skipped unparsed. Fields are split on `,` (no
/// quoting support; surrounding double quotes of a field are removed).
///
/// Labels: for a column named `is_anomaly` (values `0`/`1`, or
/// `false`/`true`), labels are `["0", "1"]` and a window is `"1"` if any of
/// its rows is; for any other column, a window takes the label of its last
/// row, and labels are in order of first appearance in the file.
///
/// # Errors
///
/// [`DatasetError::InvalidArgument`] when `window` or `hop` is 0 or the file
/// has fewer rows than `window`; [`DatasetError::Io`] when it cannot be read;
/// otherwise a variant naming the file and line of the first problem, such as
/// a missing or non-numeric feature value, a wrong number of fields, or an
/// `is_anomaly` value other than 0 or 1.
pub fn load_csv_windows(
    path: &Path,
    window: usize,
    hop: usize,
    label_column: &str,
) -> Result<Dataset, DatasetError> {
    let invalid = |message: String| DatasetError::InvalidArgument {
        path: path.to_path_buf(),
        message,
    };
    if window == 0 || hop == 0 {
        return Err(invalid(format!(
            "window ({window}) and hop ({hop}) must be at least 1"
        )));
    }
    let text = read_text(path)?;
    let syntax = |line: usize, message: String| DatasetError::Syntax {
        path: path.to_path_buf(),
        line,
        message,
    };

    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim_start_matches('\u{feff}').trim()))
        .filter(|(_, l)| !l.is_empty());
    let Some((header_line, header)) = lines.next() else {
        return Err(DatasetError::Empty {
            path: path.to_path_buf(),
        });
    };
    let names: Vec<String> = header.split(',').map(|f| unquote(f).to_string()).collect();
    let Some(label_idx) = names.iter().position(|n| n == label_column) else {
        return Err(syntax(
            header_line,
            format!(
                "no column named `{}` (columns: {})",
                shorten(label_column),
                names.join(",")
            ),
        ));
    };
    let skip_first = label_idx != 0 && names.first().is_some_and(|n| is_index_column(n));
    let features: Vec<usize> = (0..names.len())
        .filter(|&i| i != label_idx && !(skip_first && i == 0))
        .collect();
    if features.is_empty() {
        return Err(syntax(header_line, "no feature columns".to_string()));
    }
    let channel_names: Vec<String> = features.iter().map(|&i| names[i].clone()).collect();
    let anomaly = label_column.eq_ignore_ascii_case("is_anomaly");

    let channels = features.len();
    let mut values: Vec<f32> = Vec::new(); // [row][channel]
    let mut row_class: Vec<usize> = Vec::new();
    let mut labels: Vec<String> = if anomaly {
        vec!["0".to_string(), "1".to_string()]
    } else {
        Vec::new()
    };
    let mut label_index: HashMap<String, usize> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), i))
        .collect();

    for (line_no, line) in lines {
        let fields: Vec<&str> = line.split(',').map(unquote).collect();
        if fields.len() != names.len() {
            return Err(syntax(
                line_no,
                format!("{} fields, expected {}", fields.len(), names.len()),
            ));
        }
        for &i in &features {
            let token = fields[i];
            let parsed = if token.is_empty() {
                Err(ValueProblem::Missing)
            } else {
                parse_value(token)
            };
            match parsed {
                Ok(v) => values.push(v),
                Err(ValueProblem::Missing) => {
                    return Err(DatasetError::MissingValue {
                        path: path.to_path_buf(),
                        line: line_no,
                        column: names[i].clone(),
                    });
                }
                Err(ValueProblem::Malformed) => {
                    return Err(DatasetError::BadNumber {
                        path: path.to_path_buf(),
                        line: line_no,
                        column: names[i].clone(),
                        token: shorten(token),
                    });
                }
            }
        }
        let label = fields[label_idx];
        let class = if anomaly {
            match parse_flag(label) {
                Some(flag) => usize::from(flag),
                None => {
                    return Err(syntax(
                        line_no,
                        format!("{label_column}: `{}` is not 0 or 1", shorten(label)),
                    ));
                }
            }
        } else if label.is_empty() {
            return Err(syntax(line_no, format!("{label_column}: empty label")));
        } else if let Some(&c) = label_index.get(label) {
            c
        } else {
            label_index.insert(label.to_string(), labels.len());
            labels.push(label.to_string());
            labels.len() - 1
        };
        row_class.push(class);
    }

    let rows = row_class.len();
    if rows == 0 {
        return Err(DatasetError::Empty {
            path: path.to_path_buf(),
        });
    }
    if rows < window {
        return Err(invalid(format!(
            "{rows} rows, fewer than one window of {window}"
        )));
    }

    let starts: Vec<usize> = (0..=rows - window).step_by(hop).collect();
    let mut x = Vec::with_capacity(starts.len() * channels * window);
    let mut y = Vec::with_capacity(starts.len());
    for &start in &starts {
        let end = start + window;
        for c in 0..channels {
            x.extend((start..end).map(|r| values[r * channels + c]));
        }
        let classes = &row_class[start..end];
        let class = if anomaly {
            usize::from(classes.contains(&1))
        } else {
            classes.last().copied().unwrap_or_default()
        };
        y.push(class);
    }

    Ok(Dataset {
        name: stem_name(path),
        channels,
        length: window,
        labels,
        channel_names,
        x,
        y,
    })
}

/// Why a value could not be read.
enum ValueProblem {
    /// `?` or `NaN`.
    Missing,
    /// Not a finite number.
    Malformed,
}

fn parse_value(token: &str) -> Result<f32, ValueProblem> {
    if token == "?" || token.eq_ignore_ascii_case("nan") {
        return Err(ValueProblem::Missing);
    }
    match token.parse::<f32>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(ValueProblem::Malformed),
    }
}

/// `0`/`1` (also `0.0`, `1.0`, `false`, `true`) as a flag.
fn parse_flag(token: &str) -> Option<bool> {
    if token.eq_ignore_ascii_case("true") {
        return Some(true);
    }
    if token.eq_ignore_ascii_case("false") {
        return Some(false);
    }
    match token {
        "0" | "0.0" => Some(false),
        "1" | "1.0" => Some(true),
        _ => None,
    }
}

fn header_bool(
    path: &Path,
    line: usize,
    keyword: &str,
    args: &[&str],
) -> Result<bool, DatasetError> {
    match args.first() {
        Some(a) if a.eq_ignore_ascii_case("true") => Ok(true),
        Some(a) if a.eq_ignore_ascii_case("false") => Ok(false),
        _ => Err(DatasetError::Syntax {
            path: path.to_path_buf(),
            line,
            message: format!("@{keyword} needs `true` or `false`"),
        }),
    }
}

fn header_count(
    path: &Path,
    line: usize,
    keyword: &str,
    args: &[&str],
) -> Result<usize, DatasetError> {
    match args.first().and_then(|a| a.parse::<usize>().ok()) {
        Some(n) if n > 0 => Ok(n),
        _ => Err(DatasetError::Syntax {
            path: path.to_path_buf(),
            line,
            message: format!("@{keyword} needs a positive whole number"),
        }),
    }
}

fn read_text(path: &Path) -> Result<String, DatasetError> {
    fs::read_to_string(path).map_err(|source| DatasetError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// File stem without a `_TRAIN`/`_TEST` suffix.
fn stem_name(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    for suffix in ["_TRAIN", "_TEST"] {
        if let Some(base) = stem.strip_suffix(suffix) {
            return base.to_string();
        }
    }
    stem
}

fn is_index_column(name: &str) -> bool {
    name.is_empty() || name.eq_ignore_ascii_case("timestamp") || name.eq_ignore_ascii_case("time")
}

fn unquote(field: &str) -> &str {
    let field = field.trim();
    field
        .strip_prefix('"')
        .and_then(|f| f.strip_suffix('"'))
        .unwrap_or(field)
        .trim()
}

/// `token`, cut to [`MAX_TOKEN_IN_ERROR`] characters for an error message.
fn shorten(token: &str) -> String {
    let mut chars = token.chars();
    let mut out: String = chars.by_ref().take(MAX_TOKEN_IN_ERROR).collect();
    if chars.next().is_some() {
        out.push_str("...");
    }
    out
}

/// `SplitMix64` (Steele, Lea & Flood 2014): small, fast, and the same on every
/// platform, which is all a reproducible shuffle needs.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`), by multiply-shift.
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// Fisher-Yates shuffle.
    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, body).unwrap();
        path
    }

    const MULTI: &str = "\
# A toy multivariate problem.
@problemName Toy
@timeStamps false
@missing false
@univariate false
@dimensions 2
@equalLength true
@seriesLength 3
@classLabel true b a
@data
1,2,3:4,5,6:a
7,8,9:10,11,12:b
0.5,-1e-3,2:3,4,5:a
";

    #[test]
    fn multivariate_parse() {
        let dir = tempfile::tempdir().unwrap();
        let ds = load_ts(&write(dir.path(), "Toy_TRAIN.ts", MULTI)).unwrap();
        assert_eq!(ds.name, "Toy");
        assert_eq!((ds.len(), ds.channels, ds.length), (3, 2, 3));
        assert_eq!(ds.labels, ["b", "a"]);
        assert_eq!(ds.y, [1, 0, 1]);
        assert_eq!(ds.sample(0), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(ds.sample(1), [7.0, 8.0, 9.0, 10.0, 11.0, 12.0]);
        assert_eq!(ds.sample(2), [0.5, -1e-3, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(ds.x.len(), 18);
        assert!(ds.channel_names.is_empty());
        assert_eq!(ds.class_counts(), [1, 2]);
        assert!(!ds.is_empty());
    }

    #[test]
    fn univariate_parse_case_insensitive_headers() {
        let dir = tempfile::tempdir().unwrap();
        let body = "#c\n@ProblemName Uni\n@UNIVARIATE TRUE\n@SeriesLength 4\n\
                    @ClassLabel True 1 2\n@Data\n1,2,3,4:2\n\n5, 6 ,7,8:1\r\n";
        let ds = load_ts(&write(dir.path(), "u.ts", body)).unwrap();
        assert_eq!(ds.name, "Uni");
        assert_eq!((ds.len(), ds.channels, ds.length), (2, 1, 4));
        assert_eq!(ds.labels, ["1", "2"]);
        assert_eq!(ds.y, [1, 0]);
        assert_eq!(ds.sample(1), [5.0, 6.0, 7.0, 8.0]);
    }

    #[test]
    fn labels_in_first_seen_order_without_class_label_header() {
        let dir = tempfile::tempdir().unwrap();
        let body = "@data\n1,2:dog\n3,4:cat\n5,6:dog\n7,8:bird of prey\n";
        let ds = load_ts(&write(dir.path(), "Animals_TEST.ts", body)).unwrap();
        assert_eq!(ds.name, "Animals");
        assert_eq!(ds.labels, ["dog", "cat", "bird of prey"]);
        assert_eq!(ds.y, [0, 1, 0, 2]);
    }

    #[test]
    fn undeclared_label_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let body = "@classLabel true a b\n@data\n1,2:a\n3,4:c\n";
        let err = load_ts(&write(dir.path(), "l.ts", body)).unwrap_err();
        assert!(
            matches!(&err, DatasetError::UnknownLabel { line: 4, label, .. } if label == "c"),
            "{err:?}"
        );
    }

    const UNEQUAL: &str = "\
@problemName U
@dimensions 2
@equalLength false
@classLabel true x y
@data
1,2,3:4,5,6:x
1,2:4,5,6,7:y
";

    #[test]
    fn unequal_length_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "u.ts", UNEQUAL);
        let err = load_ts(&path).unwrap_err();
        assert!(
            matches!(
                err,
                DatasetError::UnequalLength {
                    line: 7,
                    channel: 0,
                    expected: 3,
                    found: 2,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains(&format!("{}:7:", path.display())));
    }

    #[test]
    fn unequal_length_padded_with_last_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "u.ts", UNEQUAL);
        let ds = load_ts_with(&path, UnequalLength::PadLast).unwrap();
        assert_eq!((ds.len(), ds.channels, ds.length), (2, 2, 4));
        assert_eq!(ds.sample(0), [1.0, 2.0, 3.0, 3.0, 4.0, 5.0, 6.0, 6.0]);
        assert_eq!(ds.sample(1), [1.0, 2.0, 2.0, 2.0, 4.0, 5.0, 6.0, 7.0]);
    }

    #[test]
    fn declared_series_length_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let body = "@seriesLength 3\n@data\n1,2,3:a\n1,2,3,4:a\n";
        let err = load_ts(&write(dir.path(), "s.ts", body)).unwrap_err();
        assert!(
            matches!(
                err,
                DatasetError::UnequalLength {
                    line: 4,
                    expected: 3,
                    found: 4,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn missing_value_error_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let body = "@missing true\n@data\n1,2,3:a\n1,?,3:b\n";
        let path = write(dir.path(), "m.ts", body);
        let err = load_ts(&path).unwrap_err();
        assert!(
            matches!(&err, DatasetError::MissingValue { line: 4, column, .. } if column == "channel 0"),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.starts_with(&format!("{}:4:", path.display())), "{msg}");
        assert!(msg.contains("missing value"), "{msg}");
    }

    #[test]
    fn malformed_number_error() {
        let dir = tempfile::tempdir().unwrap();
        let body = "@data\n1,2,3:4,5,6:a\n1,2,3:4,abc,6:a\n";
        let path = write(dir.path(), "b.ts", body);
        let err = load_ts(&path).unwrap_err();
        assert!(
            matches!(
                &err,
                DatasetError::BadNumber { line: 3, column, token, .. }
                    if column == "channel 1" && token == "abc"
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains(&format!("{}:3:", path.display())));
    }

    #[test]
    fn channel_count_mismatch_error() {
        let dir = tempfile::tempdir().unwrap();
        let body = "@dimensions 2\n@data\n1,2:3,4:a\n1,2:b\n";
        let err = load_ts(&write(dir.path(), "c.ts", body)).unwrap_err();
        assert!(
            matches!(
                err,
                DatasetError::ChannelCount {
                    line: 4,
                    expected: 2,
                    found: 1,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn bad_ts_inputs_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            "",
            "# only a comment\n",
            "@data\n",
            "1,2,3:a\n",
            "@dimensions x\n@data\n1:a\n",
            "@dimensions 0\n@data\n1:a\n",
            "@seriesLength\n@data\n1:a\n",
            "@univariate maybe\n@data\n1:a\n",
            "@classLabel\n@data\n1:a\n",
            "@classLabel true a a\n@data\n1:a\n",
            "@classLabel false\n@data\n1,2,3\n",
            "@timeStamps true\n@data\n(1,2),(2,3):a\n",
            "@data\n1,2,3\n",
            "@data\n1,2,3:\n",
            "@data\n:a\n",
            "@data\n1,,3:a\n",
            "@data\n1,2,3,:a\n",
            "@data\n1,inf,3:a\n",
            "@data\n1,NaN,3:a\n",
            "@data\n1e99,2:a\n",
            "@data\n:::\n",
        ];
        for (i, body) in cases.iter().enumerate() {
            let path = write(dir.path(), &format!("bad{i}.ts"), body);
            assert!(load_ts(&path).is_err(), "case {i} {body:?} loaded");
            assert!(
                load_ts_with(&path, UnequalLength::PadLast).is_err(),
                "case {i} {body:?} loaded with PadLast"
            );
        }
        let err = load_ts(&dir.path().join("does-not-exist.ts")).unwrap_err();
        assert!(matches!(err, DatasetError::Io { .. }), "{err:?}");
        let path = dir.path().join("binary.ts");
        fs::write(&path, b"\xff\xfe\x00\x80").unwrap();
        assert!(matches!(load_ts(&path), Err(DatasetError::Io { .. })));
    }

    #[test]
    fn long_tokens_are_shortened_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let body = format!("@data\n1,{}:a\n", "x".repeat(500));
        let err = load_ts(&write(dir.path(), "t.ts", &body)).unwrap_err();
        assert!(err.to_string().len() < 300, "{err}");
    }

    const CSV: &str = "\
timestamp,a,b,is_anomaly
1970-01-01 00:00:00.000,1,10,0
1970-01-01 00:00:00.015,2,20,0
1970-01-01 00:00:00.031,3,30,1
1970-01-01 00:00:00.046,4,40,0
1970-01-01 00:00:00.062,5,50,0
1970-01-01 00:00:00.078,6,60,0
1970-01-01 00:00:00.093,7,70,0
";

    #[test]
    fn csv_windows_is_anomaly_any_rule() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "rec.csv", CSV);
        let ds = load_csv_windows(&path, 3, 2, "is_anomaly").unwrap();
        assert_eq!(ds.name, "rec");
        assert_eq!(ds.channel_names, ["a", "b"]);
        assert_eq!((ds.len(), ds.channels, ds.length), (3, 2, 3));
        assert_eq!(ds.labels, ["0", "1"]);
        // Windows start at rows 0, 2, 4; row 2 is anomalous.
        assert_eq!(ds.y, [1, 1, 0]);
        assert_eq!(ds.sample(0), [1.0, 2.0, 3.0, 10.0, 20.0, 30.0]);
        assert_eq!(ds.sample(2), [5.0, 6.0, 7.0, 50.0, 60.0, 70.0]);

        let ds = load_csv_windows(&path, 2, 2, "is_anomaly").unwrap();
        // Rows 0-1, 2-3, 4-5; row 6 is left over.
        assert_eq!(ds.y, [0, 1, 0]);
        let ds = load_csv_windows(&path, 7, 1, "is_anomaly").unwrap();
        assert_eq!(ds.y, [1]);
    }

    #[test]
    fn csv_windows_string_labels_take_last_row() {
        let dir = tempfile::tempdir().unwrap();
        let body = ",x,activity\n0,1.0,walk\n1,2.0,walk\n2,3.0,run\n3,4.0,run\n";
        let path = write(dir.path(), "act.csv", body);
        let ds = load_csv_windows(&path, 2, 1, "activity").unwrap();
        assert_eq!(ds.channel_names, ["x"]);
        assert_eq!((ds.len(), ds.channels, ds.length), (3, 1, 2));
        assert_eq!(ds.labels, ["walk", "run"]);
        assert_eq!(ds.y, [0, 1, 1]);
        assert_eq!(ds.sample(1), [2.0, 3.0]);
    }

    #[test]
    fn csv_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "rec.csv", CSV);
        assert!(matches!(
            load_csv_windows(&path, 3, 1, "label"),
            Err(DatasetError::Syntax { line: 1, .. })
        ));
        assert!(matches!(
            load_csv_windows(&path, 0, 1, "is_anomaly"),
            Err(DatasetError::InvalidArgument { .. })
        ));
        assert!(matches!(
            load_csv_windows(&path, 3, 0, "is_anomaly"),
            Err(DatasetError::InvalidArgument { .. })
        ));
        assert!(matches!(
            load_csv_windows(&path, 8, 1, "is_anomaly"),
            Err(DatasetError::InvalidArgument { .. })
        ));

        let bad = write(dir.path(), "bad.csv", "time,a,is_anomaly\n0,1,0\n1,x,0\n");
        let err = load_csv_windows(&bad, 1, 1, "is_anomaly").unwrap_err();
        assert!(
            matches!(&err, DatasetError::BadNumber { line: 3, column, .. } if column == "a"),
            "{err:?}"
        );
        let missing = write(
            dir.path(),
            "missing.csv",
            "time,a,is_anomaly\n0,1,0\n1,,0\n",
        );
        let err = load_csv_windows(&missing, 1, 1, "is_anomaly").unwrap_err();
        assert!(
            matches!(err, DatasetError::MissingValue { line: 3, .. }),
            "{err:?}"
        );
        let fields = write(dir.path(), "fields.csv", "a,b,is_anomaly\n1,2,0\n1,2\n");
        let err = load_csv_windows(&fields, 1, 1, "is_anomaly").unwrap_err();
        assert!(
            matches!(err, DatasetError::Syntax { line: 3, .. }),
            "{err:?}"
        );
        let flag = write(dir.path(), "flag.csv", "a,is_anomaly\n1,2\n");
        let err = load_csv_windows(&flag, 1, 1, "is_anomaly").unwrap_err();
        assert!(
            matches!(err, DatasetError::Syntax { line: 2, .. }),
            "{err:?}"
        );
        let only_label = write(dir.path(), "only.csv", "timestamp,is_anomaly\nt,0\n");
        assert!(load_csv_windows(&only_label, 1, 1, "is_anomaly").is_err());
        let empty = write(dir.path(), "empty.csv", "");
        assert!(matches!(
            load_csv_windows(&empty, 1, 1, "is_anomaly"),
            Err(DatasetError::Empty { .. })
        ));
        let header_only = write(dir.path(), "header.csv", "a,is_anomaly\n");
        assert!(matches!(
            load_csv_windows(&header_only, 1, 1, "is_anomaly"),
            Err(DatasetError::Empty { .. })
        ));
    }

    fn two_class_dataset() -> Dataset {
        // 30 samples of class 0, 10 of class 1, interleaved; sample i holds
        // [i, -i] so samples can be told apart.
        let n = 40;
        let y: Vec<usize> = (0..n).map(|i| usize::from(i % 4 == 3)).collect();
        let x: Vec<f32> = (0..n).flat_map(|i| [i as f32, -(i as f32)]).collect();
        Dataset {
            name: "two".to_string(),
            channels: 1,
            length: 2,
            labels: vec!["a".to_string(), "b".to_string()],
            channel_names: Vec::new(),
            x,
            y,
        }
    }

    fn ids(ds: &Dataset) -> Vec<usize> {
        (0..ds.len()).map(|i| ds.sample(i)[0] as usize).collect()
    }

    #[test]
    fn stratified_split_sizes_and_determinism() {
        let ds = two_class_dataset();
        assert_eq!(ds.class_counts(), [30, 10]);
        let (train, val) = ds.split_stratified(0.25, 7);
        // round(30 * 0.25) = 8 and round(10 * 0.25) = 3 go to validation.
        assert_eq!(val.class_counts(), [8, 3]);
        assert_eq!(train.class_counts(), [22, 7]);
        assert_eq!(train.labels, ds.labels);
        assert_eq!((train.channels, train.length), (1, 2));

        // Disjoint, complete, in original order, samples kept intact.
        let (mut a, b) = (ids(&train), ids(&val));
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert!(b.windows(2).all(|w| w[0] < w[1]));
        a.extend(&b);
        a.sort_unstable();
        assert_eq!(a, (0..40).collect::<Vec<_>>());
        for part in [&train, &val] {
            for i in 0..part.len() {
                let id = part.sample(i)[0] as usize;
                assert_eq!(part.sample(i), ds.sample(id));
                assert_eq!(part.y[i], ds.y[id]);
            }
        }

        // Deterministic for a seed; another seed picks differently.
        let again = ds.split_stratified(0.25, 7);
        assert_eq!(again.0, train);
        assert_eq!(again.1, val);
        let (_, other) = ds.split_stratified(0.25, 8);
        assert_ne!(ids(&other), ids(&val));

        // Edge fractions.
        let (train, val) = ds.split_stratified(0.0, 1);
        assert_eq!((train.len(), val.len()), (40, 0));
        let (train, val) = ds.split_stratified(1.0, 1);
        assert_eq!((train.len(), val.len()), (0, 40));
        let (train, val) = ds.split_stratified(f64::NAN, 1);
        assert_eq!((train.len(), val.len()), (40, 0));
    }

    #[test]
    fn fingerprint_is_stable_and_content_sensitive() {
        let ds = two_class_dataset();
        let fp = ds.fingerprint();
        assert_eq!(fp.len(), 64);
        assert!(fp.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(fp, ds.clone().fingerprint());

        let mut renamed = ds.clone();
        renamed.name = "other".to_string();
        assert_eq!(renamed.fingerprint(), fp);

        let mut changed = ds.clone();
        changed.x[5] = 0.25;
        assert_ne!(changed.fingerprint(), fp);
        let mut changed = ds.clone();
        changed.y[0] = 1;
        assert_ne!(changed.fingerprint(), fp);
        let mut changed = ds.clone();
        changed.labels[1] = "c".to_string();
        assert_ne!(changed.fingerprint(), fp);
        let mut changed = ds;
        changed.length = 1;
        changed.channels = 2;
        assert_ne!(changed.fingerprint(), fp);
    }

    /// A file of the dataset cache; fails (does not skip) when it is missing.
    fn cached(rel: &str) -> PathBuf {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../.cache/datasets")
            .join(rel);
        assert!(
            path.is_file(),
            "dataset file {} is missing: run scripts/fetch-datasets.sh \
             (or scripts/setup.sh) from the repository root first",
            path.display()
        );
        path
    }

    #[test]
    fn real_basicmotions_train() {
        let ds = load_ts(&cached("BasicMotions/BasicMotions_TRAIN.ts")).unwrap();
        assert_eq!(ds.name, "BasicMotions");
        assert_eq!((ds.len(), ds.channels, ds.length), (40, 6, 100));
        assert_eq!(ds.labels, ["Standing", "Running", "Walking", "Badminton"]);
        assert_eq!(ds.class_counts(), [10, 10, 10, 10]);
        assert_eq!(ds.x.len(), 40 * 6 * 100);
        assert!(ds.x.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn real_univariate_power_datasets() {
        let ipd = load_ts(&cached("ItalyPowerDemand/ItalyPowerDemand_TRAIN.ts")).unwrap();
        assert_eq!((ipd.len(), ipd.channels, ipd.length), (67, 1, 24));
        assert_eq!(ipd.labels.len(), 2);
        let acsf1 = load_ts(&cached("ACSF1/ACSF1_TRAIN.ts")).unwrap();
        assert_eq!((acsf1.len(), acsf1.channels, acsf1.length), (100, 1, 1460));
        assert_eq!(acsf1.labels.len(), 10);
        assert!(acsf1.x.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn real_daphnet_windows() {
        let path = cached("Daphnet_S06R02E0/S06R02E0.csv");
        let ds = load_csv_windows(&path, 256, 128, "is_anomaly").unwrap();
        assert_eq!(ds.channels, 9);
        assert_eq!(
            ds.channel_names.first().map(String::as_str),
            Some("ankle_horiz_fwd")
        );
        assert_eq!(ds.labels, ["0", "1"]);
        // 7040 rows: windows start at 0, 128, ..., 6784.
        assert_eq!(ds.len(), (7040 - 256) / 128 + 1);
        assert_eq!(ds.x.len(), ds.len() * 9 * 256);
    }
}
