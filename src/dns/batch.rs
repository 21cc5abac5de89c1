//! Datagrams in batches: on Linux one `recvmmsg(2)` receives every query that is waiting (up
//! to [`BATCH`]) and one `sendmmsg(2)` sends their answers, instead of two system calls per
//! query; elsewhere, one `recv_from` and one `send_to` each.
//!
//! `recvmmsg` is called with `MSG_WAITFORONE`: it blocks (up to the socket's read timeout)
//! only until the first datagram arrives, then takes what else is already queued, so a
//! lone query is answered as fast as with `recv_from`.
//!
//! **Wildcard sockets** (`0.0.0.0` or `::`) answer from the address each query was sent to: a
//! reply from another address of the host (the kernel's choice for the route back) is dropped
//! by the client as not from the server it asked. They receive one datagram per call with
//! `IP_PKTINFO`/`IPV6_PKTINFO` (the query's destination address) and send each reply with that
//! address as its source (RFC 1122 §4.1.3.5; what BIND and unbound do).

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;

use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags, SockaddrStorage, sockopt};

/// Datagrams taken per system call.
pub const BATCH: usize = 32;
/// The largest query accepted over UDP: queries are a question and an OPT record, far
/// smaller. Longer datagrams are dropped.
pub const MAX_QUERY: usize = 4096;

/// Receive buffers for one thread.
pub struct Batch {
    bufs: Vec<[u8; MAX_QUERY]>,
    /// Per received datagram: its length, sender and, on a wildcard socket, the address it
    /// was sent to (None: unusable, skip it).
    received: Vec<Option<(usize, SocketAddr, Option<IpAddr>)>>,
    /// Whether the socket is a wildcard one with packet info enabled ([`enable_pktinfo`]):
    /// then datagrams are received one at a time with their destination address.
    pktinfo: bool,
    #[cfg(target_os = "linux")]
    addrs: Vec<libc::sockaddr_storage>,
}

impl Batch {
    /// Buffers for a socket; `pktinfo` for a wildcard socket with [`enable_pktinfo`] done.
    pub fn new(pktinfo: bool) -> Batch {
        Batch {
            bufs: vec![[0u8; MAX_QUERY]; BATCH],
            received: Vec::with_capacity(BATCH),
            pktinfo,
            // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid value.
            #[cfg(target_os = "linux")]
            addrs: vec![unsafe { std::mem::zeroed() }; BATCH],
        }
    }

    /// The `i`-th datagram of the last [`Batch::recv`], if it is usable: its bytes, its
    /// sender and (wildcard sockets) the address it was sent to.
    pub fn get(&self, i: usize) -> Option<(&[u8], SocketAddr, Option<IpAddr>)> {
        let (len, from, local) = (*self.received.get(i)?)?;
        Some((self.bufs.get(i)?.get(..len)?, from, local))
    }

    /// One datagram with its destination address (wildcard sockets).
    fn recv_pktinfo(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        self.received.clear();
        let got = recv_one(socket, &mut self.bufs[0])?;
        self.received.push(got);
        Ok(1)
    }

    /// Waits for at least one datagram (up to the socket's read timeout) and takes what else
    /// is queued; returns how many were taken.
    #[cfg(target_os = "linux")]
    pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        if self.pktinfo {
            return self.recv_pktinfo(socket);
        }
        let mut iovs: Vec<libc::iovec> = self
            .bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: mmsghdr is plain old data; all zeroes is a valid (empty) value.
        let mut hdrs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
        for ((h, iov), addr) in hdrs.iter_mut().zip(iovs.iter_mut()).zip(self.addrs.iter_mut()) {
            h.msg_hdr.msg_name = (addr as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at one live iovec over a live MAX_QUERY-byte buffer and
        // at a live sockaddr_storage with its true size; all outlive the call; the kernel
        // writes at most BATCH headers.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        self.received.clear();
        for (h, addr) in hdrs.iter().zip(&self.addrs).take(n) {
            let whole = h.msg_hdr.msg_flags & libc::MSG_TRUNC == 0;
            let from = socket_addr(addr);
            self.received
                .push(from.filter(|_| whole).map(|f| (h.msg_len as usize, f, None)));
        }
        Ok(n)
    }

    #[cfg(not(target_os = "linux"))]
    pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        if self.pktinfo {
            return self.recv_pktinfo(socket);
        }
        self.received.clear();
        let (len, from) = socket.recv_from(&mut self.bufs[0])?;
        self.received.push(Some((len, from, None)));
        Ok(1)
    }
}

