//! `vips.mode: intercept`: one agent port instead of one listener per VIP and port.
//!
//! In `listen` mode every VIP port is a socket of the agent's, so a local program bound to a
//! wildcard address on the same port (ZooKeeper with `quorumListenOnAllIPs`, etcd on
//! `0.0.0.0:2380`, Hazelcast's `bind.any`) and the agent exclude each other. In `intercept`
//! mode the agent binds only `127.0.0.1:<vips.intercept_port>` and an nftables table named
//! `causeway`, owned by causeway and replaced as a whole, sends it the traffic for
//! `vips.cidr` that programs in this network namespace originate:
//!
//! - **TCP**: a `nat` rule on the `output` hook redirects new connections to the port
//!   (`redirect`, as Istio's init container does); the agent reads each connection's
//!   original destination with `SO_ORIGINAL_DST` (netfilter's conntrack).
//! - **UDP**: a `tproxy` rule on the `prerouting` hook (locally sent datagrams to a local
//!   address loop through `lo` and pass it) hands every datagram, unchanged, to the agent's
//!   socket, which sets `IP_TRANSPARENT` and reads each datagram's original destination
//!   from its `IP_ORIGDSTADDR` control message. NAT would not do for UDP: one client socket
//!   sending to many VIPs would collapse into one redirected tuple. Answers must come from the
//!   VIP and port the client sent to, which a wildcard-bound program may hold, so they are
//!   written with a raw socket (IPv4 and UDP headers built here, [`RawUdp`]).
//!
//! Privilege: installing the table needs `CAP_NET_ADMIN` once (`causeway intercept install`,
//! a Kubernetes initContainer's job; an agent running as root installs it itself). At run
//! time TCP needs none; UDP needs `CAP_NET_RAW` (in the default capability set of Docker and
//! containerd) for `IP_TRANSPARENT` and the raw socket. Without it the agent keeps one UDP
//! listener per VIP and port, as in `listen` mode, and says so: the `tproxy` rule lets
//! datagrams no transparent socket takes pass on to those listeners.
//!
//! IPv4 only: `vips.cidr` must be an IPv4 range in this mode (config validation says so).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// Name of the nftables table causeway owns (family `ip`).
pub const TABLE: &str = "causeway";

/// Errors of installing, removing or using interception.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    /// `vips.cidr` is not an IPv4 range.
    #[error("intercept mode needs an IPv4 vips.cidr, not {0}")]
    NotIpv4(IpNet),
    /// The `nft` program could not be run.
    #[error("cannot run `nft` ({0}): install nftables (Debian: apt-get install nftables) or use vips.mode: listen")]
    NoNft(std::io::Error),
    /// `nft` refused the ruleset.
    #[error("nft failed: {stderr}{}", privilege_hint(.stderr))]
    Nft {
        /// What `nft` wrote on standard error.
        stderr: String,
    },
    /// A socket could not be set up.
    #[error("{what}: {source}")]
    Socket {
        /// What was being set up.
        what: &'static str,
        source: std::io::Error,
    },
}

fn privilege_hint(stderr: &str) -> &'static str {
    if stderr.contains("Operation not permitted") || stderr.contains("Permission denied") {
        " (changing nftables needs CAP_NET_ADMIN: run it as root, or in Kubernetes in an initContainer \
         with securityContext.capabilities.add: [NET_ADMIN])"
    } else {
        ""
    }
}

/// The nftables script that (re)creates table [`TABLE`] redirecting `cidr` to `port`: TCP by
/// `redirect` on `output`, UDP by `tproxy` on `prerouting`. Loading it replaces any earlier
/// version of the table in one transaction (the `add`/`delete` pair makes it idempotent).
pub fn ruleset(cidr: Ipv4Net, port: u16) -> String {
    format!(
        "table ip {TABLE} {{}}
delete table ip {TABLE}
table ip {TABLE} {{
\tchain output {{
\t\ttype nat hook output priority -100; policy accept;
\t\tip daddr {cidr} meta l4proto tcp redirect to :{port}
\t}}
\tchain prerouting {{
\t\ttype filter hook prerouting priority mangle; policy accept;
\t\tip daddr {cidr} meta l4proto udp tproxy to 127.0.0.1:{port}
\t}}
}}
"
    )
}

