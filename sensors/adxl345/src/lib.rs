//! ADXL345 3-axis accelerometer over I2C: init, range, data rate, burst
//! read of X/Y/Z, scaling to g. Generic over [`embedded_hal::i2c::I2c`] 1.0,
//! so it runs on any embedded-hal implementation: `linux-embedded-hal` on a
//! gateway (`/dev/i2c-N`), a microcontroller HAL, or a mock in tests.
//!
//! Register map and scale: Analog Devices ADXL345 data sheet, rev. G
//! (DEVID 0x00 = 0xE5, BW_RATE 0x2C, POWER_CTL 0x2D, DATA_FORMAT 0x31,
//! DATAX0..DATAZ1 0x32..0x37 little-endian; full resolution 3.9 mg/LSB).
#![no_std]
#![deny(missing_docs)]

use embedded_hal::i2c::I2c;

/// I2C address with the ALT ADDRESS pin low.
pub const ADDRESS_LOW: u8 = 0x53;
/// I2C address with the ALT ADDRESS pin high.
pub const ADDRESS_HIGH: u8 = 0x1D;
/// What DEVID reads on an ADXL345.
pub const DEVICE_ID: u8 = 0xE5;

/// Registers used here.
pub mod reg {
    /// Device id.
    pub const DEVID: u8 = 0x00;
    /// Data rate and power mode.
    pub const BW_RATE: u8 = 0x2C;
    /// Power-saving features; bit 3 starts measuring.
    pub const POWER_CTL: u8 = 0x2D;
    /// Data format: range, full resolution.
    pub const DATA_FORMAT: u8 = 0x31;
    /// First of the six data bytes (X0 X1 Y0 Y1 Z0 Z1).
    pub const DATAX0: u8 = 0x32;
}

const MEASURE: u8 = 0x08;
const FULL_RES: u8 = 0x08;
/// g per LSB at full resolution (any range).
pub const G_PER_LSB: f32 = 0.0039;

/// Measurement range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// ±2 g.
    G2,
    /// ±4 g.
    G4,
    /// ±8 g.
    G8,
    /// ±16 g.
    G16,
}

impl Range {
    /// From the full-scale value in g (2, 4, 8 or 16).
    pub fn from_g(g: u8) -> Option<Self> {
        match g {
            2 => Some(Self::G2),
            4 => Some(Self::G4),
            8 => Some(Self::G8),
            16 => Some(Self::G16),
            _ => None,
        }
    }

    fn bits(self) -> u8 {
        match self {
            Self::G2 => 0,
            Self::G4 => 1,
            Self::G8 => 2,
            Self::G16 => 3,
        }
    }
}

/// Output data rate: BW_RATE codes 0x06 (6.25 Hz) to 0x0F (3200 Hz); each
/// code doubles the rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataRate(u8);

impl DataRate {
    /// The slowest rate at or above `hz` (6.25 to 3200 Hz), if any.
    pub fn at_least(hz: f32) -> Option<Self> {
        (0x06..=0x0F).map(Self).find(|r| r.hz() >= hz)
    }

    /// The rate in Hz.
    pub fn hz(self) -> f32 {
        // 3200 Hz at 0x0F, halving per code below.
        3200.0 / (1u32 << (0x0F - self.0)) as f32
    }

    /// The BW_RATE register code.
    pub fn code(self) -> u8 {
        self.0
    }
}

/// Errors of the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error<E> {
    /// The bus failed (NACK, arbitration loss, ...).
    I2c(E),
    /// DEVID did not read 0xE5: not an ADXL345 at this address.
    WrongDevice(u8),
}

impl<E> From<E> for Error<E> {
    fn from(e: E) -> Self {
        Self::I2c(e)
    }
}

/// An ADXL345 on an I2C bus.
#[derive(Debug)]
pub struct Adxl345<I2C> {
    i2c: I2C,
    address: u8,
}

impl<I2C: I2c> Adxl345<I2C> {
    /// A driver for the device at `address` ([`ADDRESS_LOW`] or
    /// [`ADDRESS_HIGH`]); nothing is sent until [`Adxl345::init`].
    pub fn new(i2c: I2C, address: u8) -> Self {
        Self { i2c, address }
    }

    /// Check the device id, set the range (full resolution) and the data
    /// rate, and start measuring.
    pub fn init(&mut self, range: Range, rate: DataRate) -> Result<(), Error<I2C::Error>> {
        let mut id = [0u8];
        self.i2c.write_read(self.address, &[reg::DEVID], &mut id)?;
        if id[0] != DEVICE_ID {
            return Err(Error::WrongDevice(id[0]));
        }
        self.i2c.write(self.address, &[reg::BW_RATE, rate.code()])?;
        self.i2c
            .write(self.address, &[reg::DATA_FORMAT, FULL_RES | range.bits()])?;
        self.i2c.write(self.address, &[reg::POWER_CTL, MEASURE])?;
        Ok(())
    }

