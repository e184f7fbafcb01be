//! What the bench's servers (`baseline-fanout`, `trivial-join`) share: a multi-threaded
//! runtime, a listener on a loopback address, the `NAME listening on ADDR` line the load
//! generator waits for, and an accept loop until Ctrl-C. Each server brings only what it
//! does with a connection.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;

use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Listens on `addr` (loopback only) and runs `connection` as a task for every accepted
/// socket until Ctrl-C. The exit code says why it stopped: 2 for a bad address, 1 when the
/// runtime or the listener could not start.
pub fn serve_loopback<F, Fut>(name: &str, addr: SocketAddr, connection: F) -> ExitCode
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    if !addr.ip().is_loopback() {
        eprintln!("error: {name} listens on loopback addresses only");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match listen(addr) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let local = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        println!("{name} listening on {local}");
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    // A connection's failure is its own: its client reports it.
                    if let Ok((stream, _)) = accepted {
                        tokio::spawn(connection(stream));
                    }
                }
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        ExitCode::SUCCESS
    })
}

/// A listener with easel's backlog (`limits.listen_backlog`, 1024 by default, not the 128 that
/// `TcpListener::bind` asks for), so that a join storm meets the same kernel queue whichever
/// server it is measured against.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}
