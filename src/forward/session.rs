//! Resumable TCP flows, the driving part: one end (origin or terminus) of a flow whose QUIC
//! stream may be replaced without the TCP connection noticing.
//!
//! An end runs three things side by side: a *pump* that reads its TCP socket into the replay
//! buffer ([`Replay`], bounded: at the bound it stops reading, so a stalled path holds at most
//! [`super::resume::MAX_REPLAY`] bytes per direction), a *sink* that writes what the peer
//! sent to the socket, and a sequence of *attempts*, each one QUIC stream on which a writer
//! sends what the peer has not received (data, FIN, acks of what the sink has written) and a
//! reader hands the peer's data to the sink and applies its acks. The reader never waits for
//! the socket while this end needs the peer's acks (its replay buffer full, or its socket
//! ended): those acks must get through while this end's socket is blocked, or two ends whose
//! applications each wait to write (an echo) would wait on each other for ever. Otherwise it
//! pauses once the sink has `QUEUE_SOFT` (1 MiB) queued, leaving the rest to QUIC flow
//! control. The queue is bounded in any case: a peer never has more than `MAX_REPLAY` bytes
//! unacknowledged, and the sink acknowledges only what it wrote (a peer that sends more is
//! cut off). An
//! attempt ends when the flow is done, when its stream fails (reset, connection lost), or when
//! it is superseded: at the origin when the mesh's next hop for the flow changes (the link went
//! silent and routing moved), at the terminus when the origin resumes on a new stream. Then
//! the origin reopens the flow on the current next hop (retrying until `links.idle_timeout`)
//! and the terminus waits for that (as long), each side says how much it has received (taken
//! into its sink's queue), and the writers resend from there: nothing is skipped or
//! delivered twice.
//!
//! What does not survive: an agent restart at either end (the state is in memory), an outage
//! longer than `links.idle_timeout`, and a peer whose TCP connection was reset (that reset
//! reaches the other side as a stream reset with [`codes::GONE`]).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::header::{FlowHeader, ResumeExt};
use super::priority::SmallFirst;
use super::resume::{self, ACK_EVERY, Decoder, Event, FrameError, MAX_FRAME, MAX_REPLAY, Replay, Token};
use super::tcp::{BUF, FIRST_BUF, write_all_chunks};
use super::{Forwarder, Hop, codes};
use crate::metrics::{self, Direction, FailReason, FlowMetrics};
use crate::names::Protocol;

/// A receiver acknowledges what it delivered at most this long after delivering it, when it
/// has not reached [`ACK_EVERY`] bytes before.
const ACK_DELAY: Duration = Duration::from_millis(100);
/// Chunks a reader takes from its stream at once.
const READ_CHUNKS: usize = 16;
/// Pause between attempts to reopen a flow whose path failed.
const RETRY: Duration = Duration::from_millis(200);
/// Longest wait for the terminus's answer when opening or reopening a stream (it answers a
/// new flow once its endpoint accepted, which takes up to the connect timeout).
pub(super) const ANSWER_TIMEOUT: Duration = Duration::from_secs(8);

/// Stream reset codes after which a flow is over for good (no resume).
pub(super) fn is_final(code: quinn::VarInt) -> bool {
    [codes::GONE, codes::REFUSED, codes::LIMIT, codes::BAD_HEADER]
        .iter()
        .any(|c| quinn::VarInt::from_u32(*c) == code)
}

/// A stream that carries (or takes over) a flow.
pub(super) struct Attach {
    /// Where this end's frames go.
    pub send: quinn::SendStream,
    /// Where the other end's frames come from.
    pub recv: quinn::RecvStream,
    /// Bytes (+1 for a FIN) the other end has received from this one: where to resend from.
    pub peer_received: u64,
    /// Whether `peer_received` is the terminus's answer, already read off the stream; `false`
    /// for an origin's new flow that sends at once: the answer (a resume point, which is not
    /// an acknowledgement: the terminus may not have written those bytes yet) is still to
    /// come and the reader skips it.
    pub answered: bool,
    /// At the terminus, whether the origin waits for the answer ([`super::header::ResumeExt::waits`]):
    /// then it goes at once, else with the first frame this end sends anyway (one packet
    /// fewer per flow). Always `false` at the origin.
    pub answer_now: bool,
    /// The connection it runs on, at the origin (which watches whether it is still the next
    /// hop); `None` at the terminus.
    pub via: Option<quinn::Connection>,
}

