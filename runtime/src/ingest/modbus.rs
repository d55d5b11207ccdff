//! The Modbus source: registers of one device polled at a fixed interval
//! over Modbus TCP, RTU on a serial line, or RTU framing over TCP (serial
//! device servers in raw mode), with `tokio-modbus`.
//!
//! Each poll reads the whole register map (contiguous registers of a kind in
//! one request) and makes one reading, timestamped when the poll starts,
//! with one value per register in map order: raw × scale + offset. A request
//! that fails (timeout, exception, broken connection) is retried up to
//! `retries` times, reconnecting after a timeout or a transport error; every
//! failure is counted by kind (`outpost_source_errors_total`), a poll that
//! still fails in `outpost_source_failed_reads_total`, and polls missed
//! because one ran late in `outpost_source_overruns_total`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio_modbus::client::{Client, Context};
use tokio_modbus::{ExceptionCode, Request, Response, Slave};
use tokio_util::sync::CancellationToken;

use super::pacer::Pacer;
use super::{IngestCtx, IngestError};
use crate::check::Collector;
use crate::clock::now_ms;
use crate::ingest::reading::Reading;
use std::path::PathBuf;

/// `type = "modbus"`: registers of one device, polled every
/// `poll_interval_ms`; one reading per poll with one value per register, in
/// the order of `registers`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModbusSourceConfig {
    /// Source name.
    #[serde(default = "default_modbus_name")]
    pub name: String,
    /// `tcp`, `rtu` (serial line) or `rtu_over_tcp`.
    pub transport: ModbusTransport,
    /// `tcp` and `rtu_over_tcp`: `host:port` of the device or gateway.
    #[serde(default)]
    pub address: Option<String>,
    /// RTU: the serial device, e.g. `/dev/ttyUSB0`.
    #[serde(default)]
    pub device: Option<PathBuf>,
    /// RTU: baud rate.
    #[serde(default = "default_baud")]
    pub baud_rate: u32,
    /// RTU: `none`, `even` or `odd`.
    #[serde(default)]
    pub parity: ModbusParity,
    /// RTU: 1 or 2.
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// Unit (slave) id.
    #[serde(default = "default_unit")]
    pub unit: u8,
    /// Time between polls.
    #[serde(default = "default_poll_ms")]
    pub poll_interval_ms: u64,
    /// Time allowed for one request.
    #[serde(default = "default_modbus_timeout_ms")]
    pub timeout_ms: u64,
    /// Retries of a failed request (after a timeout the connection is made anew).
    #[serde(default = "default_modbus_retries")]
    pub retries: u32,
    /// Sensor id of the readings; default: the source name.
    #[serde(default)]
    pub sensor: Option<String>,
    /// The register map.
    pub registers: Vec<ModbusRegister>,
}

fn default_modbus_name() -> String {
    "modbus".into()
}

fn default_baud() -> u32 {
    9600
}

fn default_stop_bits() -> u8 {
    1
}

fn default_unit() -> u8 {
    1
}

fn default_poll_ms() -> u64 {
    1000
}

fn default_modbus_timeout_ms() -> u64 {
    500
}

fn default_modbus_retries() -> u32 {
    2
}

/// Modbus transport.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ModbusTransport {
    /// Modbus TCP (MBAP header).
    Tcp,
    /// Modbus RTU on a serial line.
    Rtu,
    /// RTU framing over TCP (a serial device server in raw mode).
    RtuOverTcp,
}

/// Serial parity.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ModbusParity {
    /// None (the default).
    #[default]
    None,
    /// Even.
    Even,
    /// Odd.
    Odd,
}

/// One value of the register map.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModbusRegister {
    /// Name (documentation and logs).
    pub name: String,
    /// First register (0-based protocol address).
    pub address: u16,
    /// `holding`, `input`, `coil` or `discrete`.
    #[serde(default = "default_kind")]
    pub kind: RegisterKind,
    /// `u16`, `i16`, `u32`, `i32`, `f32`, `u64`, `i64`, `f64` (registers) or
    /// `bool` (coils and discrete inputs).
    #[serde(default = "default_data_type")]
    pub data_type: DataType,
    /// Value = raw × scale + offset.
    #[serde(default = "default_scale")]
    pub scale: f64,
    /// See `scale`.
    #[serde(default)]
    pub offset: f64,
    /// Unit of the value (documentation).
    #[serde(default)]
    pub unit: Option<String>,
    /// Byte order within a register: `big` (Modbus standard) or `little`.
    #[serde(default)]
    pub byte_order: Order,
    /// Register order of multi-register values: `big` (first register most
    /// significant) or `little`.
    #[serde(default)]
    pub word_order: Order,
}