/// The IPv4 range of `cidr`, or why intercept mode cannot use it.
pub fn ipv4_range(cidr: IpNet) -> Result<Ipv4Net, InterceptError> {
    match cidr {
        IpNet::V4(net) => Ok(net),
        IpNet::V6(_) => Err(InterceptError::NotIpv4(cidr)),
    }
}

/// Runs `nft -f -` with `script`.
fn nft(script: &str) -> Result<(), InterceptError> {
    use std::io::Write;
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(InterceptError::NoNft)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| InterceptError::Nft { stderr: e.to_string() })?;
    }
    let out = child.wait_with_output().map_err(InterceptError::NoNft)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(InterceptError::Nft {
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Installs (or replaces) the table for `cidr` and `port` in this network namespace.
pub fn install(cidr: IpNet, port: u16) -> Result<(), InterceptError> {
    nft(&ruleset(ipv4_range(cidr)?, port))
}

/// Removes the table; removing one that is not there succeeds.
pub fn remove() -> Result<(), InterceptError> {
    nft(&format!("table ip {TABLE} {{}}\ndelete table ip {TABLE}\n"))
}

/// Whether the table is in this network namespace (`nft list table`): `None` when that
/// cannot be told (no `nft`, or not permitted to list: listing needs CAP_NET_ADMIN too).
pub fn installed() -> Option<bool> {
    let out = std::process::Command::new("nft")
        .args(["list", "table", "ip", TABLE])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .ok()?;
    if out.status.success() {
        return Some(true);
    }
    let err = String::from_utf8_lossy(&out.stderr);
    (err.contains("No such file or directory") || err.contains("does not exist")).then_some(false)
}

/// For an agent in listen mode: removes a table left from intercept mode, which would send
/// every connection to a VIP to a port nobody listens on. `Ok(true)`: there was one and it
/// is gone; `Ok(false)`: none, or it cannot be told; `Err`: one is there and could not be
/// removed. When `nft` cannot tell, it is asked twice more half a second apart (a busy
/// machine's netlink may fail a listing once, a likely reason a test once saw the table survive
/// a start).
/// Blocks: run it off the runtime's threads.
pub fn remove_leftover() -> Result<bool, InterceptError> {
    for attempt in 0..3 {
        match installed() {
            Some(true) => return remove().map(|()| true),
            Some(false) => return Ok(false),
            None if attempt < 2 => std::thread::sleep(std::time::Duration::from_millis(500)),
            None => {}
        }
    }
    Ok(false)
}

/// The destination a redirected connection was sent to (`SO_ORIGINAL_DST`, netfilter).
pub fn original_dst(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    let fd = borrowed(stream);
    let sin =
        nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::OriginalDst).map_err(std::io::Error::from)?;
    Ok(SocketAddr::V4(sockaddr_v4(&sin)))
}

/// A borrowed descriptor of `s` for nix's socket options.
fn borrowed<S: AsRawFd>(s: &S) -> std::os::fd::BorrowedFd<'_> {
    // SAFETY: the descriptor belongs to `s`, which outlives the borrow.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(s.as_raw_fd()) }
}

fn sockaddr_v4(sin: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
        u16::from_be(sin.sin_port),
    )
}

/// The TCP listener redirected connections arrive at: `127.0.0.1:port`.
pub fn tcp_listener(port: u16) -> Result<TcpListener, InterceptError> {
    let what = "binding the intercept port (TCP, 127.0.0.1)";
    let err = |source| InterceptError::Socket { what, source };
    let socket = tokio::net::TcpSocket::new_v4().map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket
        .bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
        .map_err(err)?;
    socket.listen(1024).map_err(err)
}

