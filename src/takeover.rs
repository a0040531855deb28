//! Binary takeover: a new splitgate takes over a running one without failing a request.
//!
//! The running process (`splitgate run`) listens on `state.dir/splitgate.sock`. A new
//! one started with `splitgate run --takeover` connects there and receives the running
//! process's listening sockets themselves (SCM_RIGHTS, as HAProxy's `expose-fd
//! listeners` and Pingora's upgrade do). Connections waiting in those sockets' accept
//! queues are then accepted by whichever process gets to them first, and none is reset:
//! binding fresh `SO_REUSEPORT` sockets instead would lose the queue of every socket
//! the old process closes. The exchange, one line of JSON each way:
//!
//! 1. new → old `{"takeover":true}`; old → new the sockets (proxy, HTTPS, admin) and a
//!    line naming how many of each;
//! 2. old stops its state writer, releasing `state.dir` → `{"released":true}`;
//! 3. new takes `state.dir`, starts serving on the sockets → `{"ready":true}`;
//! 4. old stops accepting and drains its connections, as on SIGTERM, and exits.
//!
//! If the new process fails before step 3, the old one goes on serving (without a state
//! writer: changes are refused until it is restarted) and says so in its log.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The control socket's name in `state.dir`.
pub const SOCKET: &str = "splitgate.sock";

/// How long either side waits for the other at each step.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The listening sockets a process serves on, as handed over.
pub struct Sockets {
    /// One per worker.
    pub proxy: Vec<std::net::TcpListener>,
    /// One per worker when `[server.tls]` is set, else none.
    pub tls: Vec<std::net::TcpListener>,
    pub admin: std::net::TcpListener,
}

impl Sockets {
    /// Duplicates of every socket (the same sockets, new descriptors), kept by the
    /// running process to hand over later.
    pub fn duplicate(&self) -> std::io::Result<Sockets> {
        let dup = |sockets: &[std::net::TcpListener]| {
            sockets
                .iter()
                .map(std::net::TcpListener::try_clone)
                .collect::<std::io::Result<Vec<_>>>()
        };
        Ok(Sockets {
            proxy: dup(&self.proxy)?,
            tls: dup(&self.tls)?,
            admin: self.admin.try_clone()?,
        })
    }
}

/// Why a takeover failed.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("no running splitgate to take over at {}: {source}", path.display())]
    NotRunning {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("takeover from the running splitgate failed: {0}")]
    Exchange(String),
}

#[derive(Serialize, Deserialize, Default)]
struct Message {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    takeover: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    proxy: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    released: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    ready: bool,
}

fn exchange_error(what: &str) -> impl Fn(std::io::Error) -> TakeoverError + '_ {
    move |error| TakeoverError::Exchange(format!("{what}: {error}"))
}

fn send_line(stream: &mut impl Write, message: &Message) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

fn read_line(reader: &mut impl BufRead) -> std::io::Result<Message> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    serde_json::from_str(&line).map_err(std::io::Error::other)
}

/// The control socket's path for a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET)
}

/// The new process's side, until the old one has released the state directory.
/// Returns the sockets and the connection on which to say "ready".
pub fn request(state_dir: &Path) -> Result<(Sockets, Ready), TakeoverError> {
    let path = socket_path(state_dir);
    let stream = std::os::unix::net::UnixStream::connect(&path).map_err(|source| {
        TakeoverError::NotRunning {
            path: path.clone(),
            source,
        }
    })?;
    stream
        .set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(exchange_error("control socket"))?;
    let mut writer = stream
        .try_clone()
        .map_err(exchange_error("control socket"))?;
    send_line(
        &mut writer,
        &Message {
            takeover: true,
            ..Message::default()
        },
    )
    .map_err(exchange_error("asking for the sockets"))?;
    let (header, fds, rest) =
        passing::receive(&stream).map_err(exchange_error("receiving the sockets"))?;
    let mut fds: Vec<std::net::TcpListener> =
        fds.into_iter().map(std::net::TcpListener::from).collect();
    let (proxy, tls) = (header.proxy.unwrap_or(0), header.tls.unwrap_or(0));
    if proxy == 0 || fds.len() != proxy + tls + 1 {
        return Err(TakeoverError::Exchange(format!(
            "expected {} sockets, received {}",
            proxy + tls + 1,
            fds.len()
        )));
    }
    let admin = fds.pop().expect("counted above");
    let tls_sockets = fds.split_off(proxy);
    let mut reader = BufReader::new(std::io::Read::chain(std::io::Cursor::new(rest), stream));
    let released =
        read_line(&mut reader).map_err(exchange_error("waiting for the state directory"))?;
    if !released.released {
        return Err(TakeoverError::Exchange(
            "the running splitgate did not release state.dir".into(),
        ));
    }
    tracing::info!(
        from = header.pid,
        "took over the listening sockets; state.dir released"
    );
    Ok((
        Sockets {
            proxy: fds,
            tls: tls_sockets,
            admin,
        },
        Ready(writer),
    ))
}

