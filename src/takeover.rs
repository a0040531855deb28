//! Binary takeover: a new splitgate takes over a running one without failing a request.
//!
//! The running process (`splitgate run`) listens on `state.dir/splitgate.sock` (mode
//! 0600, and only a peer of the same user is answered). A new one started with
//! `splitgate run --takeover` connects there and receives the running process's
//! listening sockets themselves (SCM_RIGHTS, as HAProxy's `expose-fd listeners` and
//! Pingora's upgrade do). Connections waiting in those sockets' accept queues are then
//! accepted by whichever process gets to them first, and none is reset: binding fresh
//! `SO_REUSEPORT` sockets instead would lose the queue of every socket the old process
//! closes. The exchange, one line of JSON each way:
//!
//! 1. new → old `{"takeover":true}` (and its version); old → new the sockets (proxy,
//!    HTTPS, admin), with a line naming how many of each, or `{"error":…}` when it
//!    refuses this requester (under systemd, anyone but the successor it started on
//!    SIGUSR2: `successor`);
//! 2. old releases `state.dir` (its writer refuses changes from now on) →
//!    `{"released":true}`;
//! 3. new takes `state.dir`, starts serving on the sockets → `{"ready":true}`;
//! 4. old stops accepting and drains its connections, as on SIGTERM, and exits.
//!
//! A connection that fails before step 2 changes nothing (the old process keeps
//! listening for a takeover). If the new process fails after it, the old one takes
//! `state.dir` back and carries on; if it cannot, because the new one holds it, the
//! new one is serving and the old one drains as in step 4.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

mod successor;
pub use successor::Successors;

/// The control socket's name in `state.dir`.
pub const SOCKET: &str = "splitgate.sock";

/// How long either side waits for the other at each step, in all.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest line either side reads.
const MAX_LINE: usize = 4096;

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
    /// The requester's version, for the running process's log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    /// Why the running process refuses this takeover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

fn exchange_error(what: &str) -> impl Fn(std::io::Error) -> TakeoverError + '_ {
    move |error| TakeoverError::Exchange(format!("{what}: {error}"))
}

fn send_line(mut stream: &UnixStream, message: &Message) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

/// Reads one line of at most [`MAX_LINE`] bytes before `deadline`: a peer that sends
/// too much, or too slowly, is cut off.
fn read_line(
    stream: &UnixStream,
    reader: &mut impl BufRead,
    deadline: Instant,
) -> std::io::Result<Message> {
    let mut line = Vec::new();
    loop {
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
            .ok_or(std::io::ErrorKind::TimedOut)?;
        stream.set_read_timeout(Some(left))?;
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let (take, done) = match available.iter().position(|&b| b == b'\n') {
            Some(end) => (end, true),
            None => (available.len(), false),
        };
        line.extend_from_slice(&available[..take]);
        reader.consume(take + usize::from(done));
        if line.len() > MAX_LINE {
            return Err(std::io::Error::other("line too long"));
        }
        if done {
            return serde_json::from_slice(&line).map_err(std::io::Error::other);
        }
    }
}

/// The control socket's path for a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET)
}

/// The new process's side, until the old one has released the state directory.
/// Returns the sockets and the connection on which to say "ready".
pub fn request(state_dir: &Path) -> Result<(Sockets, Ready), TakeoverError> {
    let path = socket_path(state_dir);
    let stream = UnixStream::connect(&path).map_err(|source| TakeoverError::NotRunning {
        path: path.clone(),
        source,
    })?;
    let deadline = Instant::now() + STEP_TIMEOUT;
    send_line(
        &stream,
        &Message {
            takeover: true,
            version: Some(env!("CARGO_PKG_VERSION").into()),
            ..Message::default()
        },
    )
    .map_err(exchange_error("asking for the sockets"))?;
    stream
        .set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(exchange_error("control socket"))?;
    let (header, fds, rest) =
        passing::receive(&stream).map_err(exchange_error("receiving the sockets"))?;
    if let Some(error) = header.error {
        return Err(TakeoverError::Exchange(format!(
            "the running splitgate refused: {error}"
        )));
    }
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
    let reading = stream
        .try_clone()
        .map_err(exchange_error("control socket"))?;
    let mut reader = BufReader::new(std::io::Read::chain(std::io::Cursor::new(rest), reading));
    let released = read_line(&stream, &mut reader, deadline)
        .map_err(exchange_error("waiting for the state directory"))?;
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
        Ready(stream),
    ))
}

/// The new process's last word: it serves now.
pub struct Ready(UnixStream);

impl Ready {
    pub fn send(self) -> Result<(), TakeoverError> {
        send_line(
            &self.0,
            &Message {
                ready: true,
                ..Message::default()
            },
        )
        .map_err(exchange_error("saying ready"))
    }
}

/// What the running process's state writer does for a takeover.
pub trait StateDir {
    /// Releases `state.dir` (changes are refused from now on).
    fn release(&self) -> impl std::future::Future<Output = Result<(), String>> + Send;
    /// Takes it back; an error means the successor holds it.
    fn resume(&self) -> impl std::future::Future<Output = Result<(), String>> + Send;
}