    /// X, Y, Z in LSB, read in one burst (one transaction, so the three
    /// axes belong to the same sample).
    pub fn read_raw(&mut self) -> Result<[i16; 3], Error<I2C::Error>> {
        let mut b = [0u8; 6];
        self.i2c.write_read(self.address, &[reg::DATAX0], &mut b)?;
        Ok([
            i16::from_le_bytes([b[0], b[1]]),
            i16::from_le_bytes([b[2], b[3]]),
            i16::from_le_bytes([b[4], b[5]]),
        ])
    }

    /// X, Y, Z in g.
    pub fn read_g(&mut self) -> Result<[f32; 3], Error<I2C::Error>> {
        let raw = self.read_raw()?;
        Ok(raw.map(|v| v as f32 * G_PER_LSB))
    }

    /// The bus back.
    pub fn release(self) -> I2C {
        self.i2c
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;

    use super::*;
    use embedded_hal::i2c::ErrorKind;
    use embedded_hal_mock::eh1::i2c::{Mock, Transaction as T};

    #[test]
    fn init_sets_range_rate_and_measure() {
        let mut i2c = Mock::new(&[
            T::write_read(ADDRESS_LOW, vec![reg::DEVID], vec![DEVICE_ID]),
            T::write(ADDRESS_LOW, vec![reg::BW_RATE, 0x0A]),
            T::write(ADDRESS_LOW, vec![reg::DATA_FORMAT, 0x08 | 0x01]),
            T::write(ADDRESS_LOW, vec![reg::POWER_CTL, 0x08]),
        ]);
        let mut dev = Adxl345::new(i2c.clone(), ADDRESS_LOW);
        dev.init(Range::G4, DataRate::at_least(100.0).unwrap())
            .unwrap();
        i2c.done();
    }

    #[test]
    fn wrong_device_id_is_refused() {
        let mut i2c = Mock::new(&[T::write_read(ADDRESS_HIGH, vec![reg::DEVID], vec![0x12])]);
        let mut dev = Adxl345::new(i2c.clone(), ADDRESS_HIGH);
        assert_eq!(
            dev.init(Range::G2, DataRate::at_least(50.0).unwrap()),
            Err(Error::WrongDevice(0x12))
        );
        i2c.done();
    }

    #[test]
    fn burst_read_scales_to_g() {
        // X = 256 LSB (~1 g), Y = -256, Z = 0x0100 little-endian pieces.
        let mut i2c = Mock::new(&[T::write_read(
            ADDRESS_LOW,
            vec![reg::DATAX0],
            vec![0x00, 0x01, 0x00, 0xFF, 0x80, 0x00],
        )]);
        let mut dev = Adxl345::new(i2c.clone(), ADDRESS_LOW);
        let g = dev.read_g().unwrap();
        assert!((g[0] - 0.9984).abs() < 1e-4, "{g:?}");
        assert!((g[1] + 0.9984).abs() < 1e-4, "{g:?}");
        assert!((g[2] - 0.4992).abs() < 1e-4, "{g:?}");
        i2c.done();
    }

    #[test]
    fn bus_errors_are_returned_not_panicked() {
        let mut i2c = Mock::new(&[
            T::write_read(ADDRESS_LOW, vec![reg::DATAX0], vec![0; 6]).with_error(
                ErrorKind::NoAcknowledge(embedded_hal::i2c::NoAcknowledgeSource::Address),
            ),
            T::write_read(ADDRESS_LOW, vec![reg::DATAX0], vec![0; 6])
                .with_error(ErrorKind::ArbitrationLoss),
        ]);
        let mut dev = Adxl345::new(i2c.clone(), ADDRESS_LOW);
        assert!(matches!(
            dev.read_raw(),
            Err(Error::I2c(ErrorKind::NoAcknowledge(_)))
        ));
        assert_eq!(dev.read_raw(), Err(Error::I2c(ErrorKind::ArbitrationLoss)));
        i2c.done();
    }

    #[test]
    fn data_rates() {
        assert_eq!(DataRate::at_least(100.0).unwrap().code(), 0x0A);
        assert_eq!(DataRate::at_least(1.0).unwrap().hz(), 6.25);
        assert_eq!(DataRate::at_least(3200.0).unwrap().code(), 0x0F);
        assert!(DataRate::at_least(5000.0).is_none());
        assert_eq!(Range::from_g(16), Some(Range::G16));
        assert_eq!(Range::from_g(3), None);
    }
}
