//! Address parsing for the config: socket addresses (with name resolution at load time)
//! and CIDR ranges for trusted proxies.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::Path;

/// How names in addresses are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Names {
    /// Resolve through the system resolver (normal loading).
    Resolve,
    /// Only literal IPs and `localhost` (fuzzing: no DNS traffic).
    LiteralOnly,
}

/// Parses "ip:port" or "name:port". Names are resolved once, when the config loads,
/// so a request never waits on DNS.
pub fn socket_addr(text: &str, names: Names) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("{text:?} is not an address (expected host:port)"));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!("{text:?} is not an address (expected host:port)"));
    }
    if names == Names::LiteralOnly && host != "localhost" {
        return Err(format!("{text:?}: names are not resolved here"));
    }
    text.to_socket_addrs()
        .map_err(|e| format!("{text:?} does not resolve: {e}"))?
        .next()
        .ok_or_else(|| format!("{text:?} resolves to no address"))
}

/// Every address an upstream instance's `host:port` names, in the resolver's order
/// without repeats: a literal address; else, with `hosts_file`, the addresses it lists
/// for the host (read afresh each time; the file replaces DNS for instance names, like
/// a private /etc/hosts); else the system resolver's answer. Blocks on DNS: call it
/// off the workers.
pub fn instance_addrs(
    text: &str,
    names: Names,
    hosts_file: Option<&Path>,
) -> Result<Vec<SocketAddr>, LookupError> {
    if let Ok(addr) = text.parse() {
        return Ok(vec![addr]);
    }
    let not_an_address =
        || LookupError::Malformed(format!("{text:?} is not an address (expected host:port)"));
    let (host, port) = text.rsplit_once(':').ok_or_else(not_an_address)?;
    let port = port.parse::<u16>().map_err(|_| not_an_address())?;
    if host.is_empty() {
        return Err(not_an_address());
    }
    if let Some(path) = hosts_file {
        let listed = hosts_file_addrs(path, host).map_err(LookupError::Malformed)?;
        if listed.is_empty() {
            return Err(LookupError::Unresolved(format!(
                "{text:?}: {host} is not in resolver.hosts_file {}",
                path.display()
            )));
        }
        return Ok(listed
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect());
    }
    if names == Names::LiteralOnly && host != "localhost" {
        return Err(LookupError::Unresolved(format!(
            "{text:?}: names are not resolved here"
        )));
    }
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for addr in text
        .to_socket_addrs()
        .map_err(|e| LookupError::Unresolved(format!("{text:?} does not resolve: {e}")))?
    {
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    if addrs.is_empty() {
        return Err(LookupError::Unresolved(format!(
            "{text:?} resolves to no address"
        )));
    }
    Ok(addrs)
}

/// Why [`instance_addrs`] found nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// The text or the hosts file is wrong: a config error whatever `resolve` says.
    #[error("{0}")]
    Malformed(String),
    /// The name did not resolve (now): with `resolve` set, it may later.
    #[error("{0}")]
    Unresolved(String),
}

/// The addresses a hosts-format file (`ADDRESS NAME [NAME...]`, `#` comments) gives
/// `host`, every line that names it counted.
fn hosts_file_addrs(path: &Path, host: &str) -> Result<Vec<IpAddr>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("resolver.hosts_file {}: cannot read: {e}", path.display()))?;
    let mut addrs = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut fields = line.split_whitespace();
        let Some(Ok(ip)) = fields.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        if fields.any(|name| name.eq_ignore_ascii_case(host)) && !addrs.contains(&ip) {
            addrs.push(ip);
        }
    }
    Ok(addrs)
}

/// An IP range such as 10.0.0.0/8 or ::1/128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    network: IpAddr,
    prefix: u8,
}

impl IpRange {
    /// Parses "a.b.c.d/len", "v6/len", or a bare address (a range of one).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (text, None),
        };
        let network: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or CIDR range"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(len) => len
                .parse::<u8>()
                .ok()
                .filter(|&l| l <= max)
                .ok_or_else(|| format!("{text:?} has a bad prefix length (0–{max})"))?,
        };
        Ok(Self { network, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(
                u32::from(net) as u128,
                u32::from(ip) as u128,
                32,
                self.prefix,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(u128::from(net), u128::from(ip), 128, self.prefix)
            }
            _ => false,
        }
    }
}

/// IPv4-mapped IPv6 peers (from a dual-stack listener) compare as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn prefix_eq(a: u128, b: u128, bits: u8, prefix: u8) -> bool {
    if prefix == 0 {
        return true;
    }
    let shift = bits - prefix;
    (a >> shift) == (b >> shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_contain_what_they_should() {
        let r = IpRange::parse("10.0.0.0/8").unwrap();
        assert!(r.contains("10.1.2.3".parse().unwrap()));
        assert!(!r.contains("11.0.0.1".parse().unwrap()));
        assert!(r.contains("::ffff:10.9.9.9".parse().unwrap()));
        let one = IpRange::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        assert!(IpRange::parse("0.0.0.0/0")
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
        assert!(IpRange::parse("::1/128")
            .unwrap()
            .contains("::1".parse().unwrap()));
    }

    #[test]
    fn bad_ranges_are_errors() {
        for bad in ["10.0.0.0/33", "nope", "10.0.0.0/x", "::1/129"] {
            assert!(IpRange::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn addresses() {
        assert!(socket_addr("127.0.0.1:80", Names::Resolve).is_ok());
        assert!(socket_addr("localhost:80", Names::Resolve).is_ok());
        assert!(socket_addr("127.0.0.1", Names::Resolve).is_err());
        assert!(socket_addr("127.0.0.1:99999", Names::Resolve).is_err());
        assert!(socket_addr("host:notaport", Names::Resolve).is_err());
    }

    #[test]
    fn a_hosts_file_gives_every_address_of_a_name() {
        let path = std::env::temp_dir().join(format!("splitgate-hosts-{}", std::process::id()));
        std::fs::write(
            &path,
            "# test\n127.0.0.2 api api.internal\n127.0.0.3 API # second\nnot-an-ip api\n",
        )
        .unwrap();
        let addrs = instance_addrs("api:8080", Names::LiteralOnly, Some(&path)).unwrap();
        let expected: Vec<SocketAddr> = vec![
            "127.0.0.2:8080".parse().unwrap(),
            "127.0.0.3:8080".parse().unwrap(),
        ];
        assert_eq!(addrs, expected);
        // A name the file does not list is not resolved (no DNS traffic).
        let error = instance_addrs("other:80", Names::Resolve, Some(&path)).unwrap_err();
        assert!(
            matches!(&error, LookupError::Unresolved(m) if m.contains("not in")),
            "{error}"
        );
        std::fs::remove_file(&path).unwrap();
        let error = instance_addrs("api:8080", Names::Resolve, Some(&path)).unwrap_err();
        assert!(
            matches!(&error, LookupError::Malformed(m) if m.contains("resolver.hosts_file")),
            "{error}"
        );
    }
}