fn default_kind() -> RegisterKind {
    RegisterKind::Holding
}

fn default_data_type() -> DataType {
    DataType::U16
}

fn default_scale() -> f64 {
    1.0
}

/// Register table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegisterKind {
    /// Holding registers (function 0x03).
    Holding,
    /// Input registers (0x04).
    Input,
    /// Coils (0x01).
    Coil,
    /// Discrete inputs (0x02).
    Discrete,
}

impl RegisterKind {
    fn is_bit(self) -> bool {
        matches!(self, Self::Coil | Self::Discrete)
    }

    /// Most items one request may read (Modbus application protocol 1.1b3).
    fn max_per_request(self) -> u16 {
        if self.is_bit() { 2000 } else { 125 }
    }
}

/// How the register words of a value are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataType {
    /// One register, unsigned.
    U16,
    /// One register, two's complement.
    I16,
    /// Two registers.
    U32,
    /// Two registers.
    I32,
    /// Two registers, IEEE 754.
    F32,
    /// Four registers.
    U64,
    /// Four registers.
    I64,
    /// Four registers, IEEE 754.
    F64,
    /// A coil or discrete input: 0 or 1.
    Bool,
}

impl DataType {
    /// Registers (or bits) the value takes.
    pub fn width(self) -> u16 {
        match self {
            Self::U16 | Self::I16 | Self::Bool => 1,
            Self::U32 | Self::I32 | Self::F32 => 2,
            Self::U64 | Self::I64 | Self::F64 => 4,
        }
    }
}

/// Byte order within a register, or register order within a value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// Most significant first (the Modbus standard).
    #[default]
    Big,
    /// Least significant first.
    Little,
}

/// The raw value of `words` (as many as `dt.width()`).
pub fn decode(words: &[u16], dt: DataType, byte_order: Order, word_order: Order) -> f64 {
    let mut bytes = Vec::with_capacity(words.len() * 2);
    let ordered: Vec<u16> = match word_order {
        Order::Big => words.to_vec(),
        Order::Little => words.iter().rev().copied().collect(),
    };
    for w in ordered {
        match byte_order {
            Order::Big => bytes.extend_from_slice(&w.to_be_bytes()),
            Order::Little => bytes.extend_from_slice(&w.to_le_bytes()),
        }
    }
    let mut be = [0u8; 8];
    let n = bytes.len().min(8);
    be[8 - n..].copy_from_slice(&bytes[..n]);
    let bits = u64::from_be_bytes(be);
    match dt {
        DataType::U16 | DataType::U32 | DataType::U64 | DataType::Bool => bits as f64,
        DataType::I16 => bits as u16 as i16 as f64,
        DataType::I32 => bits as u32 as i32 as f64,
        DataType::I64 => bits as i64 as f64,
        DataType::F32 => f32::from_bits(bits as u32) as f64,
        DataType::F64 => f64::from_bits(bits),
    }
}

impl ModbusSourceConfig {
    /// Check this source's table.
    pub fn check(&self, c: &mut Collector) {
        let m = self;
        match m.transport {
            ModbusTransport::Tcp | ModbusTransport::RtuOverTcp => match &m.address {
                None => c.push("address", "required for this transport (host:port)"),
                Some(a) => {
                    let port_ok = a.rsplit_once(':').is_some_and(|(h, p)| {
                        !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0)
                    });
                    if !port_ok {
                        c.push("address", format!("{a:?} is not host:port"));
                    }
                }
            },
            ModbusTransport::Rtu => {
                if m.device.is_none() {
                    c.push(
                        "device",
                        "required for transport \"rtu\" (e.g. /dev/ttyUSB0)",
                    );
                }
                if !(1..=2).contains(&m.stop_bits) {
                    c.push("stop_bits", "must be 1 or 2");
                }
                if m.baud_rate == 0 {
                    c.push("baud_rate", "must be positive");
                }
            }
        }
        if m.poll_interval_ms == 0 {
            c.push("poll_interval_ms", "must be at least 1");
        }
        if m.timeout_ms == 0 {
            c.push("timeout_ms", "must be at least 1");
        }
        if m.registers.is_empty() {
            c.push("registers", "at least one register is required");
        }
        for (i, r) in m.registers.iter().enumerate() {
            let p = format!("registers[{i}]");
            if r.kind.is_bit() != (r.data_type == DataType::Bool) {
                c.push(
                format!("{p}.data_type"),
                "coils and discrete inputs take data_type \"bool\"; registers take a number type",
            );
            }
            if u32::from(r.address) + u32::from(r.data_type.width()) > 65536 {
                c.push(format!("{p}.address"), "the value runs past register 65535");
            }
            if !r.scale.is_finite() || !r.offset.is_finite() {
                c.push(format!("{p}.scale"), "scale and offset must be finite");
            }
        }
    }
}