/// The new process's last word: it serves now.
pub struct Ready(std::os::unix::net::UnixStream);

impl Ready {
    pub fn send(mut self) -> Result<(), TakeoverError> {
        send_line(
            &mut self.0,
            &Message {
                ready: true,
                ..Message::default()
            },
        )
        .map_err(exchange_error("saying ready"))
    }
}

/// The running process's side: listens on the control socket; for one takeover,
/// hands over `sockets`, calls `release` (which stops the state writer), and resolves
/// once the new process is ready, when the caller drains and exits.
pub async fn serve<F, Fut>(state_dir: &Path, sockets: Sockets, release: F) -> std::io::Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let path = socket_path(state_dir);
    // A socket file left by a process that died: it is ours to replace (the state
    // directory's lock says no other splitgate runs here).
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    let (stream, _) = listener.accept().await?;
    drop(listener);
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    let handed = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        let mut reader = BufReader::new(stream.try_clone()?);
        let asked = read_line(&mut reader)?;
        if !asked.takeover {
            return Err(std::io::Error::other("not a takeover request"));
        }
        passing::send(&stream, &sockets)?;
        Ok((stream, reader))
    })
    .await
    .map_err(std::io::Error::other)??;
    tracing::info!("handing over to a new splitgate: sockets sent, releasing state.dir");
    release().await;
    let (mut stream, mut reader) = handed;
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        send_line(
            &mut stream,
            &Message {
                released: true,
                ..Message::default()
            },
        )?;
        let ready = read_line(&mut reader)?;
        if ready.ready {
            Ok(())
        } else {
            Err(std::io::Error::other("the new process did not say ready"))
        }
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Descriptor passing over the control socket (Linux).
#[cfg(target_os = "linux")]
mod passing {
    use std::io::{IoSlice, IoSliceMut};
    use std::mem::MaybeUninit;
    use std::os::fd::{AsFd, OwnedFd};
    use std::os::unix::net::UnixStream;

    use rustix::net::{
        recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags,
        SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
    };

    use super::{Message, Sockets};

    /// At most this many sockets change hands (workers × 2 + admin).
    const MAX_FDS: usize = 2 * 1024 + 1;

    pub fn send(stream: &UnixStream, sockets: &Sockets) -> std::io::Result<()> {
        let header = Message {
            proxy: Some(sockets.proxy.len()),
            tls: Some(sockets.tls.len()),
            pid: Some(std::process::id()),
            ..Message::default()
        };
        let mut line = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let fds: Vec<_> = sockets
            .proxy
            .iter()
            .chain(&sockets.tls)
            .chain(std::iter::once(&sockets.admin))
            .map(AsFd::as_fd)
            .collect();
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut ancillary = SendAncillaryBuffer::new(&mut space);
        if !ancillary.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(std::io::Error::other("too many sockets to pass"));
        }
        sendmsg(
            stream,
            &[IoSlice::new(&line)],
            &mut ancillary,
            SendFlags::empty(),
        )?;
        Ok(())
    }

    /// The header, the sockets, and any bytes that came after the header's line.
    pub fn receive(stream: &UnixStream) -> std::io::Result<(Message, Vec<OwnedFd>, Vec<u8>)> {
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut ancillary = RecvAncillaryBuffer::new(&mut space);
        let mut buf = vec![0u8; 4096];
        let received = recvmsg(
            stream,
            &mut [IoSliceMut::new(&mut buf)],
            &mut ancillary,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        for message in ancillary.drain() {
            if let RecvAncillaryMessage::ScmRights(passed) = message {
                fds.extend(passed);
            }
        }
        let data = &buf[..received.bytes];
        let end = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
        let header: Message =
            serde_json::from_slice(&data[..end]).map_err(std::io::Error::other)?;
        let rest = data.get(end + 1..).unwrap_or_default().to_vec();
        Ok((header, fds, rest))
    }
}

#[cfg(not(target_os = "linux"))]
mod passing {
    use std::os::unix::net::UnixStream;

    use super::{Message, Sockets};

    pub fn send(_: &UnixStream, _: &Sockets) -> std::io::Result<()> {
        Err(std::io::Error::other("binary takeover needs Linux"))
    }

    pub fn receive(
        _: &UnixStream,
    ) -> std::io::Result<(Message, Vec<std::os::fd::OwnedFd>, Vec<u8>)> {
        Err(std::io::Error::other("binary takeover needs Linux"))
    }
}
