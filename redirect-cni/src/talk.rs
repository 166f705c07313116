//! One request to the daemon over its unix socket, bounded by a timeout.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    time::Duration,
};

use redirect_common::cni::{CniReply, CniRequest};

/// Sends `request` and reads the reply, each step bounded by `timeout`.
pub fn ask(socket: &str, request: &CniRequest, timeout: Duration) -> Result<CniReply, String> {
    let mut stream = UnixStream::connect(socket)
        .map_err(|e| format!("cannot reach redirectd at {socket}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("setting a timeout on {socket}: {e}"))?;
    let mut line = serde_json::to_string(request).map_err(|e| e.to_string())?;
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| format!("writing to redirectd at {socket}: {e}"))?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                format!("redirectd at {socket} did not answer within {timeout:?}")
            }
            _ => format!("reading redirectd's answer on {socket}: {e}"),
        })?;
    if reply.trim().is_empty() {
        return Err(format!(
            "redirectd at {socket} closed the connection without answering"
        ));
    }
    serde_json::from_str(&reply)
        .map_err(|e| format!("redirectd's answer {reply:?} is not understood: {e}"))
}