/// A resumable flow ending at this agent, as listed for streams that resume it: the VIP and
/// port it was opened for (a resume must name the same), and where to hand the stream.
pub(super) type Resumable = (std::net::IpAddr, u16, mpsc::Sender<Box<Attach>>);

/// Which end of the flow this is.
pub(super) enum Side {
    /// Where the client connected: reopens the flow when its path fails or moves.
    Origin {
        /// The flow's secret name, sent with every reopened stream.
        token: Token,
        /// The flow's header, resent (with the extension) on every reopened stream.
        header: FlowHeader,
    },
    /// Where the endpoint is: waits for the origin to reopen. Resumes arrive here.
    Terminus {
        /// Streams that resume this flow, handed over by [`Forwarder::serve_stream`].
        /// (Boxed: a channel allocates room for 32 items up front, and a flow rarely sees one.)
        resumes: mpsc::Receiver<Box<Attach>>,
    },
}

/// How an attempt (or the whole flow) ended.
#[derive(Debug)]
enum Outcome {
    /// Both directions ended and were acknowledged.
    Done,
    /// The stream failed or was superseded: the flow may move.
    Broken(String),
    /// The other end ended the flow (its TCP connection reset, or it does not know the flow).
    Gone(String),
    /// The stream was reset or stopped with a final code ([`is_final`]).
    Refused(quinn::VarInt),
    /// This end cannot go on: its TCP connection failed, or the peer broke the protocol.
    Fatal(String),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Done => f.write_str("done"),
            Outcome::Broken(why) => write!(f, "stream broke: {why}"),
            Outcome::Gone(why) => write!(f, "ended by the other end: {why}"),
            Outcome::Refused(code) => write!(f, "refused with code {code}"),
            Outcome::Fatal(why) => write!(f, "failed: {why}"),
        }
    }
}

impl Outcome {
    fn rank(&self) -> u8 {
        match self {
            Outcome::Done => 0,
            Outcome::Broken(_) => 1,
            Outcome::Gone(_) | Outcome::Refused(_) => 2,
            Outcome::Fatal(_) => 3,
        }
    }
}

/// What the pump, the sink and the attempts of an end share.
struct Shared {
    /// What this end read from its socket and the peer has not acknowledged.
    out: Replay,
    /// Peer bytes taken into `queue` (+1 once its FIN is): what a resume resends from.
    received: u64,
    /// The peer's FIN was received (and queued behind its data).
    peer_fin: bool,
    /// Peer data received, not yet written to the socket (in order).
    queue: VecDeque<Bytes>,
    /// Bytes in `queue`: bounded by the peer's replay bound, checked ([`MAX_QUEUE`]).
    queued: u64,
    /// Peer bytes written to the socket (+1 once its FIN is, i.e. the write side is shut
    /// down): what this end acknowledges, so the peer holds what is not yet written.
    delivered: u64,
    /// The last acknowledgement sent.
    ack_sent: u64,
    /// When `delivered` first went past `ack_sent`, so an ack goes within [`ACK_DELAY`].
    ack_pending_since: Option<Instant>,
}

/// Most bytes the sink's queue may hold before the peer counts as broken: its replay bound
/// plus a few reads' worth of slack (a pump may overshoot the bound by one read).
const MAX_QUEUE: u64 = MAX_REPLAY + 4 * BUF as u64;
/// A reader stops taking data from its stream while the sink's queue holds this much (bytes)
/// and this end needs no ack from the peer, leaving the rest to QUIC flow control as a plain
/// flow does. Without it a bulk flow into a slower socket kept up to [`MAX_QUEUE`] queued in
/// the agent. (Throughput with and without it was within this machine's noise.)
const QUEUE_SOFT: u64 = 1024 * 1024;

/// One end's state, shared by its pump, its sink and its attempts.
struct EndState {
    shared: Mutex<Shared>,
    /// Wakes the attempt's writer: new data, an ack due, the flow done.
    writer: Notify,
    /// Wakes the pump: an ack freed room in the replay buffer.
    room: Notify,
    /// Wakes the sink: peer data (or its FIN) queued.
    sink: Notify,
    /// Wakes a reader paused on a long queue: the sink drained it, or this end now needs the
    /// peer's acks (its replay buffer is full, or its socket ended).
    reader: Notify,
}

impl EndState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        match self.shared.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

