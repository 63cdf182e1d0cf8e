//! What a request says about its client: device, platform and browser
//! from the `User-Agent`, and the kind of network its address is on.
//!
//! Contract:
//! - [`parse_user_agent`] never fails: an empty, unknown or garbled string
//!   gives `unknown` fields. Only the first [`MAX_USER_AGENT_BYTES`] are
//!   looked at, so a huge header costs no more than a normal one.
//! - Browsers and crawlers are recognised by the `woothee` crate; on top of
//!   it this module tells tablets from phones (iPad, Android without
//!   `Mobile`, Kindle/Silk, `Tablet`), counts automated clients as bots
//!   (crawlers, headless browsers, HTTP libraries and command-line tools
//!   such as curl), and names platforms the same way whatever the version
//!   (`Windows`, `macOS`, `iOS`, `Android`, `Linux`, `ChromeOS`, ...).
//! - [`network_type`] classifies by address ranges alone (no lookups);
//!   IPv4-mapped IPv6 addresses are classified as the IPv4 address they
//!   carry.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;

/// Bytes of a `User-Agent` that are parsed.
pub const MAX_USER_AGENT_BYTES: usize = 1024;

const UNKNOWN: &str = "unknown";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceType {
    Desktop,
    Mobile,
    Tablet,
    Bot,
    Unknown,
}

impl DeviceType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Desktop => "desktop",
            Self::Mobile => "mobile",
            Self::Tablet => "tablet",
            Self::Bot => "bot",
            Self::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserAgentInfo {
    pub device_type: DeviceType,
    /// `Windows`, `macOS`, `iOS`, `Android`, `Linux`, `ChromeOS`, `BSD`,
    /// `Windows Phone`, `BlackBerry`, a console's name, or `unknown`.
    pub platform: String,
    /// `Chrome`, `Firefox`, `Safari`, `Edge`, `Opera`, ..., a crawler's
    /// name (`Googlebot`), a tool's (`curl`), or `unknown`.
    pub browser: String,
    /// Empty when unknown.
    pub browser_version: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkType {
    Loopback,
    /// RFC 1918, and IPv6 unique local (fc00::/7) and site-local.
    Private,
    LinkLocal,
    /// Carrier-grade NAT, 100.64.0.0/10.
    Cgnat,
    /// 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32,
    /// 3fff::/20.
    Documentation,
    Multicast,
    /// 0.0.0.0, ::.
    Unspecified,
    /// Other special-purpose ranges: 0.0.0.0/8, 192.0.0.0/24, benchmarking
    /// 198.18.0.0/15, 240.0.0.0/4 and broadcast, IPv6 discard 100::/64.
    Reserved,
    Public,
}

impl NetworkType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Loopback => "loopback",
            Self::Private => "private",
            Self::LinkLocal => "link_local",
            Self::Cgnat => "cgnat",
            Self::Documentation => "documentation",
            Self::Multicast => "multicast",
            Self::Unspecified => "unspecified",
            Self::Reserved => "reserved",
            Self::Public => "public",
        }
    }
}

/// The client fields of a profile record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientProfile {
    pub ip: String,
    pub device_type: DeviceType,
    pub platform: String,
    pub browser: String,
    pub browser_version: String,
    pub network_type: NetworkType,
}

/// The profile of a client at `ip` that sent `user_agent` (`None` when it
/// sent no `User-Agent`, or one that is not text).
pub fn client_profile(user_agent: Option<&str>, ip: IpAddr) -> ClientProfile {
    let ua = parse_user_agent(user_agent.unwrap_or_default());
    let ip = canonical(ip);
    ClientProfile {
        ip: ip.to_string(),
        device_type: ua.device_type,
        platform: ua.platform,
        browser: ua.browser,
        browser_version: ua.browser_version,
        network_type: network_type(ip),
    }
}

/// Automated clients that `woothee` takes for browsers, or does not know:
/// lowercase substrings.
const BOT_MARKERS: [&str; 14] = [
    "bot/",
    "bot;",
    "bot-",
    "bot ",
    "bot)",
    "spider",
    "crawler",
    "headlesschrome",
    "phantomjs",
    "facebookexternalhit",
    "chrome-lighthouse",
    "slurp",
    "scrapy",
    "python-urllib",
];

/// Libraries and tools whose product token is the client's name: bots.
const TOOLS: [&str; 16] = [
    "curl",
    "wget",
    "python-requests",
    "python-urllib",
    "python-httpx",
    "aiohttp",
    "go-http-client",
    "java",
    "apache-httpclient",
    "libwww-perl",
    "axios",
    "node-fetch",
    "undici",
    "httpie",
    "powershell",
    "postmanruntime",
];

