//! Text forms of the network values carried by `CreateSandboxRequest`
//! (`Interface.mac`, `IpAddress`, `Route.destination`): one parser and one
//! formatter shared by the shim (which writes them) and the agent (which
//! reads them), so both sides agree on the syntax.

use std::fmt;
use std::net::IpAddr;

/// A malformed network value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetParseError {
    /// Not six `:`-separated hex octets.
    #[error("MAC address {0:?} is not of the form aa:bb:cc:dd:ee:ff")]
    Mac(String),
    /// Not an IPv4 or IPv6 address.
    #[error("{0:?} is not an IPv4 or IPv6 address")]
    Ip(String),
    /// The prefix length does not fit the address family.
    #[error("prefix length {len} is out of range for {addr} (at most {max})")]
    PrefixLength {
        /// The address.
        addr: IpAddr,
        /// The prefix length given.
        len: u32,
        /// The family's maximum.
        max: u8,
    },
    /// Not `ADDRESS/LENGTH`.
    #[error("{0:?} is not a prefix of the form ADDRESS/LENGTH")]
    Cidr(String),
}

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// Parses `aa:bb:cc:dd:ee:ff` (any case).
    pub fn parse(s: &str) -> Result<Self, NetParseError> {
        let bad = || NetParseError::Mac(s.to_owned());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Self(out))
    }

    /// The address from a netlink attribute, if it is six bytes long.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        <[u8; 6]>::try_from(b).ok().map(Self)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// An address with a prefix length, valid for its family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    /// The address.
    pub addr: IpAddr,
    /// The prefix length.
    pub len: u8,
}

impl Prefix {
    /// Checks `len` against the family of `addr`.
    pub fn new(addr: IpAddr, len: u32) -> Result<Self, NetParseError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > u32::from(max) {
            return Err(NetParseError::PrefixLength { addr, len, max });
        }
        Ok(Self {
            addr,
            len: len as u8,
        })
    }

    /// Parses an address (no prefix) and checks `len`.
    pub fn from_parts(addr: &str, len: u32) -> Result<Self, NetParseError> {
        Self::new(parse_ip(addr)?, len)
    }

    /// Parses `ADDRESS/LENGTH`.
    pub fn parse(s: &str) -> Result<Self, NetParseError> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| NetParseError::Cidr(s.to_owned()))?;
        let len: u32 = len.parse().map_err(|_| NetParseError::Cidr(s.to_owned()))?;
        Self::from_parts(addr, len)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Parses an IPv4 or IPv6 address.
pub fn parse_ip(s: &str) -> Result<IpAddr, NetParseError> {
    s.parse().map_err(|_| NetParseError::Ip(s.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip_and_rejects() {
        let m = Mac::parse("AA:bb:0c:dd:ee:0F").unwrap();
        assert_eq!(m.0, [0xaa, 0xbb, 0x0c, 0xdd, 0xee, 0x0f]);
        assert_eq!(m.to_string(), "aa:bb:0c:dd:ee:0f");
        for bad in [
            "",
            "aa:bb:cc:dd:ee",
            "aa:bb:cc:dd:ee:ff:00",
            "aabb:cc:dd:ee:ff",
            "a:bb:cc:dd:ee:ff",
            "gg:bb:cc:dd:ee:ff",
            "+a:bb:cc:dd:ee:ff",
        ] {
            assert_eq!(
                Mac::parse(bad),
                Err(NetParseError::Mac(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(Mac::from_bytes(&[1, 2, 3]), None);
        assert_eq!(
            Mac::from_bytes(&[1, 2, 3, 4, 5, 6]),
            Some(Mac([1, 2, 3, 4, 5, 6]))
        );
    }

    #[test]
    fn prefixes() {
        assert_eq!(
            Prefix::parse("10.88.0.2/24").unwrap().to_string(),
            "10.88.0.2/24"
        );
        assert_eq!(Prefix::parse("fd00::1/64").unwrap().len, 64);
        assert!(matches!(
            Prefix::parse("10.0.0.0/33"),
            Err(NetParseError::PrefixLength { max: 32, .. })
        ));
        assert!(Prefix::parse("fd00::/129").is_err());
        assert_eq!(
            Prefix::parse("10.0.0.0"),
            Err(NetParseError::Cidr("10.0.0.0".into()))
        );
        assert_eq!(
            Prefix::parse("10.0.0/8"),
            Err(NetParseError::Ip("10.0.0".into()))
        );
        assert!(Prefix::parse("10.0.0.0/-1").is_err());
    }
}