/// Asks the kernel for each datagram's destination address (`IP_PKTINFO`, or
/// `IPV6_RECVPKTINFO` on an IPv6 socket): for wildcard sockets, see the module docs.
pub fn enable_pktinfo(socket: &UdpSocket, v6: bool) -> io::Result<()> {
    if v6 {
        socket::setsockopt(socket, sockopt::Ipv6RecvPacketInfo, &true)?;
    } else {
        socket::setsockopt(socket, sockopt::Ipv4PacketInfo, &true)?;
    }
    Ok(())
}

/// Receives one datagram into `buf`: its length, sender and destination address (None:
/// truncated or from an unknown family, skip it).
fn recv_one(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<Option<(usize, SocketAddr, Option<IpAddr>)>> {
    let mut iov = [io::IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!(libc::in6_pktinfo);
    let msg = socket::recvmsg::<SockaddrStorage>(
        std::os::fd::AsRawFd::as_raw_fd(&socket.as_fd()),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )?;
    if msg.flags.contains(MsgFlags::MSG_TRUNC) {
        return Ok(None);
    }
    let mut local = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            match c {
                ControlMessageOwned::Ipv4PacketInfo(info) => {
                    local = Some(IpAddr::V4(std::net::Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr))));
                }
                ControlMessageOwned::Ipv6PacketInfo(info) => {
                    local = Some(IpAddr::V6(std::net::Ipv6Addr::from(info.ipi6_addr.s6_addr)));
                }
                _ => {}
            }
        }
    }
    let from = msg.address.and_then(|a| {
        a.as_sockaddr_in()
            .map(|v4| SocketAddr::from((v4.ip(), v4.port())))
            .or_else(|| a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into())))
    });
    Ok(from.map(|f| (msg.bytes, f, local)))
}

/// Sends `bytes` to `to` from `local` (the address the query was sent to), or from whatever
/// address the kernel picks when `local` is None.
pub fn send_from(socket: &UdpSocket, bytes: &[u8], to: SocketAddr, local: Option<IpAddr>) -> io::Result<()> {
    let Some(local) = local else {
        return socket.send_to(bytes, to).map(|_| ());
    };
    let iov = [io::IoSlice::new(bytes)];
    let fd = std::os::fd::AsRawFd::as_raw_fd(&socket.as_fd());
    let dest = SockaddrStorage::from(to);
    match local {
        IpAddr::V4(ip) => {
            let info = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from(ip).to_be(),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            socket::sendmsg(
                fd,
                &iov,
                &[ControlMessage::Ipv4PacketInfo(&info)],
                MsgFlags::empty(),
                Some(&dest),
            )?;
        }
        IpAddr::V6(ip) => {
            let info = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr { s6_addr: ip.octets() },
                ipi6_ifindex: 0,
            };
            socket::sendmsg(
                fd,
                &iov,
                &[ControlMessage::Ipv6PacketInfo(&info)],
                MsgFlags::empty(),
                Some(&dest),
            )?;
        }
    }
    Ok(())
}

/// Sends each answer to its client; a failure for one (logged by the caller's counters) does
/// not stop the others.
#[cfg(target_os = "linux")]
pub fn send(socket: &UdpSocket, answers: &[(Vec<u8>, SocketAddr, Option<IpAddr>)]) {
    use std::os::fd::AsRawFd;
    if answers.is_empty() {
        return;
    }
    if answers.iter().any(|(_, _, local)| local.is_some()) {
        // From a wildcard socket: each reply from the address its query was sent to.
        for (bytes, to, local) in answers {
            if let Err(e) = send_from(socket, bytes, *to, *local) {
                tracing::debug!(error = %e, %to, "sending an answer failed");
            }
        }
        return;
    }
    let mut addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)> =
        answers.iter().map(|(_, a, _)| raw_addr(a)).collect();
    let mut iovs: Vec<libc::iovec> = answers
        .iter()
        .map(|(bytes, _, _)| libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        })
        .collect();
    // SAFETY: mmsghdr is plain old data; all zeroes is a valid (empty) value.
    let mut hdrs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; answers.len()];
    for ((h, iov), (addr, len)) in hdrs.iter_mut().zip(iovs.iter_mut()).zip(addrs.iter_mut()) {
        h.msg_hdr.msg_name = (addr as *mut libc::sockaddr_storage).cast();
        h.msg_hdr.msg_namelen = *len;
        h.msg_hdr.msg_iov = iov;
        h.msg_hdr.msg_iovlen = 1;
    }
    let mut sent = 0;
    while sent < hdrs.len() {
        // SAFETY: hdrs[sent..] point at live iovecs over the answers' bytes (only read by
        // the kernel) and at live socket addresses with their true lengths.
        let n = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                hdrs[sent..].as_mut_ptr(),
                (hdrs.len() - sent) as libc::c_uint,
                0,
            )
        };
        if n > 0 {
            sent += n as usize;
        } else if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            // This datagram cannot be sent (e.g. an unreachable address): skip it.
            tracing::debug!(error = %io::Error::last_os_error(), "sending an answer failed");
            sent += 1;
        }
    }
}

