//! Resumable TCP flows, the pure part: the framing two end agents speak on a flow's QUIC
//! stream, and the replay buffer that lets a flow move to another stream without losing or
//! repeating a byte. No sockets, no clock: `super::session` drives it.
//!
//! Only the origin and the terminus parse this; relays splice the bytes as they are. Each
//! direction of a stream is a sequence of frames:
//!
//! ```text
//! data:  u8 0 | u32 len | len bytes     (len <= MAX_FRAME)
//! ack:   u8 1 | u64 delivered           (peer bytes written to the local socket, +1 once its FIN is)
//! fin:   u8 2                           (the local TCP connection ended its direction)
//! ```
//!
//! Offsets count payload bytes from the start of the flow in each direction, with the FIN
//! counting as one more, as in TCP. A sender keeps what it has read from its TCP socket until
//! the peer acknowledges it ([`Replay`]); when the flow moves to a new stream, each end says
//! how much it has received and the other resends from there. The replay buffer is bounded
//! ([`MAX_REPLAY`]): at the bound the sender stops reading its socket until an ack frees room.

use std::collections::VecDeque;

use bytes::{Buf, Bytes};

/// Most bytes one direction of a flow holds unacknowledged (16 MiB, the largest stream
/// receive window, [`crate::quic::STREAM_WINDOW_MAX`]): the replay buffer never throttles a
/// flow below what QUIC flow control already allows.
pub const MAX_REPLAY: u64 = crate::quic::STREAM_WINDOW_MAX as u64;
/// A receiver acknowledges at least every this many bytes (a sixteenth of the bound: with a
/// quarter, a bulk flow stalled on its bound between acks, about 10% of its throughput,
/// measured in docs/BENCHMARKS.md, session 10).
pub const ACK_EVERY: u64 = MAX_REPLAY / 16;
/// Largest data frame accepted (bytes). Senders write one frame per socket read (at most
/// 256 KiB); anything above this is a broken or hostile peer.
pub const MAX_FRAME: u32 = 1024 * 1024;

const DATA: u8 = 0;
const ACK: u8 = 1;
const FIN: u8 = 2;

/// The random 128-bit secret that names a resumable flow: the only thing that lets a new
/// stream take a flow over, so it is never logged and never derived from anything guessable.
pub type Token = [u8; 16];

/// A fresh flow token from the operating system's random source.
pub fn new_token() -> Token {
    rand::random()
}

/// Errors of a peer's frames or acknowledgements: the flow cannot go on and is reset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A frame type this version does not know.
    #[error("unknown frame type {0}")]
    Kind(u8),
    /// A data frame longer than [`MAX_FRAME`].
    #[error("data frame of {0} bytes is longer than the limit")]
    TooLong(u32),
    /// Data after the peer's FIN.
    #[error("data after the end of the flow")]
    AfterFin,
    /// The peer acknowledged bytes this end never sent.
    #[error("acknowledgement of byte {ack} beyond the {sent} sent")]
    AckBeyondSent { ack: u64, sent: u64 },
    /// The peer asked to resume from bytes already dropped as acknowledged.
    #[error("resume from byte {from}, before the {acked} already acknowledged")]
    ResumeBeforeAcked { from: u64, acked: u64 },
}

/// The 5 bytes of a data frame's header.
fn data_bytes(len: u32) -> [u8; 5] {
    let mut h = [0u8; 5];
    h[0] = DATA;
    h[1..].copy_from_slice(&len.to_be_bytes());
    h
}

/// The 9 bytes of an ack frame.
fn ack_bytes(delivered: u64) -> [u8; ACK_LEN] {
    let mut h = [0u8; ACK_LEN];
    h[0] = ACK;
    h[1..].copy_from_slice(&delivered.to_be_bytes());
    h
}

/// The 5-byte header of a data frame of `len` bytes (`len` <= [`MAX_FRAME`]).
pub fn data_header(len: u32) -> Bytes {
    Bytes::copy_from_slice(&data_bytes(len))
}

/// An ack frame: `delivered` peer bytes (+1 for its FIN) are written to the local socket.
pub fn ack_frame(delivered: u64) -> Bytes {
    Bytes::copy_from_slice(&ack_bytes(delivered))
}