/// The control socket, bound privately: created under a temporary name, made 0600,
/// then moved into place, so no other user ever finds it open.
fn bind_private(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let temporary = path.with_extension(format!("sock.{}", std::process::id()));
    let _ = std::fs::remove_file(&temporary);
    let listener = tokio::net::UnixListener::bind(&temporary)?;
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&temporary, path)?;
    Ok(listener)
}

/// Whether the socket file at `path` is the one this process bound (a successor
/// replaces it with its own, which must then be left alone).
pub struct SocketFile {
    path: PathBuf,
    inode: Option<u64>,
}

impl SocketFile {
    fn new(path: &Path) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            path: path.to_path_buf(),
            inode: std::fs::metadata(path).ok().map(|m| m.ino()),
        }
    }

    /// Removes the file if it is still ours.
    pub fn remove(&self) {
        use std::os::unix::fs::MetadataExt;
        let current = std::fs::metadata(&self.path).ok().map(|m| m.ino());
        if current.is_some() && current == self.inode {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// How one takeover attempt ended on the running process's side.
enum Attempt {
    /// The successor (this PID) serves: drain and exit.
    Done(u32),
    /// Nothing changed (a probe, a failed exchange before the release, or the state
    /// directory taken back): keep serving and listening.
    Abandoned(String),
}

/// The running process's side: binds the control socket (returned at once, so the
/// caller can remove it at exit) and, in the returned future, serves takeover attempts
/// until one completes. `sockets` are handed over; `state` releases and resumes
/// `state.dir`.
pub fn listen(
    state_dir: &Path,
    sockets: Sockets,
    state: impl StateDir + Send + Sync + 'static,
    admit: impl Fn(u32) -> Result<(), String> + Send + Sync + 'static,
) -> std::io::Result<(SocketFile, impl std::future::Future<Output = u32>)> {
    let path = socket_path(state_dir);
    // A socket file left by a process that died is ours to replace: the state
    // directory's lock says no other splitgate runs here.
    let listener = bind_private(&path)?;
    let file = SocketFile::new(&path);
    let sockets = std::sync::Arc::new(sockets);
    let admit: Admit = std::sync::Arc::new(admit);
    let serve = async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            match attempt(stream, sockets.clone(), &state, admit.clone()).await {
                Attempt::Done(successor) => return successor,
                Attempt::Abandoned(why) => {
                    tracing::warn!(%why, "a takeover attempt did not complete; still serving")
                }
            }
        }
    };
    Ok((file, serve))
}

/// Whether a process (by PID) may take over, and if not why.
type Admit = std::sync::Arc<dyn Fn(u32) -> Result<(), String> + Send + Sync>;

async fn attempt(
    stream: tokio::net::UnixStream,
    sockets: std::sync::Arc<Sockets>,
    state: &impl StateDir,
    admit: Admit,
) -> Attempt {
    let stream = match stream
        .into_std()
        .and_then(|s| s.set_nonblocking(false).map(|()| s))
    {
        Ok(stream) => stream,
        Err(error) => return Attempt::Abandoned(error.to_string()),
    };
    let handed = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        // Only the same user (or root) may take the sockets.
        let successor = same_user(&stream)?;
        let deadline = Instant::now() + STEP_TIMEOUT;
        let mut reader = BufReader::new(stream.try_clone()?);
        let asked = read_line(&stream, &mut reader, deadline)?;
        if !asked.takeover {
            return Err(std::io::Error::other("not a takeover request"));
        }
        if let Err(why) = admit(successor) {
            let refusal = Message {
                error: Some(why.clone()),
                ..Message::default()
            };
            let _ = send_line(&stream, &refusal);
            return Err(std::io::Error::other(format!(
                "refused pid {successor}: {why}"
            )));
        }
        tracing::info!(
            successor,
            version = asked.version.as_deref().unwrap_or("unknown"),
            "a new splitgate asks to take over"
        );
        passing::send(&stream, &sockets)?;
        Ok((stream, reader, successor))
    })
    .await;
    let (stream, mut reader, successor) = match handed {
        Ok(Ok(handed)) => handed,
        Ok(Err(error)) => return Attempt::Abandoned(error.to_string()),
        Err(error) => return Attempt::Abandoned(error.to_string()),
    };
    tracing::info!("handing over to a new splitgate: sockets sent, releasing state.dir");
    if let Err(error) = state.release().await {
        return Attempt::Abandoned(format!("could not release state.dir: {error}"));
    }
    let finished = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        send_line(
            &stream,
            &Message {
                released: true,
                ..Message::default()
            },
        )?;
        let ready = read_line(&stream, &mut reader, Instant::now() + STEP_TIMEOUT)?;
        if ready.ready {
            Ok(())
        } else {
            Err(std::io::Error::other("the new process did not say ready"))
        }
    })
    .await;
    match finished {
        Ok(Ok(())) => Attempt::Done(successor),
        Ok(Err(error)) => resume(state, error.to_string(), successor).await,
        Err(error) => resume(state, error.to_string(), successor).await,
    }
}

