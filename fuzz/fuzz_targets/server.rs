//! A whole in-process server, driven by up to four clients with arbitrary
//! byte streams, interleaved and half-closed at arbitrary points. The
//! server must not panic (a panic aborts the fuzzer), must close every
//! connection whose client finished, and must still log in and route a
//! fresh client afterwards.
#![no_main]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;

/// The server, started once for the whole fuzzing run, with small limits
/// so inputs reach them.
fn server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let listener = chatd::bind("127.0.0.1:0".parse().unwrap(), 1024).unwrap();
        let addr = listener.local_addr().unwrap();
        let config = chatd::Config {
            max_line: 48,
            max_outbound: 2048,
            max_clients: Some(64),
            ..chatd::Config::default()
        };
        std::thread::spawn(move || chatd::run(listener, config, chatd::Control::new()));
        addr
    })
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream
}

/// Reads until the server closes (EOF or reset); false on timeout.
fn read_to_close(stream: &mut TcpStream) -> bool {
    let mut buf = [0; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let addr = server();
    let [clients, script @ ..] = data else {
        return;
    };
    let mut streams: Vec<TcpStream> = (0..1 + clients % 4).map(|_| connect(addr)).collect();
    let mut closed = vec![false; streams.len()];
    // The script: [client, op, bytes...]: op's low 5 bits are a length;
    // its top bit half-closes that client after the write.
    let mut rest = script;
    while let [who, op, tail @ ..] = rest {
        let i = usize::from(*who) % streams.len();
        let len = usize::from(op & 31).min(tail.len());
        if !closed[i] {
            // The server may have closed this client already (limits).
            let _ = streams[i].write_all(&tail[..len]);
            if op & 0x80 != 0 {
                let _ = streams[i].shutdown(Shutdown::Write);
                closed[i] = true;
            }
        }
        rest = &tail[len..];
    }
    for (stream, closed) in streams.iter_mut().zip(closed) {
        if !closed {
            let _ = stream.shutdown(Shutdown::Write);
        }
        assert!(read_to_close(stream), "the server did not close a finished client");
    }
    // The server still serves.
    static PROBES: AtomicU64 = AtomicU64::new(0);
    let name = format!("probe{}", PROBES.fetch_add(1, Ordering::Relaxed));
    let mut probe = connect(addr);
    probe.write_all(format!("{name}\n{name}: ping\n").as_bytes()).unwrap();
    let want = format!("from {name}: ping\n");
    let mut got = vec![0; want.len()];
    probe.read_exact(&mut got).expect("the server stopped routing");
    assert_eq!(got, want.as_bytes());
});