/// Encodes frame headers and acks into one shared block, split off per frame: a small
/// message costs no allocation of its own for its header (one block of [`HeaderPool::BLOCK`]
/// bytes serves about 25 frames). Empty, it holds nothing.
#[derive(Debug, Default)]
pub struct HeaderPool(bytes::BytesMut);

impl HeaderPool {
    /// Bytes allocated at a time.
    pub const BLOCK: usize = 256;

    fn take(&mut self, bytes: &[u8]) -> Bytes {
        if self.0.capacity() < bytes.len() {
            // Blocks are never grown in place: frames split off earlier still point into
            // the old one, which is freed once quinn has sent them.
            self.0 = bytes::BytesMut::with_capacity(Self::BLOCK);
        }
        self.0.extend_from_slice(bytes);
        self.0.split().freeze()
    }

    /// [`data_header`] from the pool.
    pub fn data(&mut self, len: u32) -> Bytes {
        self.take(&data_bytes(len))
    }

    /// [`ack_frame`] from the pool.
    pub fn ack(&mut self, delivered: u64) -> Bytes {
        self.take(&ack_bytes(delivered))
    }
}

/// A FIN frame.
pub fn fin_frame() -> Bytes {
    Bytes::from_static(&[FIN])
}

/// Length of an ack frame: the terminus's first frame on every stream, which an origin that
/// resumes reads whole before anything else.
pub const ACK_LEN: usize = 9;

/// Decodes an ack frame of exactly [`ACK_LEN`] bytes.
pub fn parse_ack(frame: &[u8; ACK_LEN]) -> Result<u64, FrameError> {
    if frame[0] != ACK {
        return Err(FrameError::Kind(frame[0]));
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&frame[1..]);
    Ok(u64::from_be_bytes(n))
}

/// One decoded frame (data as a slice of the received chunk: no copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Payload bytes, next in order (a slice of the chunk fed).
    Data(Bytes),
    /// The peer has written this many of our bytes to its socket (+1 for our FIN).
    Ack(u64),
    /// The peer's socket ended its direction: no data follows.
    Fin,
}

/// Incremental frame decoder: takes chunks however the stream split them.
#[derive(Debug, Default)]
pub struct Decoder {
    /// The frame header being collected (type byte first).
    head: [u8; 9],
    /// Bytes of `head` collected so far.
    have: usize,
    /// Payload bytes of the current data frame not yet seen.
    remaining: usize,
    /// The peer's FIN has been decoded: nothing but acks may follow.
    fin: bool,
}

impl Decoder {
    /// Decodes `chunk`, calling `out` for each event in order.
    ///
    /// Errors: an unknown frame type, an oversized data frame, data after FIN. After an
    /// error the decoder must not be fed again (the flow is reset).
    pub fn feed(&mut self, mut chunk: Bytes, out: &mut impl FnMut(Event)) -> Result<(), FrameError> {
        while !chunk.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(chunk.len());
                self.remaining -= n;
                out(Event::Data(chunk.split_to(n)));
                continue;
            }
            if self.have == 0 {
                self.head[0] = chunk[0];
                self.have = 1;
                chunk.advance(1);
            }
            let need = match self.head[0] {
                DATA => 5,
                ACK => 9,
                FIN => 1,
                k => return Err(FrameError::Kind(k)),
            };
            let take = (need - self.have).min(chunk.len());
            self.head[self.have..self.have + take].copy_from_slice(&chunk[..take]);
            self.have += take;
            chunk.advance(take);
            if self.have < need {
                continue;
            }
            self.have = 0;
            match self.head[0] {
                DATA => {
                    let len = u32::from_be_bytes([self.head[1], self.head[2], self.head[3], self.head[4]]);
                    if len > MAX_FRAME {
                        return Err(FrameError::TooLong(len));
                    }
                    if self.fin && len > 0 {
                        return Err(FrameError::AfterFin);
                    }
                    self.remaining = len as usize;
                }
                ACK => {
                    let mut n = [0u8; 8];
                    n.copy_from_slice(&self.head[1..9]);
                    out(Event::Ack(u64::from_be_bytes(n)));
                }
                _ => {
                    if self.fin {
                        return Err(FrameError::AfterFin);
                    }
                    self.fin = true;
                    out(Event::Fin);
                }
            }
        }
        Ok(())
    }

    /// A decoder for a new stream of a flow whose peer FIN was (`fin`) or was not received.
    pub fn resuming(fin: bool) -> Decoder {
        Decoder {
            fin,
            ..Decoder::default()
        }
    }
}