/// The UDP socket intercepted datagrams arrive at: `127.0.0.1:port`, `IP_TRANSPARENT` (so
/// `tproxy` may hand it datagrams for other addresses) and `IP_RECVORIGDSTADDR`. Fails
/// without `CAP_NET_RAW` or `CAP_NET_ADMIN`.
pub fn udp_socket(port: u16) -> Result<UdpSocket, InterceptError> {
    use nix::sys::socket::{setsockopt, sockopt};
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(|source| InterceptError::Socket {
        what: "creating the intercept UDP socket",
        source,
    })?;
    let transparent = |source| InterceptError::Socket {
        what: "IP_TRANSPARENT on the intercept UDP socket (needs CAP_NET_RAW or CAP_NET_ADMIN)",
        source,
    };
    setsockopt(&s, sockopt::IpTransparent, &true).map_err(|e| transparent(e.into()))?;
    setsockopt(&s, sockopt::Ipv4OrigDstAddr, &true).map_err(|e| InterceptError::Socket {
        what: "IP_RECVORIGDSTADDR on the intercept UDP socket",
        source: e.into(),
    })?;
    let bind = |source| InterceptError::Socket {
        what: "binding the intercept port (UDP, 127.0.0.1)",
        source,
    };
    s.set_reuse_address(true).map_err(bind)?;
    s.set_nonblocking(true).map_err(bind)?;
    s.bind(&SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port).into())
        .map_err(bind)?;
    UdpSocket::from_std(s.into()).map_err(bind)
}

/// Receives one datagram on an intercept socket without blocking: its length in `buf`, its
/// sender, and the destination it was sent to (`None` if the kernel gave none, which a
/// datagram sent to the port itself does not lack either: it is then the port's address).
pub fn recv_original(socket: &UdpSocket, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr, Option<SocketAddr>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg};
    socket.try_io(tokio::io::Interest::READABLE, || {
        let mut iov = [std::io::IoSliceMut::new(buf)];
        let mut cmsg = nix::cmsg_space!(libc::sockaddr_in);
        let msg = recvmsg::<SockaddrIn>(socket.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_DONTWAIT)
            .map_err(std::io::Error::from)?;
        let from = msg
            .address
            .map(|a| SocketAddr::V4(SocketAddrV4::new(a.ip(), a.port())))
            .ok_or_else(|| std::io::Error::other("datagram without a sender"))?;
        let mut original = None;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::Ipv4OrigDstAddr(sin) = c {
                    original = Some(SocketAddr::V4(sockaddr_v4(&sin)));
                }
            }
        }
        Ok((msg.bytes, from, original))
    })
}

/// Sends UDP datagrams from any address and port: a raw IPv4 socket (`IPPROTO_RAW`, header
/// included), for answers that must come from a VIP and port a local program may hold.
/// Needs `CAP_NET_RAW`.
pub struct RawUdp {
    socket: socket2::Socket,
}

impl RawUdp {
    /// Opens the raw socket.
    pub fn new() -> Result<RawUdp, InterceptError> {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
        )
        .map_err(|source| InterceptError::Socket {
            what: "opening a raw socket for UDP answers (needs CAP_NET_RAW)",
            source,
        })?;
        socket.set_nonblocking(true).map_err(|source| InterceptError::Socket {
            what: "making the raw socket non-blocking",
            source,
        })?;
        Ok(RawUdp { socket })
    }

    /// Sends `payload` from `src` to `dst` now (one non-blocking system call); a full
    /// socket buffer drops the datagram, as UDP may.
    pub fn send(&self, src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> std::io::Result<usize> {
        let packet = udp_packet(src, dst, payload)?;
        self.socket
            .send_to(&packet, &SocketAddr::V4(SocketAddrV4::new(*dst.ip(), 0)).into())
    }
}

