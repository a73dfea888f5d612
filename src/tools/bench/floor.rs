//! `wsgate bench floor`: what a fan-out costs this machine's kernel alone,
//! the floor any gateway's delivery cost stands on. One writer (this
//! process, pinned where the server would be) writes one small message to
//! each of N loopback connections in turn, as plain TCP or as rustls
//! records (no WebSocket framing, no JSON, no hub); a reader process
//! (`bench floor-reader`, pinned to the other core) drains them. It reports
//! writes per second, the writer's CPU per write and the time of one round
//! over all N connections, to be compared with wsgate's delivery figures
//! in the same run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::BenchError;

/// A child process killed when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The result of `bench floor`.
#[derive(Debug, Serialize)]
pub struct FloorReport {
    pub mode: &'static str,
    pub connections: usize,
    pub size: usize,
    /// Whether each write was a rustls record.
    pub tls: bool,
    pub rounds: u64,
    pub writes: u64,
    pub duration_s: f64,
    pub writes_per_s: f64,
    /// The writer process's CPU (user + system) per write.
    pub cpu_us_per_write: f64,
    /// One write to each of the N connections, in turn.
    pub round_ms_p50: f64,
    pub round_ms_p99: f64,
}

/// A certificate for `localhost` made on the spot, its PEM written to a
/// file in the temporary directory for the reader to trust (removed at
/// the end); the server side's rustls config.
fn tls_server() -> Result<(Arc<rustls::ServerConfig>, PathBuf), BenchError> {
    let setup = |e: &dyn std::fmt::Display| BenchError::Setup(format!("floor certificate: {e}"));
    let key = rcgen::KeyPair::generate().map_err(|e| setup(&e))?;
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned()]).map_err(|e| setup(&e))?;
    let cert = params.self_signed(&key).map_err(|e| setup(&e))?;
    let pem = std::env::temp_dir().join(format!("wsgate-floor-{}.pem", std::process::id()));
    std::fs::write(&pem, cert.pem()).map_err(|e| setup(&e))?;
    let der =
        rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| setup(&e))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| setup(&e))?
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], der)
    .map_err(|e| setup(&e))?;
    Ok((Arc::new(config), pem))
}

/// Writes `message` to each of `conns` in turn until `until`; returns
/// the rounds and each round's time.
async fn write_rounds<S: AsyncWrite + Unpin>(
    conns: &mut [S],
    message: &[u8],
    until: Instant,
) -> Result<Vec<Duration>, BenchError> {
    let mut rounds = Vec::new();
    while Instant::now() < until {
        let started = Instant::now();
        for conn in conns.iter_mut() {
            conn.write_all(message)
                .await
                .map_err(|e| BenchError::Connect(format!("floor write: {e}")))?;
            // One record (TLS) and one send per message, as a delivery is.
            conn.flush()
                .await
                .map_err(|e| BenchError::Connect(format!("floor flush: {e}")))?;
        }
        rounds.push(started.elapsed());
    }
    Ok(rounds)
}

