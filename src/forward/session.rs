//! Resumable TCP flows, the driving part: one end (origin or terminus) of a flow whose QUIC
//! stream may be replaced without the TCP connection noticing.
//!
//! An end ([`End`]) keeps what it read from its TCP socket and the peer has not acknowledged
//! (the replay buffer, [`Replay`], bounded: at the bound it stops reading, so a stalled path
//! holds at most [`super::resume::MAX_REPLAY`] bytes per direction) and the peer's data not
//! yet written to its socket (the sink's queue). It runs a sequence of *attempts*, each one
//! QUIC stream, driven by one hand-written poll function ([`poll_attempt`]) that does four
//! things in turn until none makes progress: read the stream (queue the peer's data, apply
//! its acks), write the queue to the socket (the sink), read the socket into the replay buffer
//! (the pump), and send what the peer has not received (data, FIN, acks of what the sink
//! wrote). One function instead of a future per activity: the joined futures, their `Notify`s
//! and cancellation tokens cost more than the flow's own work (about 40,000 instructions per
//! short connection per agent, `bench/instructions.sh`).
//!
//! The reader never waits for the socket while this end needs the peer's acks (its replay
//! buffer full, or its socket ended): those acks must get through while this end's socket is
//! blocked, or two ends whose applications each wait to write (an echo) would wait on each
//! other for ever. Otherwise it pauses once the sink has `QUEUE_SOFT` (1 MiB) queued, leaving
//! the rest to QUIC flow control. The queue is bounded in any case: a peer never has more than
//! `MAX_REPLAY` bytes unacknowledged, and the sink acknowledges only what it wrote (a peer that
//! sends more is cut off).
//!
//! An attempt ends when the flow is done, when its stream fails (reset, connection lost), or
//! when it is superseded: at the origin when the mesh's next hop for the flow changes (the
//! link went silent and routing moved), at the terminus when the origin resumes on a new
//! stream. Then the origin reopens the flow on the current next hop (retrying until
//! `links.idle_timeout`) and the terminus waits for that (as long), each side says how much it
//! has received (taken into its sink's queue), and the writers resend from there: nothing is
//! skipped or delivered twice. Between attempts neither socket is read or written (TCP flow
//! control holds the applications).
//!
//! What does not survive: an agent restart at either end (the state is in memory), an outage
//! longer than `links.idle_timeout`, and a peer whose TCP connection was reset (that reset
//! reaches the other side as a stream reset with [`codes::GONE`]).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tracing::{debug, info};

use super::final_ack::FinalAcks;
use super::header::{FlowHeader, ResumeExt};
use super::priority::SmallFirst;
use super::resume::{self, ACK_EVERY, Decoder, Event, FrameError, HeaderPool, MAX_FRAME, MAX_REPLAY, Replay, Token};
use super::tcp::{BUF, CHUNKS, FIRST_BUF, consume, io_slices};
use super::{Forwarder, Hop, codes, lock};
use crate::link::lanes::{BULK_MOVE, LaneChoice};
use crate::metrics::{self, Direction, FailReason, FlowMetrics};
use crate::names::Protocol;

/// A receiver acknowledges what it delivered at most this long after delivering it, when it
/// has not reached [`ACK_EVERY`] bytes before.
const ACK_DELAY: Duration = Duration::from_millis(100);
/// Chunks a reader takes from its stream at once (an idle flow holds this array).
const READ_CHUNKS: usize = 8;
/// Reads per pass of [`poll_attempt`]: `READ_CHUNKS * READ_ROUNDS` is [`CHUNKS`].
const READ_ROUNDS: usize = CHUNKS / READ_CHUNKS;
/// Passes of [`poll_attempt`] in one poll before it yields to other tasks (a busy flow
/// would otherwise keep its worker thread).
const MAX_PASSES: usize = 32;
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
pub(super) type Resumable = (std::net::IpAddr, u16, Arc<Mailbox>);

/// Where a stream that resumes a terminus flow is handed to the flow: one slot and a
/// wake-up. About 80 bytes, where a bounded `mpsc` channel allocated a 32-slot block up front
/// (800 bytes per flow) for something most flows never receive.
#[derive(Default)]
pub(super) struct Mailbox {
    /// The stream not yet taken by the flow.
    slot: std::sync::Mutex<Option<Box<Attach>>>,
    /// Woken when `slot` is filled (a permit is kept if the flow is not waiting yet).
    filled: tokio::sync::Notify,
}

