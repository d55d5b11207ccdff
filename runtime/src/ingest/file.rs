//! File source: JSON Lines or CSV from a path or stdin, for replay and batch runs.

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio_util::sync::CancellationToken;

use super::{IngestCtx, IngestError};
use crate::check::Collector;
use crate::clock::now_ms;
use crate::ingest::reading::CsvLayout;
use serde::Deserialize;
use std::path::PathBuf;

/// Format of a file source.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    /// One JSON reading (or array of readings) per line.
    #[default]
    Jsonl,
    /// A header row with `sensor`, `ts`, value columns and optional `attr.*` columns.
    Csv,
}

/// `type = "file"`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// Source name.
    #[serde(default = "default_file_name")]
    pub name: String,
    /// Path, or `-` for stdin.
    pub path: PathBuf,
    /// Format.
    #[serde(default)]
    pub format: FileFormat,
}

fn default_file_name() -> String {
    "file".into()
}

impl FileSourceConfig {
    /// Check this source's table.
    pub fn check(&self, c: &mut Collector) {
        if self.path.as_os_str().is_empty() {
            c.push("path", "must not be empty (use \"-\" for stdin)");
        }
    }
}

/// Read the whole input, then return.
pub async fn run(
    cfg: FileSourceConfig,
    ctx: IngestCtx,
    shutdown: CancellationToken,
) -> Result<(), IngestError> {
    let io_err = |e: std::io::Error| IngestError::Io {
        source_name: ctx.name.clone(),
        message: format!("{}: {e}", cfg.path.display()),
    };
    let reader: Box<dyn AsyncRead + Unpin + Send> = if cfg.path.as_os_str() == "-" {
        Box::new(tokio::io::stdin())
    } else {
        Box::new(tokio::fs::File::open(&cfg.path).await.map_err(io_err)?)
    };
    read_lines(reader, cfg.format, &ctx, &shutdown)
        .await
        .map_err(io_err)
}

/// Decode every line of `reader` and deliver it.
pub async fn read_lines(
    reader: impl AsyncRead + Unpin,
    format: FileFormat,
    ctx: &IngestCtx,
    shutdown: &CancellationToken,
) -> Result<(), std::io::Error> {
    let mut lines = BufReader::new(reader);
    let mut layout: Option<CsvLayout> = None;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            n = lines.read_until(b'\n', &mut buf) => n?,
        };
        if n == 0 {
            return Ok(());
        }
        let line = trim_newline(&buf);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let results = match format {
            FileFormat::Jsonl => ctx.validator.decode_json(line, None, now_ms()),
            FileFormat::Csv => {
                let text = String::from_utf8_lossy(line);
                match &layout {
                    None => {
                        match CsvLayout::from_header(&text) {
                            Ok(l) => layout = Some(l),
                            Err(e) => {
                                return Err(std::io::Error::new(
                                    std::io::ErrorKind::InvalidData,
                                    e,
                                ));
                            }
                        }
                        continue;
                    }
                    Some(l) => vec![l.decode(&ctx.validator, &text, now_ms())],
                }
            }
        };
        if !ctx.deliver(results).await {
            return Ok(());
        }
    }
}

fn trim_newline(b: &[u8]) -> &[u8] {
    let mut end = b.len();
    while end > 0 && (b[end - 1] == b'\n' || b[end - 1] == b'\r') {
        end -= 1;
    }
    &b[..end]
}