/// What one direction of a flow has read from its TCP socket and the peer has not yet
/// acknowledged: refcounted chunks (the same `Bytes` handed to QUIC, so no copy), bounded.
#[derive(Debug)]
pub struct Replay {
    /// Offset of the first byte held: everything before it is acknowledged.
    base: u64,
    /// The unacknowledged bytes, in order.
    chunks: VecDeque<Bytes>,
    /// Bytes in `chunks`.
    len: u64,
    /// The socket's read side ended: the FIN sits at offset `base + len`.
    fin: bool,
    /// The peer acknowledged the FIN.
    fin_acked: bool,
    /// Most bytes held before [`Replay::full`] says stop reading.
    bound: u64,
}

impl Replay {
    /// An empty buffer that holds up to `bound` bytes (normally [`MAX_REPLAY`]).
    pub fn new(bound: u64) -> Replay {
        Replay {
            base: 0,
            chunks: VecDeque::new(),
            len: 0,
            fin: false,
            fin_acked: false,
            bound,
        }
    }

    /// Adds bytes read from the socket (ignored after [`Replay::finish`]).
    pub fn push(&mut self, chunk: Bytes) {
        if self.fin || chunk.is_empty() {
            return;
        }
        self.len += chunk.len() as u64;
        self.chunks.push_back(chunk);
    }

    /// The socket's read side ended.
    pub fn finish(&mut self) {
        self.fin = true;
    }

    /// Whether the read side ended.
    pub fn finished(&self) -> bool {
        self.fin
    }

    /// Offset just past the last data byte read.
    pub fn end(&self) -> u64 {
        self.base + self.len
    }

    /// Offset just past everything sendable: [`Replay::end`], plus one for the FIN.
    pub fn limit(&self) -> u64 {
        self.end() + u64::from(self.fin)
    }

    /// Offset the peer has acknowledged up to.
    pub fn acked(&self) -> u64 {
        self.base + u64::from(self.fin_acked)
    }

    /// Bytes held, waiting for an ack.
    pub fn held(&self) -> u64 {
        self.len
    }

    /// At the bound: stop reading the socket until an ack frees room.
    pub fn full(&self) -> bool {
        self.len >= self.bound
    }

    /// Everything, FIN included, is acknowledged.
    pub fn done(&self) -> bool {
        self.fin && self.fin_acked
    }

    /// The peer has `upto` bytes (+1 for the FIN): drops what it has. An ack below what is
    /// already acknowledged is stale and ignored.
    ///
    /// Errors: `upto` beyond what this end has read ([`FrameError::AckBeyondSent`]).
    pub fn ack(&mut self, upto: u64) -> Result<(), FrameError> {
        if upto > self.limit() {
            return Err(FrameError::AckBeyondSent {
                ack: upto,
                sent: self.limit(),
            });
        }
        let data_upto = upto.min(self.end());
        let mut drop = data_upto.saturating_sub(self.base);
        while drop > 0 {
            let Some(front) = self.chunks.front_mut() else { break };
            let n = (front.len() as u64).min(drop);
            if n == front.len() as u64 {
                self.chunks.pop_front();
            } else {
                front.advance(n as usize);
            }
            drop -= n;
            self.base += n;
            self.len -= n;
        }
        if self.fin && upto == self.limit() {
            self.fin_acked = true;
        }
        Ok(())
    }