/// The largest prefix of `s` of at most `max` bytes that ends on a
/// character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn known(value: &str) -> Option<&str> {
    (!value.is_empty() && value != woothee::woothee::VALUE_UNKNOWN).then_some(value)
}

/// Device, platform and browser of a `User-Agent`.
pub fn parse_user_agent(user_agent: &str) -> UserAgentInfo {
    let ua = truncate(user_agent.trim(), MAX_USER_AGENT_BYTES);
    if ua.is_empty() || ua == "-" {
        return UserAgentInfo {
            device_type: DeviceType::Unknown,
            platform: UNKNOWN.into(),
            browser: UNKNOWN.into(),
            browser_version: String::new(),
        };
    }
    let lower = ua.to_ascii_lowercase();
    let parsed = woothee::parser::Parser::new().parse(ua);
    let (name, category, os, version) = match &parsed {
        Some(r) => (
            known(r.name),
            known(r.category),
            known(r.os),
            known(r.version),
        ),
        None => (None, None, None, None),
    };
    let platform = platform(os, &lower);

    // The product token: `curl/8.5.0` → ("curl", "8.5.0").
    let product = ua.split_whitespace().next().unwrap_or_default();
    let (product_name, product_version) = product.split_once('/').unwrap_or((product, ""));
    let tool = TOOLS
        .iter()
        .any(|t| product_name.eq_ignore_ascii_case(t))
        .then_some((product_name, product_version));

    let headless = lower.contains("headlesschrome");
    let bot = category == Some("crawler")
        || tool.is_some()
        || BOT_MARKERS.iter().any(|m| lower.contains(m))
        || lower.ends_with("bot");

    let (browser, browser_version) = if let Some((n, v)) = tool {
        (n.to_owned(), v.to_owned())
    } else if headless {
        let v = version_after(ua, "HeadlessChrome/");
        ("HeadlessChrome".to_owned(), v.to_owned())
    } else {
        match name {
            Some("HTTP Library") | None => {
                // woothee has no name for it: the product token is the best
                // guess, unless it is the generic `Mozilla`.
                if product_name.is_empty() || product_name.eq_ignore_ascii_case("mozilla") {
                    (UNKNOWN.to_owned(), String::new())
                } else {
                    (product_name.to_owned(), product_version.to_owned())
                }
            }
            Some(n) => (n.to_owned(), version.unwrap_or_default().to_owned()),
        }
    };

    let device_type = if bot {
        DeviceType::Bot
    } else if is_tablet(&platform, &lower) {
        DeviceType::Tablet
    } else {
        match category {
            Some("pc") => DeviceType::Desktop,
            Some("smartphone" | "mobilephone") => DeviceType::Mobile,
            _ if lower.contains("mobile") => DeviceType::Mobile,
            _ if matches!(
                platform.as_str(),
                "Windows" | "macOS" | "Linux" | "ChromeOS"
            ) =>
            {
                DeviceType::Desktop
            }
            _ => DeviceType::Unknown,
        }
    };

    UserAgentInfo {
        device_type,
        platform,
        browser,
        browser_version,
    }
}

fn is_tablet(platform: &str, lower: &str) -> bool {
    lower.contains("ipad")
        || lower.contains("tablet")
        || lower.contains("kindle")
        || lower.contains("silk/")
        || lower.contains("playbook")
        // Google asks Android tablets to leave `Mobile` out.
        || (platform == "Android" && !lower.contains("mobile"))
}

fn platform(os: Option<&str>, lower: &str) -> String {
    let name = match os {
        Some(os) if os.starts_with("Windows Phone") => "Windows Phone",
        Some("Windows CE") => "Windows CE",
        Some(os) if os.starts_with("Windows") => "Windows",
        Some("Mac OSX" | "Mac OS Classic") => "macOS",
        Some("iPhone" | "iPad" | "iPod" | "iOS") => "iOS",
        Some("BlackBerry" | "BlackBerry 10") => "BlackBerry",
        Some(os) => return os.to_owned(),
        // woothee does not parse the platform of crawlers and tools.
        None if lower.contains("android") => "Android",
        None if lower.contains("iphone") || lower.contains("ipad") => "iOS",
        None if lower.contains("windows") => "Windows",
        None if lower.contains("cros") => "ChromeOS",
        None if lower.contains("mac os x") || lower.contains("macintosh") => "macOS",
        None if lower.contains("linux") => "Linux",
        None => UNKNOWN,
    };
    name.to_owned()
}

/// The version after `marker` (digits and dots).
fn version_after<'a>(ua: &'a str, marker: &str) -> &'a str {
    let Some(at) = ua.find(marker) else {
        return "";
    };
    let rest = &ua[at + marker.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    &rest[..end]
}