impl Mailbox {
    /// Hands `attach` to the flow. Returns a resume still waiting there, which it replaces:
    /// the origin opens a resume only after giving up the one before, so it waits for the
    /// newest alone.
    pub(super) fn put(&self, attach: Box<Attach>) -> Option<Box<Attach>> {
        let replaced = lock(&self.slot).replace(attach);
        self.filled.notify_one();
        replaced
    }

    /// The next stream handed over. Cancel-safe: a stream is taken only when returned.
    async fn take(&self) -> Box<Attach> {
        loop {
            let taken = lock(&self.slot).take();
            if let Some(a) = taken {
                return a;
            }
            self.filled.notified().await;
        }
    }
}

/// Which end of the flow this is.
pub(super) enum Side {
    /// Where the client connected: reopens the flow when its path fails or moves.
    Origin {
        /// The flow's secret name, sent with every reopened stream.
        token: Token,
        /// The flow's header, resent (with the extension) on every reopened stream.
        header: FlowHeader,
        /// The flow's key for the lane it takes among several ([`crate::link::lanes::flow_key`]).
        lane: u64,
        /// The flow carried [`BULK_MOVE`] bytes and moved from the interactive lane to a bulk
        /// one ([`crate::link::lanes`]); it stays there.
        bulk: bool,
    },
    /// Where the endpoint is: waits for the origin to reopen. Resumes arrive here.
    Terminus {
        /// Streams that resume this flow, handed over by [`Forwarder::serve_stream`].
        resumes: Arc<Mailbox>,
    },
}

/// How an attempt (or the whole flow) ended.
#[derive(Debug)]
enum Outcome {
    /// Both directions ended and were acknowledged.
    Done,
    /// The stream failed or was superseded: the flow may move.
    Broken(String),
    /// At the origin, on the interactive lane: the flow has carried enough to count as bulk
    /// and moves to a bulk lane ([`crate::link::lanes`]), as a broken stream would.
    TurnedBulk,
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
            Outcome::TurnedBulk => f.write_str("the flow turned bulk"),
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
            Outcome::Broken(_) | Outcome::TurnedBulk => 1,
            Outcome::Gone(_) | Outcome::Refused(_) => 2,
            Outcome::Fatal(_) => 3,
        }
    }
}

/// The lane an origin's flow takes: the interactive one until it turned bulk.
fn lane_choice(key: u64, bulk: bool) -> LaneChoice {
    if bulk {
        LaneChoice::Bulk(key)
    } else {
        LaneChoice::Interactive
    }
}

/// Most bytes the sink's queue may hold before the peer counts as broken: its replay bound
/// plus a few reads' worth of slack (a pump may overshoot the bound by one read).
const MAX_QUEUE: u64 = MAX_REPLAY + 4 * BUF as u64;
/// A reader stops taking data from its stream while the sink's queue holds this much (bytes)
/// and this end needs no ack from the peer, leaving the rest to QUIC flow control as a plain
/// flow does. Without it a bulk flow into a slower socket kept up to [`MAX_QUEUE`] queued in
/// the agent.
const QUEUE_SOFT: u64 = 1024 * 1024;

/// One end of a resumable flow: its socket and everything that outlives a stream.
struct End<'t> {
    /// The flow's TCP connection (read by the pump, written by the sink).
    tcp: &'t TcpStream,
    /// What this end read from its socket and the peer has not acknowledged.
    out: Replay,
    /// The pump's read buffer (spare capacity, never zeroed; each read is split off).
    buf: BytesMut,
    /// The pump's next read size: starts small (idle and chatty flows stay cheap), doubles up
    /// to [`BUF`] while reads fill it.
    want: usize,
    /// Bytes read from the socket (metrics).
    read: u64,
    /// Peer bytes taken into `queue` (+1 once its FIN is): what a resume resends from.
    received: u64,
    /// The peer's FIN was received (and queued behind its data).
    peer_fin: bool,
    /// Peer data received, not yet written to the socket (in order; the front one may be
    /// partly written).
    queue: VecDeque<Bytes>,
    /// Bytes in `queue`: bounded by the peer's replay bound, checked ([`MAX_QUEUE`]).
    queued: u64,
    /// Peer bytes written to the socket (+1 once its FIN is, i.e. the write side is shut
    /// down): what this end acknowledges, so the peer holds what is not yet written.
    delivered: u64,
    /// Peer data bytes written to the socket (metrics).
    written: u64,
    /// The last acknowledgement sent.
    ack_sent: u64,
    /// When `delivered` first went past `ack_sent`, so an ack goes within [`ACK_DELAY`].
    ack_pending_since: Option<Instant>,
}