/// Errors of a poll.
#[derive(Debug, thiserror::Error)]
pub enum ModbusError {
    /// The device did not answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection could not be made.
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    /// The device answered with an exception.
    #[error("exception from the device: {0:?}")]
    Exception(ExceptionCode),
    /// The transport or the protocol failed.
    #[error("{0}")]
    Transport(#[from] tokio_modbus::Error),
    /// A response of the wrong length.
    #[error("short response: {got} items for {want}")]
    Short {
        /// Items received.
        got: usize,
        /// Items asked for.
        want: usize,
    },
}

impl ModbusError {
    /// The metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "timeout",
            Self::Connect(_) => "connect",
            Self::Exception(_) => "exception",
            Self::Transport(_) => "transport",
            Self::Short { .. } => "short_response",
        }
    }
}

/// One request: `count` items of `kind` from `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    kind: RegisterKind,
    start: u16,
    count: u16,
}

/// Requests covering the register map: contiguous or overlapping values of
/// a kind share one request, up to the protocol's limit.
fn plan(registers: &[ModbusRegister]) -> Vec<Span> {
    let mut items: Vec<(RegisterKind, u32, u32)> = registers
        .iter()
        .map(|r| {
            let s = u32::from(r.address);
            (r.kind, s, s + u32::from(r.data_type.width()))
        })
        .collect();
    items.sort();
    let mut spans: Vec<(RegisterKind, u32, u32)> = Vec::new();
    for (kind, s, e) in items {
        if let Some(last) = spans.last_mut()
            && last.0 == kind
            && s <= last.2
            && e.max(last.2) - last.1 <= u32::from(kind.max_per_request())
        {
            last.2 = last.2.max(e);
            continue;
        }
        spans.push((kind, s, e));
    }
    spans
        .into_iter()
        .map(|(kind, s, e)| Span {
            kind,
            start: s as u16,
            count: (e - s) as u16,
        })
        .collect()
}

/// A connection to one device and its register map.
pub struct Poller {
    cfg: ModbusSourceConfig,
    spans: Vec<Span>,
    ctx: Option<Context>,
}

impl Poller {
    /// For `cfg`; connects at the first poll.
    pub fn new(cfg: ModbusSourceConfig) -> Self {
        let spans = plan(&cfg.registers);
        Self {
            cfg,
            spans,
            ctx: None,
        }
    }

    /// Poll over `ctx`, a client already attached to a transport, instead
    /// of connecting (the Modbus fuzz target feeds responses this way).
    pub fn attach(&mut self, ctx: Context) {
        self.ctx = Some(ctx);
    }