impl Forwarder {
    /// Carries a resumable flow between `tcp` and the stream in `first` until it ends,
    /// moving it to new streams as its path changes (see the module doc). Returns whether the
    /// far end refused the flow's header (`BAD_HEADER`: it, or a relay, cannot resume).
    pub(super) async fn resumable(
        &self,
        mut tcp: TcpStream,
        first: Attach,
        mut side: Side,
        flow: &FlowMetrics,
    ) -> bool {
        let (tcp_dir, quic_dir) = if flow.role() == metrics::Role::Origin {
            (Direction::ToEndpoint, Direction::FromEndpoint)
        } else {
            (Direction::FromEndpoint, Direction::ToEndpoint)
        };
        let end = EndState {
            shared: Mutex::new(Shared {
                out: Replay::new(MAX_REPLAY),
                received: 0,
                peer_fin: false,
                queue: VecDeque::new(),
                queued: 0,
                delivered: 0,
                ack_sent: 0,
                ack_pending_since: None,
            }),
            writer: Notify::new(),
            room: Notify::new(),
            sink: Notify::new(),
            reader: Notify::new(),
        };
        let stop = CancellationToken::new();
        let abort = CancellationToken::new();
        let (mut tr, mut tw) = tcp.split();
        let pump = async {
            let r = pump(&end, &mut tr, &stop).await;
            if r.is_err() {
                abort.cancel();
            }
            r
        };
        let sink = async {
            let r = sink(&end, &mut tw, &stop).await;
            if r.is_err() {
                abort.cancel();
            }
            r
        };
        let drive = async {
            let r = self.drive(&end, first, &mut side, &abort, flow).await;
            stop.cancel();
            r
        };
        let (pumped, sunk, driven) = tokio::join!(pump, sink, drive);
        let driven = match sunk {
            Ok(n) => {
                flow.bytes(quic_dir, n);
                driven
            }
            Err(e) => Outcome::Fatal(format!("tcp: {e}")),
        };
        let refused = matches!(driven, Outcome::Refused(c) if c == codes::BAD_HEADER.into());
        match (pumped, driven) {
            (Ok(n), Outcome::Done) => {
                flow.bytes(tcp_dir, n);
                flow.closed();
            }
            (pumped, outcome) => {
                let read = match pumped {
                    Ok(n) => n,
                    Err(e) => {
                        debug!(error = %e, "flow's TCP connection failed");
                        0
                    }
                };
                flow.bytes(tcp_dir, read);
                debug!(%outcome, "flow reset");
                flow.failed(FailReason::Reset);
                // A TCP RST, not a FIN: the client must not take a broken flow for a complete one.
                let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                drop(tcp);
            }
        }
        refused
    }

    /// Runs attempts until the flow ends; returns how.
    async fn drive(
        &self,
        end: &EndState,
        mut attach: Attach,
        side: &mut Side,
        abort: &CancellationToken,
        flow: &FlowMetrics,
    ) -> Outcome {
        let greet = matches!(side, Side::Terminus { .. });
        loop {
            let cancel = abort.child_token();
            let via = attach.via.clone();
            // Boxed: inline, its state would be laid out again beside each await of this
            // loop (measured: the whole flow's future twice as large).
            let mut run = Box::pin(attempt(end, attach, greet, &cancel, abort));
            let outcome = match side {
                Side::Origin { header, .. } => {
                    let current = via.as_ref().map(|c| c.stable_id());
                    let moved = tokio::select! {
                        o = &mut run => Err(o),
                        to = self.next_hop_moves(header, current) => Ok(to),
                    };
                    match moved {
                        Err(o) => o,
                        Ok(to) => {
                            cancel.cancel();
                            match run.await {
                                Outcome::Broken(_) => Outcome::Broken(format!("next hop moved to {to}")),
                                other => other,
                            }
                        }
                    }
                }
                Side::Terminus { resumes } => {
                    let next = tokio::select! {
                        o = &mut run => Err(o),
                        a = resumes.recv() => Ok(a),
                    };
                    match next {
                        Err(o) => o,
                        Ok(None) => run.await,
                        Ok(Some(a)) => {
                            // The origin moved the flow while the old stream looked alive
                            // (a silent path): drop the old one, carry on on the new one.
                            cancel.cancel();
                            match run.await {
                                Outcome::Broken(_) => {}
                                other => return other,
                            }
                            info!("flow resumed on a new stream (the old one was still open)");
                            flow.resumed();
                            attach = *a;
                            continue;
                        }
                    }
                }
            };
            let why = match outcome {
                Outcome::Broken(why) if !abort.is_cancelled() => why,
                Outcome::Broken(_) => return Outcome::Fatal("the TCP connection failed".into()),
                other => return other,
            };
            attach = match side {
                Side::Origin { token, header } => {
                    debug!(%why, "flow's stream broke; reopening it");
                    let from = via.map(|c| c.remote_address().to_string()).unwrap_or_default();
                    match self.reopen(end, header, *token, abort).await {
                        Ok(a) => {
                            let to = a
                                .via
                                .as_ref()
                                .map(|c| c.remote_address().to_string())
                                .unwrap_or_default();
                            info!(%from, %to, %why, "flow moved to another path");
                            flow.resumed();
                            a
                        }
                        Err(o) => return o,
                    }
                }
                Side::Terminus { resumes } => {
                    debug!(%why, "flow's stream broke; waiting for the origin to resume it");
                    tokio::select! {
                        a = resumes.recv() => match a {
                            Some(a) => {
                                info!(%why, "flow resumed on a new stream");
                                flow.resumed();
                                *a
                            }
                            None => return Outcome::Gone("no longer resumable".into()),
                        },
                        _ = tokio::time::sleep(self.opts.resume_window) => {
                            return Outcome::Gone(format!("not resumed within {:?}", self.opts.resume_window))
                        }
                        _ = abort.cancelled() => return Outcome::Fatal("the TCP connection failed".into()),
                    }
                }
            };
        }
    }