impl<'t> End<'t> {
    fn new(tcp: &'t TcpStream) -> End<'t> {
        End {
            tcp,
            out: Replay::new(MAX_REPLAY),
            buf: BytesMut::new(),
            want: FIRST_BUF,
            read: 0,
            received: 0,
            peer_fin: false,
            queue: VecDeque::new(),
            queued: 0,
            delivered: 0,
            written: 0,
            ack_sent: 0,
            ack_pending_since: None,
        }
    }

    /// The peer's FIN is written (the socket's write side shut down).
    fn fin_written(&self) -> bool {
        self.peer_fin && self.delivered == self.received
    }

    /// Everything is delivered both ways but possibly this end's FIN, whose ack is all the
    /// flow waits for: the peer's FIN is written, this end's socket ended and all its data is
    /// acknowledged.
    fn owes_nothing(&self) -> bool {
        self.fin_written() && self.out.finished() && self.out.held() == 0
    }

    /// Counts `n` peer bytes (+1 for its FIN when `fin`) as written to the socket.
    fn wrote(&mut self, n: u64, fin: bool) {
        if self.delivered == self.ack_sent {
            self.ack_pending_since = Some(Instant::now());
        }
        self.written += n;
        self.delivered += n + u64::from(fin);
    }

    /// Whether a reader must not take more from its stream now (see [`QUEUE_SOFT`]).
    fn reader_paused(&self) -> bool {
        let needs_acks = self.out.full() || (self.out.finished() && !self.out.done());
        self.queued >= QUEUE_SOFT && !needs_acks
    }

    /// Reads the socket once into the replay buffer, unless it is full or ended. Returns
    /// whether anything happened (data or the end of the socket's read side).
    fn pump(&mut self, cx: &mut Context<'_>) -> std::io::Result<bool> {
        while !self.out.full() && !self.out.finished() {
            match self.tcp.poll_read_ready(cx) {
                Poll::Pending => return Ok(false),
                Poll::Ready(r) => r?,
            }
            self.buf.reserve(self.want);
            match self.tcp.try_read_buf(&mut self.buf) {
                Ok(0) => {
                    self.out.finish();
                    return Ok(true);
                }
                Ok(n) => {
                    if n >= self.want {
                        self.want = (self.want * 2).min(BUF);
                    }
                    self.read += n as u64;
                    self.out.push(self.buf.split().freeze());
                    return Ok(true);
                }
                // Readiness was stale: polling again registers for the next.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// Writes the queue to the socket as far as it takes it (one `writev` per up to
    /// [`CHUNKS`] chunks), then, once the peer's FIN is next, shuts the write side down.
    /// Returns whether anything was written.
    fn sink(&mut self, cx: &mut Context<'_>) -> std::io::Result<bool> {
        let mut progress = false;
        while !self.queue.is_empty() {
            match self.tcp.poll_write_ready(cx) {
                Poll::Pending => return Ok(progress),
                Poll::Ready(r) => r?,
            }
            let written = {
                let (slices, n) = io_slices(&self.queue);
                self.tcp.try_write_vectored(&slices[..n])
            };
            let n = match written {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            self.queued -= n as u64;
            self.wrote(n as u64, false);
            progress = true;
            consume(&mut self.queue, n);
            while self.queue.front().is_some_and(Bytes::is_empty) {
                self.queue.pop_front();
            }
        }
        // The FIN is behind all data: it goes once the queue is empty.
        if self.peer_fin && self.delivered + 1 == self.received {
            let _ = socket2::SockRef::from(self.tcp).shutdown(std::net::Shutdown::Write);
            self.wrote(0, true);
            progress = true;
        }
        Ok(progress)
    }

    /// Takes the frames in `chunks` (as read from the stream): queues the peer's data, applies
    /// its acks. Errors (the outcome): a broken or hostile peer.
    fn take(&mut self, dec: &mut Decoder, chunks: &mut [Bytes], skip_answer: &mut bool) -> Result<(), Outcome> {
        let (mut fin, mut ack) = (false, None::<u64>);
        for c in chunks {
            let (queue, queued, received) = (&mut self.queue, &mut self.queued, &mut self.received);
            dec.feed(std::mem::take(c), &mut |e| match e {
                Event::Data(b) => {
                    *received += b.len() as u64;
                    *queued += b.len() as u64;
                    queue.push_back(b);
                }
                // The terminus's answer is where to resend from, not an ack.
                Event::Ack(_) if *skip_answer => *skip_answer = false,
                Event::Ack(a) => ack = Some(ack.map_or(a, |x| x.max(a))),
                Event::Fin => fin = true,
            })
            .map_err(|e| Outcome::Fatal(e.to_string()))?;
        }
        if fin {
            self.received += 1;
            self.peer_fin = true;
        }
        if self.queued > MAX_QUEUE {
            return Err(Outcome::Fatal(format!(
                "the peer sent {} bytes beyond its bound",
                self.queued
            )));
        }
        if let Some(a) = ack {
            self.out.ack(a).map_err(|e| Outcome::Fatal(e.to_string()))?;
        }
        Ok(())
    }
}

impl Forwarder {
    /// Carries a resumable flow between `tcp` and the stream in `first` until it ends,
    /// moving it to new streams as its path changes (see the module doc). Returns whether the
    /// far end refused the flow's header (`BAD_HEADER`: it, or a relay, cannot resume).
    pub(super) async fn resumable(&self, tcp: TcpStream, first: Attach, mut side: Side, flow: &FlowMetrics) -> bool {
        let (tcp_dir, quic_dir) = if flow.role() == metrics::Role::Origin {
            (Direction::ToEndpoint, Direction::FromEndpoint)
        } else {
            (Direction::FromEndpoint, Direction::ToEndpoint)
        };
        let mut end = End::new(&tcp);
        let driven = self.drive(&mut end, first, &mut side, flow).await;
        flow.bytes(tcp_dir, end.read);
        flow.bytes(quic_dir, end.written);
        let refused = matches!(driven, Outcome::Refused(c) if c == codes::BAD_HEADER.into());
        if matches!(driven, Outcome::Done) {
            flow.closed();
        } else {
            debug!(outcome = %driven, "flow reset");
            flow.failed(FailReason::Reset);
            // A TCP RST, not a FIN: the client must not take a broken flow for a complete one.
            let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
            drop(tcp);
        }
        refused
    }

    /// Runs attempts until the flow ends; returns how.
    async fn drive(&self, end: &mut End<'_>, mut attach: Attach, side: &mut Side, flow: &FlowMetrics) -> Outcome {
        let greet = matches!(side, Side::Terminus { .. });
        loop {
            let cancel = AtomicBool::new(false);
            let via = attach.via.clone();
            // How this attempt ended, or (at the terminus) the stream that superseded it.
            let (outcome, resumed) = {
                // Boxed: inline, its state would be laid out again beside each await of this
                // loop (measured: the whole flow's future twice as large).
                // An origin's flow on the interactive lane of a link with bulk lanes moves once
                // it has carried BULK_MOVE more bytes.
                let move_after = match side {
                    Side::Origin {
                        header, bulk: false, ..
                    } if self.mesh.has_bulk_lanes(&header.site) => Some(end.read + end.received + BULK_MOVE),
                    _ => None,
                };
                let mut run = Box::pin(attempt(end, attach, greet, &cancel, move_after, &self.final_acks));
                match side {
                    Side::Origin { header, lane, bulk, .. } => {
                        let current = via.as_ref().map(|c| c.stable_id());
                        let choice = lane_choice(*lane, *bulk);
                        let moved = tokio::select! {
                            o = &mut run => Err(o),
                            to = self.next_hop_moves(header, choice, current) => Ok(to),
                        };
                        match moved {
                            Err(o) => (o, None),
                            Ok(to) => {
                                cancel.store(true, Ordering::Relaxed);
                                match run.await {
                                    Outcome::Broken(_) => (Outcome::Broken(format!("next hop moved to {to}")), None),
                                    other => (other, None),
                                }
                            }
                        }
                    }
                    Side::Terminus { resumes } => {
                        let next = tokio::select! {
                            o = &mut run => Err(o),
                            a = resumes.take() => Ok(a),
                        };
                        match next {
                            Err(o) => (o, None),
                            Ok(a) => {
                                // The origin moved the flow while the old stream looked alive
                                // (a silent path): drop the old one, carry on on the new one.
                                cancel.store(true, Ordering::Relaxed);
                                (run.await, Some(a))
                            }
                        }
                    }
                }
            };
            let (why, turned_bulk) = match outcome {
                Outcome::Broken(why) => (why, false),
                Outcome::TurnedBulk => (Outcome::TurnedBulk.to_string(), true),
                other => return other,
            };
            if let Some(a) = resumed {
                // Debug, not info: at the terminus a move between lanes looks the same, and the origin
                // logs real path changes at info.
                debug!("flow resumed on a new stream (the old one was still open)");
                flow.resumed();
                attach = *a;
                continue;
            }
            attach = match side {
                Side::Origin {
                    token,
                    header,
                    lane,
                    bulk,
                } => {
                    *bulk |= turned_bulk;
                    debug!(%why, "flow's stream broke; reopening it");
                    let from = via.map(|c| c.remote_address().to_string()).unwrap_or_default();
                    // Boxed: rarely run, and inline it would size every flow's future.
                    match Box::pin(self.reopen(end, header, lane_choice(*lane, *bulk), *token)).await {
                        Ok(a) if turned_bulk => {
                            debug!("flow moved to a bulk lane");
                            a
                        }
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
                        a = resumes.take() => {
                            debug!(%why, "flow resumed on a new stream");
                            flow.resumed();
                            *a
                        }
                        _ = tokio::time::sleep(self.opts.resume_window) => {
                            return Outcome::Gone(format!("not resumed within {:?}", self.opts.resume_window))
                        }
                    }
                }
            };
        }
    }

    /// Where the origin's flow for `header` goes from here now, if over a connection.
    fn current_conn(&self, header: &FlowHeader, lane: LaneChoice) -> Option<quinn::Connection> {
        let view = self.mesh.view();
        let target = view
            .vips
            .get(&header.vip)
            .filter(|t| t.ready && t.exports(header.port, Protocol::Tcp))?;
        match self.hop(&header.vip, target, lane) {
            Hop::Conn(c) => Some(c),
            Hop::Local | Hop::Unreachable => None,
        }
    }

    /// Returns (the new next hop's address) once routing sends the flow over a connection
    /// other than `current`; never while there is no other way (the flow waits on its own).
    /// Lanes coming or going count too: a bulk flow that had to reopen on a link's first
    /// connection (no other lane was up) moves to a bulk lane once one is.
    async fn next_hop_moves(&self, header: &FlowHeader, lane: LaneChoice, current: Option<usize>) -> String {
        let mut routes = self.mesh.subscribe_routes();
        loop {
            if routes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            if let Some(c) = self.current_conn(header, lane)
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
        end: &End<'_>,
        header: &FlowHeader,
        lane: LaneChoice,
        token: Token,
    ) -> Result<Attach, Outcome> {
        let deadline = Instant::now() + self.opts.resume_window;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(Outcome::Gone(format!(
                    "no path to resume on within {:?}",
                    self.opts.resume_window
                )));
            }
            if let Some(conn) = self.current_conn(header, lane) {
                let ext = ResumeExt {
                    token,
                    resuming: true,
                    waits: true,
                    received: end.received,
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
                    // The terminus no longer holds the flow, and nothing of it was owed but the
                    // ack of our FIN: it ended the flow once our FIN reached it, and its final
                    // ack (super::final_ack) was lost with the old stream. Whatever else ended
                    // it, both our client's directions are complete: close, do not reset.
                    Ok(Err(OpenError::Refused(code))) if code == codes::GONE.into() && end.owes_nothing() => {
                        debug!("the terminus ended the flow before its final ack reached us");
                        return Err(Outcome::Done);
                    }
                    Ok(Err(e)) => return Err(Outcome::Gone(e.to_string())),
                    Err(_) => debug!("no answer to reopening the flow; retrying"),
                }
            }
            tokio::time::sleep(RETRY).await;
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

/// One stream of the flow: what [`poll_attempt`] keeps between polls.
struct Attempt {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// This end's next offset to frame (data bytes, then +1 for the FIN).
    pos: u64,
    /// At the terminus, the answer still to send: `Some(now)` (see [`write_frames`]).
    greet: Option<bool>,
    /// The origin has not yet read the terminus's answer on this stream (it skips it).
    skip_answer: bool,
    dec: Decoder,
    /// Frames built and not yet all taken by the stream, from `sent` on.
    frames: Vec<Bytes>,
    /// The replay buffer's chunks to frame next (kept empty between calls of
    /// [`write_frames`], which would otherwise allocate it on every call that sends data).
    batch: Vec<Bytes>,
    sent: usize,
    /// Finish the stream once `frames` are taken: this end has nothing more to say.
    finish: bool,
    /// The stream is finished (this end's half).
    finished: bool,
    /// The peer's half ended, with everything of this end (data and FIN) acknowledged by it.
    read_end: bool,
    headers: HeaderPool,
    /// Interactive flows go before bulk ones on the link ([`super::priority`]).
    pace: SmallFirst,
    /// When an ack that is not yet due must go ([`ACK_DELAY`]); armed while one is pending.
    ack_timer: Option<Pin<Box<Sleep>>>,
    /// The ack timer fired: the pending ack is due.
    ack_due: bool,
    /// This stream has not yet carried an ack of what this end delivered before it: an ack
    /// sent on the previous stream may have been lost with it, and the peer may be waiting
    /// for nothing else (a full replay buffer, or its FIN), so one goes first thing.
    ack_again: bool,
    /// Once this end has read plus received this many bytes, the attempt ends with
    /// [`Outcome::TurnedBulk`] so that the origin moves the flow to a bulk lane.
    move_after: Option<u64>,
    /// The flow is done but for this ack of the peer's FIN, which goes with the stream to
    /// [`FinalAcks`] (written with others on its next tick).
    final_ack: Option<Bytes>,
}

/// Runs one stream of the flow: sends from `attach.peer_received` on, delivers what arrives,
/// until done, broken, or `cancel` (then it returns at its next poll). Resets the stream unless
/// done: with [`codes::GONE`] when the flow is over, else [`codes::RESET`] (the peer waits
/// for a resume).
async fn attempt(
    end: &mut End<'_>,
    attach: Attach,
    greet: bool,
    cancel: &AtomicBool,
    move_after: Option<u64>,
    finals: &FinalAcks,
) -> Outcome {
    let Attach {
        send,
        recv,
        peer_received,
        answered,
        answer_now,
        ..
    } = attach;
    let pace = SmallFirst::new(std::time::Instant::now());
    let _ = send.set_priority(pace.priority());
    let mut a = Attempt {
        send,
        recv,
        pos: peer_received,
        greet: greet.then_some(answer_now),
        skip_answer: !answered,
        dec: Decoder::resuming(end.peer_fin),
        frames: Vec::new(),
        batch: Vec::new(),
        sent: 0,
        finish: false,
        finished: false,
        read_end: false,
        headers: HeaderPool::default(),
        pace,
        ack_timer: None,
        ack_due: false,
        ack_again: end.delivered > 0,
        move_after,
        final_ack: None,
    };
    // The peer has queued everything before `peer_received` (and will write it), but only
    // acknowledges it once written: keep it until then, resend from there.
    let outcome = match end.out.chunks_from(peer_received, &mut Vec::new()) {
        Err(e) => Outcome::Fatal(e.to_string()),
        Ok(()) => std::future::poll_fn(|cx| poll_attempt(end, &mut a, cancel, cx)).await,
    };
    if let (Outcome::Done, Some(frame)) = (&outcome, a.final_ack.take()) {
        finals.put(a.send, frame);
        return outcome;
    }
    if !matches!(outcome, Outcome::Done) {
        let code = quinn::VarInt::from_u32(if outcome.rank() >= 2 { codes::GONE } else { codes::RESET });
        let _ = a.send.reset(code);
        let _ = a.recv.stop(code);
    }
    outcome
}

/// One poll of an attempt: reads the stream, writes the socket, reads the socket, writes the
/// stream, in turn, until none of them makes progress or [`MAX_PASSES`] (then it yields).
/// When none makes progress, each that waits on something outside (the stream's halves, the
/// socket's readiness, the ack timer) has registered the task's waker; the two that wait on
/// each other (a reader paused on a long queue, a pump on a full replay buffer) register
/// nothing, and need not: what unblocks them (the sink writing, an ack read, the socket
/// ending) happens in this function and counts as progress, so another pass follows.
fn poll_attempt(end: &mut End<'_>, a: &mut Attempt, cancel: &AtomicBool, cx: &mut Context<'_>) -> Poll<Outcome> {
    // The stream's halves that answered `Pending` in an earlier pass of this poll: they hold
    // the waker already, and asking again costs a lock on the connection for nothing.
    let (mut reader_waits, mut writer_waits) = (false, false);
    // Chunks read from the stream at once (fewer than a plain flow's reader takes: the sink
    // writes the whole queue, up to CHUNKS at a time). Local: `take` empties them within the
    // pass, so an idle flow need not hold the array between polls.
    let mut chunks: [Bytes; READ_CHUNKS] = std::array::from_fn(|_| Bytes::new());
    for _ in 0..MAX_PASSES {
        if cancel.load(Ordering::Relaxed) {
            return Poll::Ready(Outcome::Broken("superseded".into()));
        }
        // Only once the far end holds the flow (it acked or sent something): a resume that
        // overtook the flow's first stream, on another connection, would find no flow there.
        // And never once this end is finishing its stream (both directions ended here): its
        // far end may be done with the flow already, and a resume would find nothing. A
        // half-closed flow still moves.
        if a.move_after.is_some_and(|m| end.read + end.received >= m)
            && (end.out.acked() > 0 || end.received > 0)
            && !a.finish
            && !a.finished
        {
            return Poll::Ready(Outcome::TurnedBulk);
        }
        let mut progress = false;
        // The reader: the peer's frames, never waiting for the socket while this end needs
        // the peer's acks.
        // Up to READ_ROUNDS reads per pass, so the sink writes as many chunks at once as a
        // plain flow's reader would (one `writev`), from a smaller array.
        for _ in 0..READ_ROUNDS {
            if a.read_end || reader_waits || end.reader_paused() {
                break;
            }
            match a.recv.poll_read_chunks(cx, &mut chunks) {
                Poll::Ready(Ok(Some(n))) => {
                    progress = true;
                    if let Err(o) = end.take(&mut a.dec, &mut chunks[..n], &mut a.skip_answer) {
                        return Poll::Ready(o);
                    }
                }
                Poll::Ready(Ok(None)) => {
                    if !(end.out.done() && end.peer_fin) {
                        return Poll::Ready(Outcome::Broken("stream finished before the flow ended".into()));
                    }
                    progress = true;
                    a.read_end = true;
                }
                Poll::Ready(Err(quinn::ReadError::Reset(code))) if is_final(code) => {
                    return Poll::Ready(Outcome::Refused(code));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Outcome::Broken(e.to_string())),
                Poll::Pending => reader_waits = true,
            }
        }
        // The sink and the pump.
        match end.sink(cx).and_then(|w| Ok(end.pump(cx)? | w)) {
            Ok(p) => progress |= p,
            Err(e) => return Poll::Ready(Outcome::Fatal(format!("tcp: {e}"))),
        }
        // The writer.
        if !a.finished {
            if a.sent == a.frames.len() {
                a.frames.clear();
                a.sent = 0;
                // Everything is delivered both ways and the peer's stream has ended: the final
                // ack goes with others on the next tick (super::final_ack), and the flow is done.
                if a.read_end && end.fin_written() && end.out.done() && end.delivered > end.ack_sent && !a.ack_again {
                    a.final_ack = Some(a.headers.ack(end.delivered));
                    end.ack_sent = end.delivered;
                    a.finished = true;
                    return Poll::Ready(Outcome::Done);
                }
                if let Err(e) = write_frames(end, a) {
                    return Poll::Ready(Outcome::Fatal(e.to_string()));
                }
            }
            if a.sent < a.frames.len() && !writer_waits {
                match a.send.poll_write_chunks(cx, &mut a.frames[a.sent..]) {
                    Poll::Ready(Ok(w)) => {
                        progress = true;
                        a.sent += w.chunks;
                    }
                    Poll::Ready(Err(quinn::WriteError::Stopped(code))) if is_final(code) => {
                        return Poll::Ready(Outcome::Refused(code));
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Outcome::Broken(e.to_string())),
                    Poll::Pending => writer_waits = true,
                }
            }
            if a.sent == a.frames.len() && a.finish {
                let _ = a.send.finish();
                a.finished = true;
                progress = true;
            }
            if let Some(at) = end.ack_pending_since.map(|t| t + ACK_DELAY)
                && end.delivered > end.ack_sent
                && !a.ack_due
            {
                let timer = a
                    .ack_timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                if timer.deadline() != at {
                    timer.as_mut().reset(at);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    // Dropped once fired: an idle flow need not keep it.
                    a.ack_timer = None;
                    a.ack_due = true;
                    progress = true;
                }
            }
        }
        if a.finished && a.read_end {
            return Poll::Ready(Outcome::Done);
        }
        if !progress {
            return Poll::Pending;
        }
    }
    cx.waker().wake_by_ref();
    Poll::Pending
}

/// Builds the writer's next frames into `a.frames`: data from `a.pos` on, the FIN, an ack when
/// one is due, and at the terminus the answer (what it has received: where the origin resends
/// from) first, at once when the origin waits for it, else with the first frame sent anyway.
/// Sets `a.finish` once this end has nothing more to say: its FIN is sent and the peer's FIN
/// is written and acknowledged (the reader still waits for the peer's last acks).
///
/// Errors: the peer acknowledged bytes this end has read but not yet sent it (a broken or
/// hostile peer), so `a.pos` is before what is held.
fn write_frames(end: &mut End<'_>, a: &mut Attempt) -> Result<(), FrameError> {
    end.out.chunks_from(a.pos, &mut a.batch)?;
    let data_end = end.out.end();
    let new_pos = a.pos.max(data_end);
    let fin_now = end.out.finished() && new_pos == data_end;
    for mut b in a.batch.drain(..) {
        while !b.is_empty() {
            let part = b.split_to(b.len().min(MAX_FRAME as usize));
            a.frames.push(a.headers.data(part.len() as u32));
            a.frames.push(part);
        }
    }
    if fin_now {
        a.frames.push(resume::fin_frame());
    }
    a.pos = new_pos + u64::from(fin_now);
    let fin_written = end.fin_written();
    // Everything of ours, FIN included, is on its way (or acknowledged).
    let all_sent = end.out.finished() && a.pos > data_end;
    // An ack rides along with anything sent anyway (no packet of its own for a request and
    // its answer, nor for the peer's FIN while ours is still to come), else goes on its own
    // every ACK_EVERY or ACK_DELAY; the ack of the peer's FIN goes at once when this end has
    // nothing more to send (the peer waits for it to finish).
    let due = a.ack_again
        || (end.delivered > end.ack_sent
            && ((fin_written && all_sent)
                || !a.frames.is_empty()
                || end.delivered - end.ack_sent >= ACK_EVERY
                || a.ack_due));
    if due {
        a.frames.push(a.headers.ack(end.delivered));
        end.ack_sent = end.delivered;
        end.ack_pending_since = None;
        a.ack_due = false;
        a.ack_again = false;
    }
    if let Some(now) = a.greet
        && (now || !a.frames.is_empty())
    {
        a.frames.insert(0, a.headers.ack(end.received));
        a.greet = None;
    }
    if !a.frames.is_empty() {
        let bytes = a.frames.iter().map(Bytes::len).sum();
        if let Some(p) = a.pace.on_send(bytes, std::time::Instant::now()) {
            let _ = a.send.set_priority(p);
        }
    }
    a.finish = all_sent && fin_written && end.ack_sent == end.delivered;
    Ok(())
}