fn percentile_ms(sorted: &[Duration], p: usize) -> f64 {
    let at = sorted.len().saturating_sub(1) * p / 100;
    sorted.get(at).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Runs the floor: see the module documentation. The reader is `exe
/// bench floor-reader` (`exe`: the wsgate binary); `reader_cpu` pins it
/// with `taskset` when given.
///
/// # Errors
/// Sockets, the certificate, or the reader process could not be set up.
pub async fn floor(
    connections: usize,
    size: usize,
    duration: Duration,
    warmup: Duration,
    tls: bool,
    exe: &Path,
    reader_cpu: Option<usize>,
) -> Result<FloorReport, BenchError> {
    let setup = |e: &dyn std::fmt::Display| BenchError::Setup(format!("floor: {e}"));
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| setup(&e))?;
    let addr = listener.local_addr().map_err(|e| setup(&e))?;
    let server_tls = if tls { Some(tls_server()?) } else { None };
    // std's process: tokio's needs a feature the binary does not build.
    let mut reader = match reader_cpu {
        Some(cpu) => {
            let mut c = std::process::Command::new("taskset");
            c.arg("-c").arg(cpu.to_string()).arg(exe);
            c
        }
        None => std::process::Command::new(exe),
    };
    reader
        .args(["bench", "floor-reader", "--addr", &addr.to_string()])
        .args(["--connections", &connections.to_string()])
        .stdout(std::process::Stdio::null());
    if let Some((_, pem)) = &server_tls {
        reader.arg("--ca").arg(pem);
    }
    let child = reader.spawn().map_err(|e| setup(&e))?;
    // Killed however this ends, so no reader outlives its writer.
    let mut child = KillOnDrop(child);
    let message = vec![b'x'; size.max(1)];
    let mut tcp = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (stream, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
            .await
            .map_err(|_| setup(&"the reader did not connect in time"))?
            .map_err(|e| setup(&e))?;
        stream.set_nodelay(true).map_err(|e| setup(&e))?;
        tcp.push(stream);
    }
    let pem_file = server_tls.as_ref().map(|(_, pem)| pem.clone());
    let (rounds, warm_cpu, cpu, elapsed) = match server_tls {
        None => run_timed(&mut tcp, &message, warmup, duration).await?,
        Some((config, _)) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            let mut conns = Vec::with_capacity(connections);
            for stream in tcp {
                conns.push(acceptor.accept(stream).await.map_err(|e| setup(&e))?);
            }
            run_timed(&mut conns, &message, warmup, duration).await?
        }
    };
    let _ = child.0.kill();
    let _ = child.0.wait();
    if let Some(pem) = &pem_file {
        let _ = std::fs::remove_file(pem);
    }
    let writes = rounds.len() as u64 * connections as u64;
    let mut sorted = rounds.clone();
    sorted.sort_unstable();
    Ok(FloorReport {
        mode: "floor",
        connections,
        size,
        tls,
        rounds: rounds.len() as u64,
        writes,
        duration_s: elapsed,
        writes_per_s: writes as f64 / elapsed.max(f64::EPSILON),
        cpu_us_per_write: (cpu - warm_cpu) * 1e6 / (writes.max(1) as f64),
        round_ms_p50: percentile_ms(&sorted, 50),
        round_ms_p99: percentile_ms(&sorted, 99),
    })
}

/// Warms up, then measures: the rounds, the CPU before and after, and
/// the measured seconds.
async fn run_timed<S: AsyncWrite + Unpin>(
    conns: &mut [S],
    message: &[u8],
    warmup: Duration,
    duration: Duration,
) -> Result<(Vec<Duration>, f64, f64, f64), BenchError> {
    write_rounds(conns, message, Instant::now() + warmup).await?;
    let cpu_before = super::own_cpu_s().unwrap_or(0.0);
    let started = Instant::now();
    let rounds = write_rounds(conns, message, started + duration).await?;
    let elapsed = started.elapsed().as_secs_f64();
    Ok((
        rounds,
        cpu_before,
        super::own_cpu_s().unwrap_or(0.0),
        elapsed,
    ))
}

/// `bench floor-reader`: connects `connections` times to `addr` (with TLS
/// trusting `ca` when given) and drains every connection until it ends.
///
/// # Errors
/// A connection could not be made.
pub async fn floor_reader(
    addr: SocketAddr,
    connections: usize,
    ca: Option<&Path>,
) -> Result<(), BenchError> {
    let connector = match ca {
        Some(ca) => Some(tokio_rustls::TlsConnector::from(
            crate::tls::bench_client_config(ca).map_err(|e| BenchError::Setup(e.to_string()))?,
        )),
        None => None,
    };
    let mut streams = Vec::with_capacity(connections);
    for _ in 0..connections {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| BenchError::Connect(format!("floor reader: {e}")))?;
        streams.push(tcp);
    }
    let mut readers = JoinSet::new();
    for tcp in streams {
        let connector = connector.clone();
        readers.spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            match connector {
                None => {
                    let mut tcp = tcp;
                    while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
                }
                Some(connector) => {
                    let Ok(name) = rustls_pki_types::ServerName::try_from("localhost") else {
                        return;
                    };
                    let Ok(mut tls) = connector.connect(name, tcp).await else {
                        return;
                    };
                    while matches!(tls.read(&mut buf).await, Ok(n) if n > 0) {}
                }
            }
        });
    }
    while readers.join_next().await.is_some() {}
    Ok(())
}