#[cfg(not(target_os = "linux"))]
pub fn send(socket: &UdpSocket, answers: &[(Vec<u8>, SocketAddr, Option<IpAddr>)]) {
    for (bytes, to, local) in answers {
        if let Err(e) = send_from(socket, bytes, *to, *local) {
            tracing::debug!(error = %e, %to, "sending an answer failed");
        }
    }
}

/// A kernel socket address as a `SocketAddr` (None for other families).
#[cfg(target_os = "linux")]
fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it is large
            // and aligned enough for.
            let sin = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                u32::from_be(sin6.sin6_flowinfo),
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// A `SocketAddr` as a kernel socket address and its length.
#[cfg(target_os = "linux")]
fn raw_addr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in.
            let sin = unsafe { &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_flowinfo = a.flowinfo().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_scope_id = a.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn batches_round_trip_v4_and_v6() {
        for local in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(server) = UdpSocket::bind(local) else {
                continue; // no IPv6 here
            };
            server.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let clients: Vec<UdpSocket> = (0..5).map(|_| UdpSocket::bind(local).unwrap()).collect();
            for (i, c) in clients.iter().enumerate() {
                c.send_to(&vec![i as u8; 10 + i], server.local_addr().unwrap()).unwrap();
            }
            // An oversized datagram is taken but reported unusable.
            clients[0]
                .send_to(&vec![9u8; MAX_QUERY + 1], server.local_addr().unwrap())
                .unwrap();
            let mut batch = Batch::new(false);
            let mut got = Vec::new();
            let mut skipped = 0;
            while got.len() + skipped < 6 {
                let n = batch.recv(&server).unwrap();
                for i in 0..n {
                    match batch.get(i) {
                        Some((bytes, from, _)) => got.push((bytes.to_vec(), from)),
                        None => skipped += 1,
                    }
                }
            }
            assert_eq!(skipped, 1);
            let answers: Vec<(Vec<u8>, SocketAddr, Option<IpAddr>)> = got
                .iter()
                .map(|(b, f)| (b.iter().map(|x| x + 1).collect(), *f, None))
                .collect();
            send(&server, &answers);
            for (i, c) in clients.iter().enumerate() {
                c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut buf = [0u8; 64];
                let (n, from) = c.recv_from(&mut buf).unwrap();
                assert_eq!(from, server.local_addr().unwrap());
                assert_eq!(&buf[..n], &vec![i as u8 + 1; 10 + i][..]);
            }
        }
    }

    #[test]
    fn a_wildcard_socket_replies_from_the_address_queried() {
        let server = UdpSocket::bind("0.0.0.0:0").unwrap();
        enable_pktinfo(&server, false).unwrap();
        server.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let port = server.local_addr().unwrap().port();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        // 127.0.0.2 is an address of this host too, but not the one the kernel would pick
        // to answer 127.0.0.1 from.
        for asked in ["127.0.0.2", "127.0.0.1"] {
            let to: SocketAddr = format!("{asked}:{port}").parse().unwrap();
            client.send_to(b"query", to).unwrap();
            let mut batch = Batch::new(true);
            assert_eq!(batch.recv(&server).unwrap(), 1);
            let (bytes, from, local) = batch.get(0).unwrap();
            assert_eq!(bytes, b"query");
            assert_eq!(local, Some(to.ip()));
            let answers = vec![(b"answer".to_vec(), from, local)];
            send(&server, &answers);
            let mut buf = [0u8; 16];
            let (n, replied_from) = client.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"answer");
            assert_eq!(replied_from, to, "the reply must come from the address queried");
        }
    }
}
