//! Plain HTTP/1.1 clients from a chosen source address, for the steering
//! tests: which listener a connection lands on depends on where it comes
//! from, so the client binds its source before it connects.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    time::Duration,
};

use crate::netns::NetNs;

/// How one HTTP exchange ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The proxy answered with this status line.
    Answered(String),
    Refused,
    Other(String),
}

impl Outcome {
    /// The status code of an answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            Outcome::Answered(line) => line.split_whitespace().nth(1)?.parse().ok(),
            _ => None,
        }
    }
}

/// `GET path` from source address `from` to `to`, run inside `ns`.
pub fn get_from(ns: &NetNs, from: IpAddr, to: SocketAddr, path: &str) -> Outcome {
    ns.run(move || {
        let mut stream = match connect_from(from, to) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Outcome::Refused;
            }
            Err(e) => return Outcome::Other(format!("connect: {e}")),
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let head = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        if let Err(e) = stream.write_all(head.as_bytes()) {
            return Outcome::Other(format!("write: {e}"));
        }
        let mut response = Vec::new();
        match stream.read_to_end(&mut response) {
            Ok(_) => {
                let text = String::from_utf8_lossy(&response);
                let line = text.lines().next().unwrap_or("").trim().to_owned();
                if line.is_empty() {
                    // Accepted, then closed by a socket that is not HTTP.
                    Outcome::Other(format!("no answer: {text:?}"))
                } else {
                    Outcome::Answered(line)
                }
            }
            Err(e) => Outcome::Other(format!("read: {e}")),
        }
    })
}

/// A TCP connection bound to `from` before connecting: std has no bind
/// before connect, so the socket is made with libc.
pub fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let (family, local, remote, len) = match (from, to) {
        (IpAddr::V4(from), SocketAddr::V4(to)) => {
            let sockaddr = |ip: std::net::Ipv4Addr, port: u16| {
                let mut raw: libc::sockaddr_storage = zeroed_sockaddr();
                // SAFETY: sockaddr_storage is large and aligned enough for
                // any sockaddr, sockaddr_in included.
                let sin = unsafe { &mut *(&raw mut raw).cast::<libc::sockaddr_in>() };
                sin.sin_family = libc::AF_INET as libc::sa_family_t;
                sin.sin_port = port.to_be();
                sin.sin_addr = libc::in_addr {
                    s_addr: u32::from_ne_bytes(ip.octets()),
                };
                raw
            };
            (
                libc::AF_INET,
                sockaddr(from, 0),
                sockaddr(*to.ip(), to.port()),
                std::mem::size_of::<libc::sockaddr_in>(),
            )
        }
        (IpAddr::V6(from), SocketAddr::V6(to)) => {
            let sockaddr = |ip: std::net::Ipv6Addr, port: u16| {
                let mut raw: libc::sockaddr_storage = zeroed_sockaddr();
                // SAFETY: as above, for sockaddr_in6.
                let sin6 = unsafe { &mut *(&raw mut raw).cast::<libc::sockaddr_in6>() };
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_port = port.to_be();
                sin6.sin6_addr = libc::in6_addr {
                    s6_addr: ip.octets(),
                };
                raw
            };
            (
                libc::AF_INET6,
                sockaddr(from, 0),
                sockaddr(*to.ip(), to.port()),
                std::mem::size_of::<libc::sockaddr_in6>(),
            )
        }
        _ => {
            return Err(std::io::Error::other(format!(
                "{from} and {to} are of different families"
            )));
        }
    };
    let len = len as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor owned by the returned
    // stream (or closed on error); the address structs live on the stack
    // for the calls and are at least `len` bytes.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        if libc::bind(fd, (&raw const local).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::connect(fd, (&raw const remote).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

fn zeroed_sockaddr() -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid
    // (unspecified-family) value.
    unsafe { std::mem::zeroed() }
}