    /// Where the origin's flow for `header` goes from here now, if over a connection.
    fn current_conn(&self, header: &FlowHeader) -> Option<quinn::Connection> {
        let view = self.mesh.view();
        let target = view
            .vips
            .get(&header.vip)
            .filter(|t| t.ready && t.exports(header.port, Protocol::Tcp))?;
        match self.hop(&header.vip, target) {
            Hop::Conn(c) => Some(c),
            Hop::Local | Hop::Unreachable => None,
        }
    }

    /// Returns (the new next hop's address) once routing sends the flow over a connection
    /// other than `current`; never while there is no other way (the flow waits on its own).
    async fn next_hop_moves(&self, header: &FlowHeader, current: Option<usize>) -> String {
        let mut views = self.mesh.subscribe();
        loop {
            if views.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            if let Some(c) = self.current_conn(header)
                && Some(c.stable_id()) != current
            {
                return c.remote_address().to_string();
            }
        }
    }

    /// Reopens the origin's flow on the current next hop, retrying until
    /// `links.idle_timeout`; returns the new stream, or how the flow ended.
    async fn reopen(
        &self,
        end: &EndState,
        header: &FlowHeader,
        token: Token,
        abort: &CancellationToken,
    ) -> Result<Attach, Outcome> {
        let deadline = Instant::now() + self.opts.resume_window;
        loop {
            if abort.is_cancelled() {
                return Err(Outcome::Fatal("the TCP connection failed".into()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Outcome::Gone(format!(
                    "no path to resume on within {:?}",
                    self.opts.resume_window
                )));
            }
            if let Some(conn) = self.current_conn(header) {
                let ext = ResumeExt {
                    token,
                    resuming: true,
                    waits: true,
                    received: end.lock().received,
                };
                let wait = (deadline - now).min(ANSWER_TIMEOUT);
                match tokio::time::timeout(wait, open_answered(&conn, header, &ext)).await {
                    Ok(Ok((send, recv, peer_received))) => {
                        return Ok(Attach {
                            send,
                            recv,
                            peer_received,
                            answered: true,
                            answer_now: false,
                            via: Some(conn),
                        });
                    }
                    Ok(Err(OpenError::Failed(why))) => debug!(%why, "reopening the flow failed; retrying"),
                    Ok(Err(e)) => return Err(Outcome::Gone(e.to_string())),
                    Err(_) => debug!("no answer to reopening the flow; retrying"),
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = abort.cancelled() => {}
            }
        }
    }
}

/// Why opening a stream for a resumable flow failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum OpenError {
    /// The far end refused for good with this reset code ([`is_final`]: `BAD_HEADER` from an
    /// agent that cannot resume, `GONE` for a flow it does not know, `REFUSED`, `LIMIT`).
    #[error("refused with code {0}")]
    Refused(quinn::VarInt),
    /// The answer was not an ack frame.
    #[error("bad answer: {0}")]
    Invalid(#[from] FrameError),
    /// The stream or its connection failed; another try may work.
    #[error("{0}")]
    Failed(String),
}

/// Opens a stream on `conn` with `header` and its extension `ext`, and reads the terminus's
/// answer (its first frame, an ack of what it has received).
pub(super) async fn open_answered(
    conn: &quinn::Connection,
    header: &FlowHeader,
    ext: &ResumeExt,
) -> Result<(quinn::SendStream, quinn::RecvStream, u64), OpenError> {
    let (send, mut recv) = super::tcp::open(conn, header, Some(ext))
        .await
        .map_err(OpenError::Failed)?;
    let mut frame = [0u8; resume::ACK_LEN];
    match recv.read_exact(&mut frame).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::ReadError(quinn::ReadError::Reset(code))) if is_final(code) => {
            return Err(OpenError::Refused(code));
        }
        Err(e) => return Err(OpenError::Failed(e.to_string())),
    }
    let peer_received = resume::parse_ack(&frame)?;
    Ok((send, recv, peer_received))
}