/// An IPv4-mapped IPv6 address as its IPv4 address; others unchanged.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The kind of network `ip` belongs to.
pub fn network_type(ip: IpAddr) -> NetworkType {
    match canonical(ip) {
        IpAddr::V4(v4) => network_type_v4(v4),
        IpAddr::V6(v6) => network_type_v6(v6),
    }
}

fn network_type_v4(ip: Ipv4Addr) -> NetworkType {
    let [a, b, c, _] = ip.octets();
    if ip.is_unspecified() {
        NetworkType::Unspecified
    } else if ip.is_loopback() {
        NetworkType::Loopback
    } else if ip.is_private() {
        NetworkType::Private
    } else if ip.is_link_local() {
        NetworkType::LinkLocal
    } else if a == 100 && (64..128).contains(&b) {
        NetworkType::Cgnat
    } else if ip.is_documentation() {
        NetworkType::Documentation
    } else if ip.is_multicast() {
        NetworkType::Multicast
    } else if a == 0
        || a >= 240
        || (a == 192 && b == 0 && c == 0)
        || (a == 198 && (b == 18 || b == 19))
    {
        NetworkType::Reserved
    } else {
        NetworkType::Public
    }
}

fn network_type_v6(ip: Ipv6Addr) -> NetworkType {
    let s = ip.segments();
    if ip.is_unspecified() {
        NetworkType::Unspecified
    } else if ip.is_loopback() {
        NetworkType::Loopback
    } else if (s[0] & 0xffc0) == 0xfe80 {
        NetworkType::LinkLocal
    } else if (s[0] & 0xfe00) == 0xfc00 || (s[0] & 0xffc0) == 0xfec0 {
        NetworkType::Private
    } else if (s[0] == 0x2001 && s[1] == 0x0db8) || (s[0] & 0xfff0) == 0x3ff0 {
        NetworkType::Documentation
    } else if ip.is_multicast() {
        NetworkType::Multicast
    } else if s[0] == 0x0100 && s[1] == 0 && s[2] == 0 && s[3] == 0 {
        NetworkType::Reserved
    } else {
        NetworkType::Public
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHROME_WINDOWS: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36";

    #[test]
    fn user_agents_of_real_clients() {
        use DeviceType::*;
        let cases: &[(&str, DeviceType, &str, &str, &str)] = &[
            (CHROME_WINDOWS, Desktop, "Windows", "Chrome", "124.0.0.0"),
            (
                "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
                Desktop,
                "Linux",
                "Firefox",
                "125.0",
            ),
            (
                "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:125.0) Gecko/20100101 Firefox/125.0",
                Desktop,
                "Windows",
                "Firefox",
                "125.0",
            ),
            (
                "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4.1 Safari/605.1.15",
                Desktop,
                "macOS",
                "Safari",
                "17.4.1",
            ),
            (
                "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36 Edg/124.0.2478.51",
                Desktop,
                "Windows",
                "Edge",
                "124.0.2478.51",
            ),
            (
                "Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36",
                Desktop,
                "ChromeOS",
                "Chrome",
                "124.0.0.0",
            ),
            (
                "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4.1 Mobile/15E148 Safari/604.1",
                Mobile,
                "iOS",
                "Safari",
                "17.4.1",
            ),
            (
                "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) CriOS/124.0.6367.88 Mobile/15E148 Safari/604.1",
                Mobile,
                "iOS",
                "Chrome",
                "124.0.6367.88",
            ),
            (
                "Mozilla/5.0 (iPad; CPU OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
                Tablet,
                "iOS",
                "Safari",
                "17.4",
            ),
            (
                "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.6367.82 Mobile Safari/537.36",
                Mobile,
                "Android",
                "Chrome",
                "124.0.6367.82",
            ),
            (
                "Mozilla/5.0 (Linux; Android 13; SM-X700) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.6367.82 Safari/537.36",
                Tablet,
                "Android",
                "Chrome",
                "124.0.6367.82",
            ),
            (
                "Mozilla/5.0 (Linux; Android 9; KFTRWI) AppleWebKit/537.36 (KHTML, like Gecko) Silk/124.3.1 like Chrome/124.0.6367.118 Safari/537.36",
                Tablet,
                "Android",
                "Chrome",
                "124.0.6367.118",
            ),
            (
                "Mozilla/5.0 (Android 14; Mobile; rv:125.0) Gecko/125.0 Firefox/125.0",
                Mobile,
                "Android",
                "Firefox",
                "125.0",
            ),
            (
                "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/24.0 Chrome/117.0.0.0 Mobile Safari/537.36",
                Mobile,
                "Android",
                "SamsungBrowser",
                "24.0",
            ),
            ("curl/8.5.0", Bot, "unknown", "curl", "8.5.0"),
            ("Wget/1.21.4", Bot, "unknown", "Wget", "1.21.4"),
            (
                "python-requests/2.31.0",
                Bot,
                "unknown",
                "python-requests",
                "2.31.0",
            ),
            (
                "Go-http-client/2.0",
                Bot,
                "unknown",
                "Go-http-client",
                "2.0",
            ),
            (
                "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
                Bot,
                "unknown",
                "Googlebot",
                "",
            ),
            (
                "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.6367.82 Mobile Safari/537.36 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
                Bot,
                "Android",
                "Googlebot",
                "",
            ),
            (
                "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
                Bot,
                "unknown",
                "bingbot",
                "",
            ),
            (
                "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/124.0.6367.60 Safari/537.36",
                Bot,
                "Linux",
                "HeadlessChrome",
                "124.0.6367.60",
            ),
            ("", Unknown, "unknown", "unknown", ""),
            ("-", Unknown, "unknown", "unknown", ""),
            ("Mozilla/5.0", Unknown, "unknown", "unknown", ""),
        ];
        for (ua, device, platform, browser, version) in cases {
            let got = parse_user_agent(ua);
            let want = UserAgentInfo {
                device_type: *device,
                platform: (*platform).into(),
                browser: (*browser).into(),
                browser_version: (*version).into(),
            };
            assert_eq!(got, want, "{ua}");
        }
    }

    #[test]
    fn hostile_user_agents_are_bounded_and_never_panic() {
        let long = format!("{CHROME_WINDOWS} {}", "é".repeat(100_000));
        let got = parse_user_agent(&long);
        assert_eq!(got.browser, "Chrome");
        assert_eq!(got.device_type, DeviceType::Desktop);
        for ua in [
            "\u{0}\u{1}\u{7f}",
            "((((((((((",
            "Mozilla/5.0 (compatible; MSIE",
            "Mozilla/5.0 (Windows ",
            "Opera/",
            "/",
            "CUBOT_X30",
            "Mozilla/5.0 (Linux; Android",
        ] {
            let got = parse_user_agent(ua);
            assert!(!got.platform.is_empty() && !got.browser.is_empty(), "{ua}");
        }
        assert_eq!(truncate("aé", 2), "a");
    }

    #[test]
    fn networks_by_address_range() {
        use NetworkType::*;
        let cases: &[(&str, NetworkType)] = &[
            ("127.0.0.1", Loopback),
            ("127.10.0.7", Loopback),
            ("10.1.2.3", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("172.32.0.1", Public),
            ("192.168.1.10", Private),
            ("169.254.10.1", LinkLocal),
            ("100.64.0.1", Cgnat),
            ("100.127.255.254", Cgnat),
            ("100.128.0.1", Public),
            ("192.0.2.1", Documentation),
            ("198.51.100.7", Documentation),
            ("203.0.113.9", Documentation),
            ("224.0.0.251", Multicast),
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Reserved),
            ("198.18.0.1", Reserved),
            ("240.0.0.1", Reserved),
            ("255.255.255.255", Reserved),
            ("8.8.8.8", Public),
            ("1.1.1.1", Public),
            ("::1", Loopback),
            ("::", Unspecified),
            ("fe80::1", LinkLocal),
            ("fd12:3456::1", Private),
            ("fc00::1", Private),
            ("2001:db8::1", Documentation),
            ("3fff:1::1", Documentation),
            ("ff02::1", Multicast),
            ("100::1", Reserved),
            ("2606:4700:4700::1111", Public),
            ("::ffff:192.168.0.1", Private),
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:8.8.4.4", Public),
        ];
        for (ip, want) in cases {
            let parsed: IpAddr = ip.parse().expect("address");
            assert_eq!(network_type(parsed), *want, "{ip}");
        }
    }

    #[test]
    fn a_client_profile_serializes_with_the_seed_names() {
        let ip: IpAddr = "::ffff:203.0.113.9".parse().expect("address");
        let profile = client_profile(Some(CHROME_WINDOWS), ip);
        assert_eq!(
            serde_json::to_value(&profile).expect("json"),
            serde_json::json!({
                "ip": "203.0.113.9",
                "device_type": "desktop",
                "platform": "Windows",
                "browser": "Chrome",
                "browser_version": "124.0.0.0",
                "network_type": "documentation",
            })
        );
        let none = client_profile(None, "10.0.0.1".parse().expect("address"));
        assert_eq!(none.device_type, DeviceType::Unknown);
        assert_eq!(none.network_type.as_str(), "private");
        assert_eq!(DeviceType::Tablet.as_str(), "tablet");
    }
}