    /// Appends to `out` the held chunks from offset `from` to [`Replay::end`] (the first one
    /// sliced; clones of refcounted chunks, no copy).
    ///
    /// Errors: `from` before what is held ([`FrameError::ResumeBeforeAcked`]) or past
    /// everything read ([`FrameError::AckBeyondSent`]).
    pub fn chunks_from(&self, from: u64, out: &mut Vec<Bytes>) -> Result<(), FrameError> {
        if from < self.base {
            return Err(FrameError::ResumeBeforeAcked { from, acked: self.base });
        }
        if from > self.limit() {
            return Err(FrameError::AckBeyondSent {
                ack: from,
                sent: self.limit(),
            });
        }
        if from >= self.end() {
            return Ok(());
        }
        // Usually `from` is near the end (only new chunks to send): walk from the back.
        let mut skip_back = self.end() - from;
        let mut first = self.chunks.len();
        while skip_back > 0 && first > 0 {
            first -= 1;
            let l = self.chunks[first].len() as u64;
            if l >= skip_back {
                let start = (l - skip_back) as usize;
                out.push(self.chunks[first].slice(start..));
                first += 1;
                break;
            }
            skip_back -= l;
        }
        out.extend(self.chunks.range(first..).cloned());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_headers_are_the_plain_ones_and_survive_their_block() {
        let mut pool = HeaderPool::default();
        let mut kept = Vec::new();
        for i in 0..200u32 {
            let d = pool.data(i);
            let a = pool.ack(u64::from(i) << 33);
            assert_eq!(d, data_header(i));
            assert_eq!(a, ack_frame(u64::from(i) << 33));
            kept.push((i, d, a));
        }
        // Frames split off earlier blocks are untouched by later ones.
        for (i, d, a) in kept {
            assert_eq!((d, a), (data_header(i), ack_frame(u64::from(i) << 33)));
        }
    }

    fn encode(events: &[Event]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in events {
            match e {
                Event::Data(b) => {
                    out.extend_from_slice(&data_header(b.len() as u32));
                    out.extend_from_slice(b);
                }
                Event::Ack(n) => out.extend_from_slice(&ack_frame(*n)),
                Event::Fin => out.extend_from_slice(&fin_frame()),
            }
        }
        out
    }

    /// Feeds `wire` in the given pieces; returns the data joined, the acks and whether FIN came.
    fn decode(wire: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, Vec<u64>, bool), FrameError> {
        let mut d = Decoder::default();
        let (mut data, mut acks, mut fin) = (Vec::new(), Vec::new(), false);
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&wire.len())) {
            let piece = Bytes::copy_from_slice(&wire[start..cut]);
            start = cut;
            d.feed(piece, &mut |e| match e {
                Event::Data(b) => data.extend_from_slice(&b),
                Event::Ack(n) => acks.push(n),
                Event::Fin => fin = true,
            })?;
        }
        Ok((data, acks, fin))
    }

    #[test]
    fn frames_split_at_every_byte_boundary_decode_the_same() {
        let events = [
            Event::Data(Bytes::from_static(b"hello")),
            Event::Ack(7),
            Event::Data(Bytes::new()),
            Event::Data(Bytes::from_static(b" causeway")),
            Event::Ack(u64::MAX - 1),
            Event::Fin,
            Event::Ack(9),
        ];
        let wire = encode(&events);
        let want = (b"hello causeway".to_vec(), vec![7, u64::MAX - 1, 9], true);
        assert_eq!(decode(&wire, &[]).unwrap(), want);
        for i in 0..=wire.len() {
            assert_eq!(decode(&wire, &[i]).unwrap(), want, "cut at {i}");
            for j in i..=wire.len() {
                assert_eq!(decode(&wire, &[i, j]).unwrap(), want, "cuts at {i}, {j}");
            }
        }
        // One byte at a time.
        let all: Vec<usize> = (1..wire.len()).collect();
        assert_eq!(decode(&wire, &all).unwrap(), want);
    }

    #[test]
    fn data_is_sliced_from_the_chunk_not_copied() {
        let wire = Bytes::from(encode(&[Event::Data(Bytes::from_static(b"abcdef"))]));
        let mut d = Decoder::default();
        let mut got = Vec::new();
        d.feed(wire.clone(), &mut |e| got.push(e)).unwrap();
        let Event::Data(b) = &got[0] else { panic!("{got:?}") };
        assert_eq!(b.as_ptr(), wire[5..].as_ptr());
    }

    #[test]
    fn hostile_frames_are_errors_not_panics() {
        let mut long = vec![DATA];
        long.extend_from_slice(&(MAX_FRAME + 1).to_be_bytes());
        assert_eq!(decode(&long, &[]), Err(FrameError::TooLong(MAX_FRAME + 1)));
        assert_eq!(decode(&[9, 1, 2], &[]), Err(FrameError::Kind(9)));
        assert_eq!(decode(&[FIN, DATA, 0, 0, 0, 1, b'x'], &[]), Err(FrameError::AfterFin));
        assert_eq!(decode(&[FIN, FIN], &[]), Err(FrameError::AfterFin));
        // Truncated frames are simply incomplete.
        assert_eq!(decode(&[DATA, 0, 0], &[]).unwrap(), (vec![], vec![], false));
        // Anything at all: never a panic.
        for a in 0..=255u8 {
            for b in [0u8, 1, 2, 0x10, 0xff] {
                let _ = decode(&[a, b, a, b, 0, 0, 0, 0, 1, a], &[3]);
            }
        }
        assert_eq!(parse_ack(&[ACK, 0, 0, 0, 0, 0, 0, 1, 0]), Ok(256));
        assert_eq!(parse_ack(&[DATA, 0, 0, 0, 0, 0, 0, 1, 0]), Err(FrameError::Kind(DATA)));
    }

    fn replay_with(parts: &[&'static [u8]], bound: u64) -> Replay {
        let mut r = Replay::new(bound);
        for p in parts {
            r.push(Bytes::from_static(p));
        }
        r
    }

    fn joined(r: &Replay, from: u64) -> Result<Vec<u8>, FrameError> {
        let mut out = Vec::new();
        r.chunks_from(from, &mut out)?;
        Ok(out.concat())
    }

    #[test]
    fn acks_trim_and_resends_start_at_any_offset() {
        let mut r = replay_with(&[b"abc", b"defg", b"h"], 100);
        assert_eq!((r.end(), r.held(), r.limit()), (8, 8, 8));
        for from in 0..=8u64 {
            assert_eq!(joined(&r, from).unwrap(), &b"abcdefgh"[from as usize..], "from {from}");
        }
        r.ack(5).unwrap();
        assert_eq!((r.acked(), r.held()), (5, 3));
        assert_eq!(joined(&r, 5).unwrap(), b"fgh");
        assert_eq!(joined(&r, 7).unwrap(), b"h");
        assert_eq!(joined(&r, 4), Err(FrameError::ResumeBeforeAcked { from: 4, acked: 5 }));
        // A stale ack changes nothing; an ack beyond what was read is refused.
        r.ack(2).unwrap();
        assert_eq!(r.acked(), 5);
        assert_eq!(r.ack(9), Err(FrameError::AckBeyondSent { ack: 9, sent: 8 }));
        assert_eq!(joined(&r, 9), Err(FrameError::AckBeyondSent { ack: 9, sent: 8 }));
        // The FIN counts one: acked only by end + 1.
        r.finish();
        r.push(Bytes::from_static(b"ignored"));
        assert_eq!((r.end(), r.limit()), (8, 9));
        r.ack(8).unwrap();
        assert!(!r.done());
        assert_eq!(joined(&r, 8).unwrap(), b"");
        assert_eq!(joined(&r, 9).unwrap(), b"");
        r.ack(9).unwrap();
        assert!(r.done());
        assert_eq!((r.held(), r.acked()), (0, 9));
    }

    #[test]
    fn the_bound_says_when_to_stop_reading() {
        let mut r = replay_with(&[b"0123456789"], 10);
        assert!(r.full());
        r.ack(1).unwrap();
        assert!(!r.full());
        r.push(Bytes::from_static(b"x"));
        assert!(r.full());
        r.ack(11).unwrap();
        assert_eq!(r.held(), 0);
        assert_eq!(MAX_REPLAY, 16 * 1024 * 1024);
    }

    #[test]
    fn tokens_differ() {
        assert_ne!(new_token(), new_token());
    }
}
