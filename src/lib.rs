//! Support code shared by Salus' binaries (`salus`, `salus-bench`,
//! `salus-gpu-check`) and benchmarks: the HTTPS client setup and the load
//! test's statistics and report. The server itself lives in `salus-server`.

pub mod bench_report;
pub mod tls_client;