/// Reads the TCP socket into the replay buffer until its end (returns the bytes read), an
/// error, or `stop`. Waits for room while the buffer is at its bound.
async fn pump(end: &EndState, tr: &mut ReadHalf<'_>, stop: &CancellationToken) -> std::io::Result<u64> {
    let mut want = FIRST_BUF;
    let mut buf = BytesMut::new();
    let mut total = 0u64;
    loop {
        while end.lock().out.full() {
            // This end now needs the peer's acks: a paused reader must go on.
            end.reader.notify_one();
            tokio::select! {
                _ = end.room.notified() => {}
                _ = stop.cancelled() => return Ok(total),
            }
        }
        buf.reserve(want);
        let r = tokio::select! {
            r = tr.read_buf(&mut buf) => r,
            _ = stop.cancelled() => return Ok(total),
        };
        match r? {
            0 => {
                end.lock().out.finish();
                end.writer.notify_one();
                end.reader.notify_one();
                return Ok(total);
            }
            n => {
                if n >= want {
                    want = (want * 2).min(BUF);
                }
                total += n as u64;
                end.lock().out.push(buf.split().freeze());
                end.writer.notify_one();
            }
        }
    }
}

/// One stream of the flow: sends from `attach.peer_received` on, delivers what arrives, until
/// done, broken, or `cancel`. Resets the stream unless done: with [`codes::GONE`] when the
/// flow is over, else [`codes::RESET`] (the peer waits for a resume).
async fn attempt(
    end: &EndState,
    attach: Attach,
    greet: bool,
    cancel: &CancellationToken,
    abort: &CancellationToken,
) -> Outcome {
    let Attach {
        mut send,
        mut recv,
        peer_received,
        answered,
        answer_now,
        ..
    } = attach;
    // The peer has queued everything before `peer_received` (and will write it), but only
    // acknowledges it once written: keep it until then, resend from there.
    let checked = end.lock().out.chunks_from(peer_received, &mut Vec::new());
    let outcome = match checked {
        Err(e) => Outcome::Fatal(e.to_string()),
        Ok(()) => {
            let local = cancel.child_token();
            let w = async {
                let o = write_side(end, &mut send, peer_received, greet.then_some(answer_now), &local).await;
                if !matches!(o, Outcome::Done) {
                    local.cancel();
                }
                o
            };
            let r = async {
                let o = read_side(end, &mut recv, !answered, &local).await;
                if !matches!(o, Outcome::Done) {
                    local.cancel();
                }
                o
            };
            let (wo, ro) = tokio::join!(w, r);
            if wo.rank() >= ro.rank() { wo } else { ro }
        }
    };
    if !matches!(outcome, Outcome::Done) {
        let over = abort.is_cancelled() || outcome.rank() >= 2;
        let code = quinn::VarInt::from_u32(if over { codes::GONE } else { codes::RESET });
        let _ = send.reset(code);
        let _ = recv.stop(code);
    }
    outcome
}

