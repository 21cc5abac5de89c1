//! A WAN emulator: a UDP relay that delays and drops datagrams.
//!
//! This kernel has no `netem` qdisc, so the harness puts this relay on the link path instead:
//! it listens on an address of one site (the hub advertises it in its tokens) and forwards
//! every datagram to the hub's agent, and every answer back, each after `delay` and with a
//! `loss` probability of being dropped (per direction, a deterministic PRNG so runs repeat).
//! Each client address gets its own upstream socket, so the agent sees distinct peers.
//! Threads run inside the site's network namespace; dropping the relay stops them.

use std::collections::{BinaryHeap, HashMap};
use std::fs::File;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One datagram waiting for its delay to pass.
struct Pending {
    due: Instant,
    seq: u64,
    socket: Arc<UdpSocket>,
    to: Option<SocketAddr>,
    data: Vec<u8>,
}

impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // A max-heap; the earliest due first.
        (o.due, o.seq).cmp(&(self.due, self.seq))
    }
}

pub struct Relay {
    stop: Arc<AtomicBool>,
    /// Datagrams relayed and dropped, for the test to report.
    pub relayed: Arc<AtomicU64>,
    pub dropped: Arc<AtomicU64>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Spawns a thread that has entered network namespace `ns`.
fn spawn_in(ns: &str, f: impl FnOnce() + Send + 'static) {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns(2) on an fd we own; it moves only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}");
        f()
    });
}

impl Relay {
    /// Relays `listen` → `upstream` inside namespace `ns`.
    pub fn start(ns: &str, listen: SocketAddr, upstream: SocketAddr, delay: Duration, loss: f64) -> Relay {
        let stop = Arc::new(AtomicBool::new(false));
        let relayed = Arc::new(AtomicU64::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        let (tx, rx): (Sender<Pending>, Receiver<Pending>) = channel();
        let (ready_tx, ready_rx) = channel();

        // The sender: holds datagrams until due.
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            let mut heap = BinaryHeap::new();
            while !stop2.load(Ordering::SeqCst) {
                let wait = heap
                    .peek()
                    .map(|p: &Pending| p.due.saturating_duration_since(Instant::now()))
                    .unwrap_or(Duration::from_millis(50))
                    .min(Duration::from_millis(50));
                if let Ok(p) = rx.recv_timeout(wait) {
                    heap.push(p);
                }
                while heap.peek().is_some_and(|p| p.due <= Instant::now()) {
                    let p = heap.pop().expect("peeked");
                    let _ = match p.to {
                        Some(to) => p.socket.send_to(&p.data, to),
                        None => p.socket.send(&p.data),
                    };
                }
            }
        });

        let (stop3, relayed2, dropped2) = (stop.clone(), relayed.clone(), dropped.clone());
        let ns_owned = ns.to_string();
        spawn_in(ns, move || {
            let front = Arc::new(UdpSocket::bind(listen).expect("relay bind"));
            front
                .set_read_timeout(Some(Duration::from_millis(100)))
                .expect("timeout");
            let _ = ready_tx.send(());
            let seq = Arc::new(AtomicU64::new(0));
            let rng = Arc::new(Mutex::new(0x2545_f491_4f6c_dd1d_u64));
            let lose = move |rng: &Mutex<u64>| {
                let mut s = rng.lock().unwrap_or_else(|p| p.into_inner());
                *s ^= *s << 13;
                *s ^= *s >> 7;
                *s ^= *s << 17;
                (*s % 1_000_000) as f64 / 1_000_000.0 < loss
            };
            let mut backs: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut buf = vec![0u8; 65_536];
            while !stop3.load(Ordering::SeqCst) {
                let Ok((n, client)) = front.recv_from(&mut buf) else {
                    continue;
                };
                let back = backs.entry(client).or_insert_with(|| {
                    let s = Arc::new(UdpSocket::bind("0.0.0.0:0").expect("bind back"));
                    s.connect(upstream).expect("connect upstream");
                    s.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
                    // Answers from the agent go back to this client, delayed too.
                    let (s2, front2, tx2, stop4) = (s.clone(), front.clone(), tx.clone(), stop3.clone());
                    let (rng2, seq2, relayed3, dropped3) =
                        (rng.clone(), seq.clone(), relayed2.clone(), dropped2.clone());
                    let ns2 = ns_owned.clone();
                    spawn_in(&ns2, move || {
                        let mut buf = vec![0u8; 65_536];
                        while !stop4.load(Ordering::SeqCst) {
                            let Ok(n) = s2.recv(&mut buf) else { continue };
                            if lose(&rng2) {
                                dropped3.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            relayed3.fetch_add(1, Ordering::Relaxed);
                            let _ = tx2.send(Pending {
                                due: Instant::now() + delay,
                                seq: seq2.fetch_add(1, Ordering::Relaxed),
                                socket: front2.clone(),
                                to: Some(client),
                                data: buf[..n].to_vec(),
                            });
                        }
                    });
                    s
                });
                if lose(&rng) {
                    dropped2.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                relayed2.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send(Pending {
                    due: Instant::now() + delay,
                    seq: seq.fetch_add(1, Ordering::Relaxed),
                    socket: back.clone(),
                    to: None,
                    data: buf[..n].to_vec(),
                });
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("relay did not start");
        Relay { stop, relayed, dropped }
    }
}