/// An IPv4 packet carrying one UDP datagram from `src` to `dst` (RFC 791, RFC 768). The
/// kernel fills in the IP checksum, total length and id of a raw `IPPROTO_RAW` packet; the
/// UDP checksum is 0 (none, allowed over IPv4).
pub fn udp_packet(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let udp_len = u16::try_from(8 + payload.len())
        .ok()
        .filter(|l| usize::from(*l) + 20 <= usize::from(u16::MAX))
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "datagram too large"))?;
    let mut p = Vec::with_capacity(28 + payload.len());
    p.extend_from_slice(&[0x45, 0]); // version 4, 5-word header; TOS 0
    p.extend_from_slice(&(20 + udp_len).to_be_bytes()); // total length
    p.extend_from_slice(&[0, 0, 0, 0]); // id (kernel), flags and fragment offset 0
    p.extend_from_slice(&[64, 17, 0, 0]); // TTL, protocol UDP, checksum (kernel)
    p.extend_from_slice(&src.ip().octets());
    p.extend_from_slice(&dst.ip().octets());
    p.extend_from_slice(&src.port().to_be_bytes());
    p.extend_from_slice(&dst.port().to_be_bytes());
    p.extend_from_slice(&udp_len.to_be_bytes());
    p.extend_from_slice(&[0, 0]); // no UDP checksum
    p.extend_from_slice(payload);
    Ok(p)
}

/// The address the agent probes to learn whether the TCP rule is in place: the last
/// address of `cidr`, port 1 (no block hands it out: blocks end before it or it is the
/// broadcast address of the last one, which the allocator skips).
pub fn probe_addr(cidr: Ipv4Net) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(cidr.broadcast()), 1)
}

/// Whether TCP to `cidr` is redirected to the agent's intercept listener on `port`: a
/// connection to [`probe_addr`] is accepted only when the rule sends it there (nothing
/// else listens on a VIP in this mode). The agent must be listening on `port`.
pub async fn probe(cidr: Ipv4Net) -> bool {
    let addr = probe_addr(cidr);
    match tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await {
        Ok(Ok(_)) => true,
        // The agent accepted and closed it before the connect returned: it arrived.
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_replaces_the_table_and_redirects_tcp_and_udp_of_the_range() {
        let r = ruleset("127.77.0.0/16".parse().unwrap(), 15001);
        let lines: Vec<&str> = r.lines().map(str::trim).collect();
        assert_eq!(lines[0], "table ip causeway {}");
        assert_eq!(lines[1], "delete table ip causeway");
        assert!(lines.contains(&"ip daddr 127.77.0.0/16 meta l4proto tcp redirect to :15001"));
        assert!(lines.contains(&"ip daddr 127.77.0.0/16 meta l4proto udp tproxy to 127.0.0.1:15001"));
        assert!(lines.contains(&"type nat hook output priority -100; policy accept;"));
        assert!(lines.contains(&"type filter hook prerouting priority mangle; policy accept;"));
    }

    #[test]
    fn only_ipv4_ranges_can_be_intercepted() {
        assert!(ipv4_range("127.77.0.0/16".parse().unwrap()).is_ok());
        let e = ipv4_range("fd00:77::/64".parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("IPv4"), "{e}");
    }

    #[test]
    fn udp_packet_has_the_headers_raw_ipv4_needs() {
        let src: SocketAddrV4 = "127.77.1.2:7946".parse().unwrap();
        let dst: SocketAddrV4 = "10.1.0.1:40000".parse().unwrap();
        let p = udp_packet(src, dst, b"hello").unwrap();
        assert_eq!(p.len(), 20 + 8 + 5);
        assert_eq!(p[0], 0x45);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]), 33);
        assert_eq!(p[9], 17);
        assert_eq!(&p[12..16], &[127, 77, 1, 2]);
        assert_eq!(&p[16..20], &[10, 1, 0, 1]);
        assert_eq!(u16::from_be_bytes([p[20], p[21]]), 7946);
        assert_eq!(u16::from_be_bytes([p[22], p[23]]), 40000);
        assert_eq!(u16::from_be_bytes([p[24], p[25]]), 13);
        assert_eq!(&p[28..], b"hello");
        assert!(udp_packet(src, dst, &vec![0; 65_508]).is_err());
        assert!(udp_packet(src, dst, &vec![0; 65_507]).is_ok());
    }

    #[test]
    fn the_probe_address_is_the_last_of_the_range() {
        assert_eq!(
            probe_addr("127.77.0.0/16".parse().unwrap()),
            "127.77.255.255:1".parse().unwrap()
        );
    }
}