    /// Connect (a free function of the config: `Context` is not `Sync`, so
    /// no `&Poller` may live across an await).
    async fn connect(cfg: &ModbusSourceConfig) -> Result<Context, ModbusError> {
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let slave = Slave(cfg.unit);
        let tcp = || async {
            let addr = cfg.address.as_deref().unwrap_or_default();
            tokio::net::TcpStream::connect(addr)
                .await
                .map_err(ModbusError::Connect)
        };
        let connecting = async {
            Ok(match cfg.transport {
                ModbusTransport::Tcp => {
                    tokio_modbus::client::tcp::attach_slave(tcp().await?, slave)
                }
                ModbusTransport::RtuOverTcp => {
                    tokio_modbus::client::rtu::attach_slave(tcp().await?, slave)
                }
                ModbusTransport::Rtu => {
                    use tokio_serial::SerialPortBuilderExt;
                    let device = cfg.device.clone().unwrap_or_default();
                    let port = tokio_serial::new(device.to_string_lossy(), cfg.baud_rate)
                        .data_bits(tokio_serial::DataBits::Eight)
                        .parity(match cfg.parity {
                            ModbusParity::None => tokio_serial::Parity::None,
                            ModbusParity::Even => tokio_serial::Parity::Even,
                            ModbusParity::Odd => tokio_serial::Parity::Odd,
                        })
                        .stop_bits(if cfg.stop_bits == 2 {
                            tokio_serial::StopBits::Two
                        } else {
                            tokio_serial::StopBits::One
                        })
                        .open_native_async()
                        .map_err(|e| ModbusError::Connect(e.into()))?;
                    tokio_modbus::client::rtu::attach_slave(port, slave)
                }
            })
        };
        tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| ModbusError::Timeout(timeout))?
    }

    async fn read(ctx: &mut Context, span: Span) -> Result<Vec<u16>, ModbusError> {
        let (start, count) = (span.start, span.count);
        let bits = |v: Vec<bool>| v.into_iter().map(u16::from).collect::<Vec<u16>>();
        let request = match span.kind {
            RegisterKind::Holding => Request::ReadHoldingRegisters(start, count),
            RegisterKind::Input => Request::ReadInputRegisters(start, count),
            RegisterKind::Coil => Request::ReadCoils(start, count),
            RegisterKind::Discrete => Request::ReadDiscreteInputs(start, count),
        };
        // Through `Client::call`, not the `Reader` helpers: those
        // `debug_assert` the number of items, so a device answering with
        // fewer than asked panicked a debug build (found by the
        // `modbus_response` fuzz target) instead of counting a short response.
        let words = match ctx.call(request).await?.map_err(ModbusError::Exception)? {
            Response::ReadHoldingRegisters(w) | Response::ReadInputRegisters(w) => w,
            Response::ReadCoils(b) | Response::ReadDiscreteInputs(b) => bits(b),
            // `call` refuses an answer of another function than the request's.
            _ => Vec::new(),
        };
        // Coils come in whole bytes: more bits than asked for is fine.
        if words.len() < count as usize {
            return Err(ModbusError::Short {
                got: words.len(),
                want: count as usize,
            });
        }
        Ok(words)
    }

    /// Read the whole map once: one value per register, scaled. After a
    /// timeout or a transport error the connection is dropped and made anew
    /// at the next poll.
    pub async fn poll_once(&mut self) -> Result<Vec<f64>, ModbusError> {
        if self.ctx.is_none() {
            self.ctx = Some(Self::connect(&self.cfg).await?);
        }
        let timeout = Duration::from_millis(self.cfg.timeout_ms);
        let spans = self.spans.clone();
        let Some(ctx) = self.ctx.as_mut() else {
            unreachable!("connected just above")
        };
        let mut data = Vec::with_capacity(spans.len());
        for span in spans {
            let r = match tokio::time::timeout(timeout, Self::read(ctx, span)).await {
                Ok(r) => r,
                Err(_) => Err(ModbusError::Timeout(timeout)),
            };
            match r {
                Ok(words) => data.push((span, words)),
                Err(e) => {
                    if matches!(e, ModbusError::Timeout(_) | ModbusError::Transport(_)) {
                        // The stream may be out of step with the device.
                        self.ctx = None;
                    }
                    return Err(e);
                }
            }
        }
        Ok(self
            .cfg
            .registers
            .iter()
            .map(|r| {
                let width = r.data_type.width();
                let (span, words) = data
                    .iter()
                    .find(|(s, _)| {
                        s.kind == r.kind
                            && s.start <= r.address
                            && u32::from(r.address) + u32::from(width)
                                <= u32::from(s.start) + u32::from(s.count)
                    })
                    .expect("the plan covers every register");
                let at = (r.address - span.start) as usize;
                let raw = decode(
                    &words[at..at + width as usize],
                    r.data_type,
                    r.byte_order,
                    r.word_order,
                );
                raw * r.scale + r.offset
            })
            .collect())
    }
}