/// After a takeover that broke off past the release: take `state.dir` back, unless the
/// successor holds it (then it serves, and this process drains).
async fn resume(state: &impl StateDir, why: String, successor: u32) -> Attempt {
    match state.resume().await {
        Ok(()) => Attempt::Abandoned(why),
        Err(holder) => {
            tracing::warn!(%why, %holder, "the new process holds state.dir: it serves; draining");
            Attempt::Done(successor)
        }
    }
}

/// Refuses a peer of another user (root may take over anyone's); returns the peer's PID.
fn same_user(stream: &UnixStream) -> std::io::Result<u32> {
    passing::peer(stream).and_then(|(peer, pid, own)| {
        if peer == own || peer == 0 {
            Ok(pid)
        } else {
            Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("control socket peer is uid {peer}, not {own}"),
            ))
        }
    })
}

/// Descriptor passing over the control socket (Linux).
#[cfg(target_os = "linux")]
mod passing {
    use std::io::{IoSlice, IoSliceMut};
    use std::mem::MaybeUninit;
    use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
    use std::os::unix::net::UnixStream;

    use rustix::net::{
        recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
        SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
    };

    use super::{Message, Sockets};

    /// Descriptors per message: the kernel takes at most 253 (`SCM_MAX_FD`).
    const CHUNK: usize = 250;

    /// The peer's uid and this process's.
    /// The peer's user and PID, and this process's user.
    pub fn peer(stream: &UnixStream) -> std::io::Result<(u32, u32, u32)> {
        let peer = rustix::net::sockopt::socket_peercred(stream)?;
        Ok((
            peer.uid.as_raw(),
            peer.pid.as_raw_nonzero().get() as u32,
            rustix::process::getuid().as_raw(),
        ))
    }

    fn send_chunk(stream: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(CHUNK))];
        let mut ancillary = SendAncillaryBuffer::new(&mut space);
        if !ancillary.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(std::io::Error::other("too many sockets in one message"));
        }
        sendmsg(
            stream,
            &[IoSlice::new(data)],
            &mut ancillary,
            SendFlags::empty(),
        )?;
        Ok(())
    }

    /// The header line with the first descriptors, then one byte (`+`) with each
    /// further chunk.
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
        for (i, chunk) in fds.chunks(CHUNK).enumerate() {
            send_chunk(stream, if i == 0 { &line } else { b"+" }, chunk)?;
        }
        Ok(())
    }

    /// The header, every descriptor it announces, and any bytes after the header line.
    pub fn receive(stream: &UnixStream) -> std::io::Result<(Message, Vec<OwnedFd>, Vec<u8>)> {
        let mut fds = Vec::new();
        let mut data = Vec::new();
        let mut header: Option<Message> = None;
        loop {
            let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(CHUNK))];
            let mut ancillary = RecvAncillaryBuffer::new(&mut space);
            let mut buf = vec![0u8; 4096];
            let received = recvmsg(
                stream,
                &mut [IoSliceMut::new(&mut buf)],
                &mut ancillary,
                RecvFlags::CMSG_CLOEXEC,
            )?;
            if received.flags.contains(ReturnFlags::CTRUNC) {
                return Err(std::io::Error::other("sockets lost in passing (truncated)"));
            }
            if received.bytes == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            for message in ancillary.drain() {
                if let RecvAncillaryMessage::ScmRights(passed) = message {
                    fds.extend(passed);
                }
            }
            data.extend_from_slice(&buf[..received.bytes]);
            if header.is_none() {
                if let Some(end) = data.iter().position(|&b| b == b'\n') {
                    header =
                        Some(serde_json::from_slice(&data[..end]).map_err(std::io::Error::other)?);
                    data.drain(..=end);
                }
            }
            // A refusal comes without sockets.
            if let Some(refused) = header.take_if(|h| h.error.is_some()) {
                return Ok((refused, fds, data));
            }
            let expected = header
                .as_ref()
                .map(|h| h.proxy.unwrap_or(0) + h.tls.unwrap_or(0) + 1);
            if let Some(expected) = expected.filter(|&expected| fds.len() >= expected) {
                debug_assert!(expected <= fds.len());
                // The chunk markers are not part of the conversation.
                let rest = data.iter().skip_while(|&&b| b == b'+').copied().collect();
                let header = header.take().expect("expected is known only with a header");
                return Ok((header, fds, rest));
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod passing {
    use std::os::unix::net::UnixStream;

    use super::{Message, Sockets};

    fn unsupported<T>() -> std::io::Result<T> {
        Err(std::io::Error::other("binary takeover needs Linux"))
    }

    pub fn peer(_: &UnixStream) -> std::io::Result<(u32, u32, u32)> {
        unsupported()
    }

    pub fn send(_: &UnixStream, _: &Sockets) -> std::io::Result<()> {
        unsupported()
    }

    pub fn receive(
        _: &UnixStream,
    ) -> std::io::Result<(Message, Vec<std::os::fd::OwnedFd>, Vec<u8>)> {
        unsupported()
    }
}
