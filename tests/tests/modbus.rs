//! Modbus against a real device process (src/bin/modbus-device.rs): the
//! register map decoded over Modbus TCP and over RTU framing, and a device
//! that stops answering (SIGSTOP): errors, failed polls and missed slots
//! counted, polling resumes when it answers again (SIGCONT).

use std::time::Duration;

use outpost::config::Config;
use outpost::ingest::SourceConfig;
use outpost::ingest::modbus::Poller;
use outpost_tests::*;

const MAP: &str = r#"
[[sources.registers]]
name = "voltage"
address = 0
scale = 0.1
unit = "V"
[[sources.registers]]
name = "frequency"
address = 1
data_type = "f32"
unit = "Hz"
[[sources.registers]]
name = "energy"
address = 3
data_type = "i32"
word_order = "little"
[[sources.registers]]
name = "temperature"
kind = "input"
address = 0
data_type = "i16"
[[sources.registers]]
name = "status"
kind = "input"
address = 1
[[sources.registers]]
name = "running"
kind = "coil"
address = 0
data_type = "bool"
[[sources.registers]]
name = "alarm"
kind = "discrete"
address = 0
data_type = "bool"
"#;

fn source(transport: &str, port: u16, map: &str, extra: &str) -> String {
    format!(
        "[[sources]]\ntype = \"modbus\"\nname = \"meter\"\ntransport = \"{transport}\"\naddress = \"127.0.0.1:{port}\"\n{extra}\n{map}"
    )
}

#[test]
fn the_register_map_is_decoded_over_tcp_and_rtu_framing() {
    let device = ModbusDevice::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (transport, port) in [("tcp", device.tcp), ("rtu_over_tcp", device.rtu)] {
        let cfg = Config::parse(&source(transport, port, MAP, ""), "t").unwrap();
        let Some(SourceConfig::Modbus(m)) = cfg.sources.into_iter().next() else {
            panic!("a modbus source")
        };
        let mut poller = Poller::new(*m);
        let v = rt.block_on(poller.poll_once()).unwrap();
        assert_eq!(v.len(), 7, "{transport}: {v:?}");
        assert!((v[0] - 230.5).abs() < 1e-9, "{transport}: {v:?}");
        assert!((v[1] - 49.98).abs() < 1e-5, "{transport}: {v:?}");
        assert_eq!(v[2..], [-12345.0, -40.0, 7.0, 1.0, 0.0], "{transport}");
    }
    // A unit that does not answer times out, and says so.
    let cfg = Config::parse(
        &source("tcp", device.tcp, MAP, "unit = 9\ntimeout_ms = 200"),
        "t",
    )
    .unwrap();
    let Some(SourceConfig::Modbus(m)) = cfg.sources.into_iter().next() else {
        panic!("a modbus source")
    };
    let e = rt.block_on(Poller::new(*m).poll_once()).unwrap_err();
    assert_eq!(e.kind(), "timeout", "{e}");
}

#[test]
fn a_device_that_stops_answering_is_counted_and_polling_resumes() {
    let device = ModbusDevice::start();
    // Six holding registers: the bundled model's six channels.
    let map: String = (0..6)
        .map(|a| format!("[[sources.registers]]\nname = \"h{a}\"\naddress = {a}\n"))
        .collect();
    let config = format!(
        "[gateway]\nid = \"gw-modbus\"\n{}",
        source(
            "tcp",
            device.tcp,
            &map,
            "poll_interval_ms = 50\ntimeout_ms = 150\nretries = 1"
        )
    );
    let o = Outpost::run(&config);
    let readings = |o: &Outpost| o.metric("outpost_readings_total", &["source=\"meter\""]);
    wait_until("polls", Duration::from_secs(30), || readings(&o) >= 5.0);
    device.signal(libc::SIGSTOP);
    wait_until("timeouts counted", Duration::from_secs(30), || {
        o.metric("outpost_source_errors_total", &["kind=\"timeout\""]) >= 4.0
            && o.metric("outpost_source_failed_reads_total", &[]) >= 2.0
    });
    // Two tries of 150 ms per 50 ms slot: slots are missed and counted.
    assert!(
        o.metric("outpost_source_overruns_total", &["source=\"meter\""]) >= 1.0,
        "{}",
        o.log()
    );
    assert!(o.log().contains("Modbus poll failed"), "{}", o.log());
    let before = readings(&o);
    device.signal(libc::SIGCONT);
    wait_until("polls again", Duration::from_secs(30), || {
        readings(&o) >= before + 5.0
    });
    assert!(
        o.log().contains("Modbus device answering again"),
        "{}",
        o.log()
    );
}