/// Poll until shutdown.
pub async fn run(
    cfg: ModbusSourceConfig,
    ctx: IngestCtx,
    shutdown: CancellationToken,
) -> Result<(), IngestError> {
    let sensor: Arc<str> = Arc::from(cfg.sensor.as_deref().unwrap_or(&cfg.name));
    let retries = cfg.retries;
    let period = Duration::from_millis(cfg.poll_interval_ms);
    let target = cfg
        .address
        .clone()
        .or_else(|| cfg.device.as_ref().map(|d| d.display().to_string()))
        .unwrap_or_default();
    let mut poller = Poller::new(cfg);
    let mut pacer = Pacer::new(period, Instant::now());
    let mut answering = true;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep_until(pacer.due().into()) => {}
        }
        let ts = now_ms();
        let mut values = None;
        let mut last_error = None;
        for _ in 0..=retries {
            match poller.poll_once().await {
                Ok(v) => {
                    values = Some(v);
                    break;
                }
                Err(e) => {
                    ctx.metrics.source_error(&ctx.name, e.kind());
                    last_error = Some(e);
                }
            }
            if shutdown.is_cancelled() {
                return Ok(());
            }
        }
        match values {
            Some(v) => {
                if !answering {
                    tracing::info!(source = %ctx.name, device = %target, "Modbus device answering again");
                    answering = true;
                }
                let r = Reading {
                    sensor: sensor.clone(),
                    ts_ms: ts,
                    values: v.into_iter().map(|x| x as f32).collect(),
                    attrs: Default::default(),
                    seq: 0,
                    ack: None,
                };
                if !ctx.deliver(vec![ctx.validator.check(r, now_ms())]).await {
                    return Ok(());
                }
            }
            None => {
                ctx.metrics.source_failed_read(&ctx.name);
                if answering {
                    let error = last_error.map(|e| e.to_string()).unwrap_or_default();
                    tracing::warn!(source = %ctx.name, device = %target, %error, retries, "Modbus poll failed; counting until the device answers again");
                    answering = false;
                }
            }
        }
        let missed = pacer.advance(Instant::now());
        if missed > 0 {
            ctx.metrics.source_overruns(&ctx.name, missed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(kind: RegisterKind, address: u16, data_type: DataType) -> ModbusRegister {
        ModbusRegister {
            name: format!("r{address}"),
            address,
            kind,
            data_type,
            scale: 1.0,
            offset: 0.0,
            unit: None,
            byte_order: Order::Big,
            word_order: Order::Big,
        }
    }

    #[test]
    fn decodes_every_type_and_order() {
        let f = 49.98f32.to_bits();
        let (hi, lo) = ((f >> 16) as u16, f as u16);
        let swap = |w: u16| w.swap_bytes();
        for (words, bo, wo) in [
            ([hi, lo], Order::Big, Order::Big),                   // ABCD
            ([lo, hi], Order::Big, Order::Little),                // CDAB
            ([swap(hi), swap(lo)], Order::Little, Order::Big),    // BADC
            ([swap(lo), swap(hi)], Order::Little, Order::Little), // DCBA
        ] {
            let v = decode(&words, DataType::F32, bo, wo);
            assert!((v - 49.98).abs() < 1e-5, "{bo:?} {wo:?}: {v}");
        }
        assert_eq!(
            decode(&[0xFFD8], DataType::I16, Order::Big, Order::Big),
            -40.0
        );
        assert_eq!(
            decode(&[0xFFD8], DataType::U16, Order::Big, Order::Big),
            65496.0
        );
        let i = (-12345i32) as u32;
        assert_eq!(
            decode(
                &[i as u16, (i >> 16) as u16],
                DataType::I32,
                Order::Big,
                Order::Little
            ),
            -12345.0
        );
        let d = 1234.5678f64.to_bits();
        let w = [
            (d >> 48) as u16,
            (d >> 32) as u16,
            (d >> 16) as u16,
            d as u16,
        ];
        assert_eq!(decode(&w, DataType::F64, Order::Big, Order::Big), 1234.5678);
        let big = 1u64 << 40;
        let w = [
            (big >> 48) as u16,
            (big >> 32) as u16,
            (big >> 16) as u16,
            big as u16,
        ];
        assert_eq!(
            decode(&w, DataType::U64, Order::Big, Order::Big),
            big as f64
        );
        assert_eq!(decode(&[1], DataType::Bool, Order::Big, Order::Big), 1.0);
    }

    #[test]
    fn contiguous_registers_share_a_request() {
        let spans = plan(&[
            reg(RegisterKind::Holding, 0, DataType::U16),
            reg(RegisterKind::Holding, 1, DataType::F32),
            reg(RegisterKind::Input, 0, DataType::I16),
            reg(RegisterKind::Holding, 3, DataType::I32),
            reg(RegisterKind::Holding, 200, DataType::U16),
            reg(RegisterKind::Coil, 5, DataType::Bool),
        ]);
        let s = |kind, start, count| Span { kind, start, count };
        assert_eq!(
            spans,
            vec![
                s(RegisterKind::Holding, 0, 5),
                s(RegisterKind::Holding, 200, 1),
                s(RegisterKind::Input, 0, 1),
                s(RegisterKind::Coil, 5, 1),
            ]
        );
        // Never more than 125 registers in one request.
        let many: Vec<_> = (0..130)
            .map(|a| reg(RegisterKind::Input, a, DataType::U16))
            .collect();
        let spans = plan(&many);
        assert_eq!(spans.len(), 2);
        assert!(spans.iter().all(|s| s.count <= 125));
    }
}
