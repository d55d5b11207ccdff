//! A Modbus device for the tests: serves a fixed register map over Modbus
//! TCP on one port and RTU framing over TCP on another, until killed. Usage:
//! `modbus-device TCP_PORT RTU_PORT`; prints `ready` once both listen.
//!
//! Map (unit 1; other units get no answer): holding 0 = 2305 (u16),
//! holding 1..=2 = 49.98 (f32, big-endian words), holding 3..=4 = -12345
//! (i32, little-endian word order), holding 5 = poll counter (u16, +1 per
//! request), input 0 = -40 (i16), input 1 = 7, coil 0 = on, discrete 0 = off.

use std::future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use tokio::net::TcpListener;
use tokio_modbus::prelude::*;
use tokio_modbus::server::Service;

struct Device {
    counter: AtomicU16,
}

impl Device {
    fn holding(&self) -> Vec<u16> {
        let f = 49.98f32.to_bits();
        let i = (-12345i32) as u32;
        vec![
            2305,
            (f >> 16) as u16,
            f as u16,
            i as u16,
            (i >> 16) as u16,
            self.counter.fetch_add(1, Ordering::SeqCst),
        ]
    }
}

fn slice<T: Clone>(v: &[T], start: u16, count: u16) -> Result<Vec<T>, ExceptionCode> {
    let (s, e) = (start as usize, start as usize + count as usize);
    v.get(s..e)
        .map(<[T]>::to_vec)
        .ok_or(ExceptionCode::IllegalDataAddress)
}

impl Service for Device {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = future::Ready<Result<Self::Response, Self::Exception>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        if req.slave != 1 {
            return future::ready(Ok(None));
        }
        let r = match req.request {
            Request::ReadHoldingRegisters(a, n) => {
                slice(&self.holding(), a, n).map(Response::ReadHoldingRegisters)
            }
            Request::ReadInputRegisters(a, n) => {
                slice(&[(-40i16) as u16, 7], a, n).map(Response::ReadInputRegisters)
            }
            Request::ReadCoils(a, n) => slice(&[true], a, n).map(Response::ReadCoils),
            Request::ReadDiscreteInputs(a, n) => {
                slice(&[false], a, n).map(Response::ReadDiscreteInputs)
            }
            _ => Err(ExceptionCode::IllegalFunction),
        };
        future::ready(r.map(Some))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let port = |i: usize| -> u16 {
        args.get(i)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("usage: modbus-device TCP_PORT RTU_PORT"))
    };
    let device = Arc::new(Device {
        counter: AtomicU16::new(0),
    });
    let tcp =
        tokio_modbus::server::tcp::Server::new(TcpListener::bind(("127.0.0.1", port(1))).await?);
    let rtu = tokio_modbus::server::rtu_over_tcp::Server::new(
        TcpListener::bind(("127.0.0.1", port(2))).await?,
    );
    println!("ready");
    let d1 = device.clone();
    let on_tcp = move |stream, addr| {
        let d = d1.clone();
        async move {
            tokio_modbus::server::tcp::accept_tcp_connection(stream, addr, |_| Ok(Some(d.clone())))
        }
    };
    let d2 = device.clone();
    let on_rtu = move |stream, addr| {
        let d = d2.clone();
        async move {
            tokio_modbus::server::rtu_over_tcp::accept_tcp_connection(stream, addr, |_| {
                Ok(Some(d.clone()))
            })
        }
    };
    let on_error = |e| eprintln!("modbus-device: {e}");
    tokio::try_join!(tcp.serve(&on_tcp, on_error), rtu.serve(&on_rtu, on_error))?;
    Ok(())
}