/// The writer of an attempt: data from `pos` on, the FIN, acks. At the terminus `greet` is
/// `Some(now)`: the stream's first frame is the answer (what this end has received), sent at
/// once when `now` (the origin waits for it), else with the first frame sent anyway. Finishes
/// the stream as soon as it has nothing more to say: its FIN is sent and the peer's FIN is
/// written and acknowledged (the reader still waits for the peer's last acks).
async fn write_side(
    end: &EndState,
    send: &mut quinn::SendStream,
    mut pos: u64,
    greet: Option<bool>,
    cancel: &CancellationToken,
) -> Outcome {
    let mut batch: Vec<Bytes> = Vec::new();
    let mut frames: Vec<Bytes> = Vec::new();
    let mut headers = resume::HeaderPool::default();
    let mut greet = greet;
    // Interactive flows go before bulk ones on the link ([`super::priority`]).
    let mut pace = SmallFirst::new(std::time::Instant::now());
    let _ = send.set_priority(pace.priority());
    loop {
        let (ack_at, done) = {
            let mut s = end.lock();
            batch.clear();
            if let Err(e) = s.out.chunks_from(pos, &mut batch) {
                return Outcome::Fatal(e.to_string());
            }
            let data_end = s.out.end();
            let new_pos = pos.max(data_end);
            let fin_now = s.out.finished() && new_pos == data_end;
            frames.clear();
            for mut b in batch.drain(..) {
                while !b.is_empty() {
                    let part = b.split_to(b.len().min(MAX_FRAME as usize));
                    frames.push(headers.data(part.len() as u32));
                    frames.push(part);
                }
            }
            if fin_now {
                frames.push(resume::fin_frame());
            }
            pos = new_pos + u64::from(fin_now);
            let fin_written = s.peer_fin && s.queued == 0 && s.delivered == s.received;
            // Everything of ours, FIN included, is on its way (or acknowledged).
            let all_sent = s.out.finished() && pos > data_end;
            // An ack rides along with anything sent anyway (no packet of its own for a
            // request and its answer, nor for the peer's FIN while ours is still to come),
            // else goes on its own every ACK_EVERY or ACK_DELAY; the ack of the peer's FIN
            // goes at once when this end has nothing more to send (the peer waits for it
            // to finish).
            let due = s.delivered > s.ack_sent
                && ((fin_written && all_sent)
                    || !frames.is_empty()
                    || s.delivered - s.ack_sent >= ACK_EVERY
                    || s.ack_pending_since.is_some_and(|t| t.elapsed() >= ACK_DELAY));
            if due {
                frames.push(headers.ack(s.delivered));
                s.ack_sent = s.delivered;
                s.ack_pending_since = None;
            }
            if let Some(now) = greet
                && (now || !frames.is_empty())
            {
                // The terminus's first frame on every stream says what it has received
                // (queued to its socket): where the origin resends from.
                frames.insert(0, headers.ack(s.received));
                greet = None;
            }
            let ack_at = (s.delivered > s.ack_sent)
                .then(|| s.ack_pending_since.map(|t| t + ACK_DELAY))
                .flatten();
            (ack_at, all_sent && fin_written && s.ack_sent == s.delivered)
        };
        if !frames.is_empty() {
            let bytes = frames.iter().map(Bytes::len).sum();
            if let Some(p) = pace.on_send(bytes, std::time::Instant::now()) {
                let _ = send.set_priority(p);
            }
            let written = tokio::select! {
                r = send.write_all_chunks(&mut frames) => r,
                _ = cancel.cancelled() => return Outcome::Broken("superseded".into()),
            };
            match written {
                Ok(()) => {}
                Err(quinn::WriteError::Stopped(code)) if is_final(code) => return Outcome::Refused(code),
                Err(e) => return Outcome::Broken(e.to_string()),
            }
        }
        if done {
            let _ = send.finish();
            return Outcome::Done;
        }
        let ack_timer = async {
            match ack_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = end.writer.notified() => {}
            _ = ack_timer => {}
            _ = cancel.cancelled() => return Outcome::Broken("superseded".into()),
        }
    }
}

