//! An OTLP/HTTP receiver for the harness: the server exports every request's
//! spans to it (`[telemetry]`, probes included), and the harness scans the
//! exported bytes like every other output.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

/// Collects the bodies of every OTLP export posted to it.
pub struct Receiver {
    port: u16,
    bodies: Arc<Mutex<Vec<u8>>>,
    posts: Arc<Mutex<usize>>,
}

impl Receiver {
    pub fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the OTLP receiver");
        let port = listener.local_addr().unwrap().port();
        let (bodies, posts) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(0)));
        let (b, p) = (bodies.clone(), posts.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (b, p) = (b.clone(), p.clone());
                std::thread::spawn(move || serve(stream, &b, &p));
            }
        });
        Receiver { port, bodies, posts }
    }

    /// The server's `[telemetry]` settings: export here, quickly, probes too.
    pub fn server_env(&self) -> [(&'static str, String); 3] {
        [
            ("SALUS_TELEMETRY__ENDPOINT", format!("http://127.0.0.1:{}", self.port)),
            ("SALUS_TELEMETRY__BATCH_DELAY_MS", "100".into()),
            ("SALUS_TELEMETRY__TRACE_PROBES", "true".into()),
        ]
    }

    /// Every exported byte so far, and the number of exports.
    pub fn received(&self) -> (Vec<u8>, usize) {
        (self.bodies.lock().unwrap().clone(), *self.posts.lock().unwrap())
    }
}

/// Answers 200 to each POST on one connection, keeping its body.
fn serve(stream: std::net::TcpStream, bodies: &Mutex<Vec<u8>>, posts: &Mutex<usize>) {
    let Ok(read_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(read_half);
    let mut stream = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((name, value)) = h.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        bodies.lock().unwrap().extend_from_slice(&body);
        *posts.lock().unwrap() += 1;
        if stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_err() {
            return;
        }
    }
}