/// The reader of an attempt: decodes the peer's frames, queues its data for the sink,
/// applies its acks; never waits for the socket. Returns when the stream ends, fails, or
/// `cancel` (at any point: everything decoded is queued at once).
async fn read_side(
    end: &EndState,
    recv: &mut quinn::RecvStream,
    mut skip_answer: bool,
    cancel: &CancellationToken,
) -> Outcome {
    let mut dec = Decoder::resuming(end.lock().peer_fin);
    // Fewer slots than a plain flow's reader: chunks only move to the sink's queue here (the
    // sink writes the whole queue with one `writev`), and an idle flow holds this array.
    let mut chunks: [Bytes; READ_CHUNKS] = std::array::from_fn(|_| Bytes::new());
    loop {
        // Paused while the sink has plenty queued and this end waits for no ack (see
        // QUEUE_SOFT); never while it does, or two ends whose applications each wait to write
        // would wait on each other for ever.
        loop {
            let paused = {
                let s = end.lock();
                s.queued >= QUEUE_SOFT && !s.out.full() && !s.out.finished()
            };
            if !paused {
                break;
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Outcome::Broken("superseded".into()),
                _ = end.reader.notified() => {}
            }
        }
        let r = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Outcome::Broken("superseded".into()),
            r = recv.read_chunks(&mut chunks) => r,
        };
        match r {
            Ok(Some(n)) => {
                let mut s = end.lock();
                let (mut queued, mut fin, mut ack) = (false, false, None::<u64>);
                for c in &mut chunks[..n] {
                    let fed = dec.feed(std::mem::take(c), &mut |e| match e {
                        Event::Data(b) => {
                            s.received += b.len() as u64;
                            s.queued += b.len() as u64;
                            s.queue.push_back(b);
                            queued = true;
                        }
                        // The terminus's answer is where to resend from, not an ack.
                        Event::Ack(_) if skip_answer => skip_answer = false,
                        Event::Ack(a) => ack = Some(ack.map_or(a, |x| x.max(a))),
                        Event::Fin => fin = true,
                    });
                    if let Err(e) = fed {
                        return Outcome::Fatal(e.to_string());
                    }
                }
                if fin {
                    s.received += 1;
                    s.peer_fin = true;
                }
                if s.queued > MAX_QUEUE {
                    return Outcome::Fatal(format!("the peer sent {} bytes beyond its bound", s.queued));
                }
                if let Some(a) = ack
                    && let Err(e) = s.out.ack(a)
                {
                    return Outcome::Fatal(e.to_string());
                }
                drop(s);
                if queued || fin {
                    end.sink.notify_one();
                }
                if ack.is_some() {
                    end.room.notify_one();
                    end.writer.notify_one();
                }
            }
            Ok(None) => {
                let s = end.lock();
                return if s.out.done() && s.peer_fin {
                    Outcome::Done
                } else {
                    Outcome::Broken("stream finished before the flow ended".into())
                };
            }
            Err(quinn::ReadError::Reset(code)) if is_final(code) => return Outcome::Refused(code),
            Err(e) => return Outcome::Broken(e.to_string()),
        }
    }
}

/// Writes the peer's data, as the readers queue it, to the socket, then shuts its write side
/// down after the peer's FIN; returns the bytes written. Lives as long as the flow, across
/// streams. Stops at `stop` (the flow is over), even in the middle of a write.
async fn sink(end: &EndState, tw: &mut WriteHalf<'_>, stop: &CancellationToken) -> std::io::Result<u64> {
    let mut batch: Vec<Bytes> = Vec::new();
    let mut total = 0u64;
    loop {
        let fin = {
            let mut s = end.lock();
            batch.extend(s.queue.drain(..));
            // The FIN is behind all data: it goes once the queue is empty.
            s.peer_fin && s.delivered + s.queued + 1 == s.received
        };
        if batch.is_empty() && !fin {
            tokio::select! {
                _ = end.sink.notified() => continue,
                _ = stop.cancelled() => return Ok(total),
            }
        }
        let written = tokio::select! {
            r = write_all_chunks(tw, &mut batch) => r?,
            _ = stop.cancelled() => return Ok(total),
        };
        batch.clear();
        if fin {
            let _ = tw.shutdown().await;
        }
        total += written;
        let mut s = end.lock();
        let was_pending = s.delivered > s.ack_sent;
        if s.queued >= QUEUE_SOFT && s.queued - written < QUEUE_SOFT {
            end.reader.notify_one();
        }
        s.queued -= written;
        s.delivered += written + u64::from(fin);
        if !was_pending {
            s.ack_pending_since = Some(Instant::now());
        }
        let wake = !was_pending || fin || s.delivered - s.ack_sent >= ACK_EVERY;
        drop(s);
        if wake {
            end.writer.notify_one();
        }
        if fin {
            return Ok(total);
        }
    }
}
