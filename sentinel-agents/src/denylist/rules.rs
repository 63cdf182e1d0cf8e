//! What the denylist blocks: path prefixes and client networks, from
//! flags, files and the proxy's `config { ... }` block.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;

/// Keys of the agent's `config { ... }` block.
pub const CONFIG_PATHS: &str = "paths";
pub const CONFIG_IPS: &str = "ips";

/// Why an entry or a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("path prefix {entry:?} does not start with '/'")]
    Path { entry: String },
    #[error("{entry:?} is neither an IP address nor a CIDR")]
    Ip { entry: String },
    #[error("cannot read {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {source}")]
    FileEntry {
        path: PathBuf,
        line: usize,
        #[source]
        source: Box<RuleError>,
    },
    #[error("config: {reason}")]
    Config { reason: String },
}

/// Path prefixes and networks to block.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    pub paths: Vec<String>,
    pub nets: Vec<IpNet>,
}

impl Rules {
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty() && self.nets.is_empty()
    }

    /// A path prefix: requests whose path starts with it are blocked.
    pub fn add_path(&mut self, prefix: &str) -> Result<(), RuleError> {
        if !prefix.starts_with('/') {
            return Err(RuleError::Path {
                entry: prefix.to_owned(),
            });
        }
        if !self.paths.iter().any(|p| p == prefix) {
            self.paths.push(prefix.to_owned());
        }
        Ok(())
    }

    /// An address (its /32 or /128) or a CIDR.
    pub fn add_ip(&mut self, entry: &str) -> Result<(), RuleError> {
        let net = match entry.parse::<IpNet>() {
            Ok(net) => net.trunc(),
            Err(_) => match entry.parse::<IpAddr>() {
                Ok(ip) => IpNet::from(ip.to_canonical()),
                Err(_) => {
                    return Err(RuleError::Ip {
                        entry: entry.to_owned(),
                    });
                }
            },
        };
        if !self.nets.contains(&net) {
            self.nets.push(net);
        }
        Ok(())
    }

    /// A path prefix if it starts with `/`, else an address or CIDR.
    pub fn add_entry(&mut self, entry: &str) -> Result<(), RuleError> {
        if entry.starts_with('/') {
            self.add_path(entry)
        } else {
            self.add_ip(entry)
        }
    }

    /// One entry a line, as [`add_entry`](Self::add_entry) reads them;
    /// blank lines and `#` comments are skipped.
    pub fn load_file(&mut self, path: &Path) -> Result<(), RuleError> {
        let text = std::fs::read_to_string(path).map_err(|source| RuleError::File {
            path: path.to_owned(),
            source,
        })?;
        for (i, line) in text.lines().enumerate() {
            let entry = line.split('#').next().unwrap_or("").trim();
            if entry.is_empty() {
                continue;
            }
            self.add_entry(entry)
                .map_err(|source| RuleError::FileEntry {
                    path: path.to_owned(),
                    line: i + 1,
                    source: Box::new(source),
                })?;
        }
        Ok(())
    }

    /// The rules of a `config { paths ...; ips ...; }` block, as JSON: each
    /// key one string or an array of strings. Other keys are refused, so
    /// that a typo does not silently block nothing.
    pub fn from_config(config: &serde_json::Value) -> Result<Rules, RuleError> {
        let mut rules = Rules::default();
        let map = match config {
            serde_json::Value::Null => return Ok(rules),
            serde_json::Value::Object(map) => map,
            other => {
                return Err(RuleError::Config {
                    reason: format!("expected an object, got {other}"),
                });
            }
        };
        for (key, value) in map {
            let add: fn(&mut Rules, &str) -> Result<(), RuleError> = match key.as_str() {
                CONFIG_PATHS => Rules::add_path,
                CONFIG_IPS => Rules::add_ip,
                other => {
                    return Err(RuleError::Config {
                        reason: format!(
                            "unknown key {other:?}; the keys are {CONFIG_PATHS:?} and {CONFIG_IPS:?}"
                        ),
                    });
                }
            };
            let entries: Vec<&serde_json::Value> = match value {
                serde_json::Value::Array(items) => items.iter().collect(),
                one => vec![one],
            };
            for entry in entries {
                let Some(text) = entry.as_str() else {
                    return Err(RuleError::Config {
                        reason: format!("{key}: expected strings, got {entry}"),
                    });
                };
                add(&mut rules, text).map_err(|e| RuleError::Config {
                    reason: format!("{key}: {e}"),
                })?;
            }
        }
        Ok(rules)
    }

    /// The first network holding `ip`.
    pub fn match_ip(&self, ip: IpAddr) -> Option<&IpNet> {
        let ip = ip.to_canonical();
        self.nets.iter().find(|net| net.contains(&ip))
    }

    /// The first prefix `path` starts with, as sent or once normalized
    /// (percent-decoded, `//`, `.` and `..` resolved), so that `/%61dmin`
    /// or `/x/../admin` does not slip past `/admin`.
    pub fn match_path(&self, path: &str) -> Option<&str> {
        if self.paths.is_empty() {
            return None;
        }
        let normalized = normalize(path);
        self.paths
            .iter()
            .find(|prefix| {
                path.starts_with(prefix.as_str()) || normalized.starts_with(prefix.as_str())
            })
            .map(String::as_str)
    }
}

/// The path as an origin server would resolve it.
pub fn normalize(path: &str) -> String {
    let decoded = percent_decode(path);
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    if out.is_empty() || (trailing && !segments.is_empty()) {
        out.push('/');
    }
    out
}

fn percent_decode(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = bytes.get(i + 1..i + 3)
            && let Ok(hex) = std::str::from_utf8(hex)
            && let Ok(byte) = u8::from_str_radix(hex, 16)
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn entries_are_paths_or_networks() {
        let mut rules = Rules::default();
        rules.add_entry("/admin").unwrap();
        rules.add_entry("/admin").unwrap();
        rules.add_entry("192.0.2.7").unwrap();
        rules.add_entry("198.51.100.77/24").unwrap();
        rules.add_entry("2001:db8::/32").unwrap();
        rules.add_entry("::ffff:203.0.113.1").unwrap();
        assert_eq!(rules.paths, ["/admin"]);
        assert_eq!(
            rules.nets,
            [
                "192.0.2.7/32".parse::<IpNet>().unwrap(),
                "198.51.100.0/24".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
                "203.0.113.1/32".parse().unwrap(),
            ]
        );
        assert!(matches!(
            rules.add_path("admin"),
            Err(RuleError::Path { .. })
        ));
        assert!(matches!(
            rules.add_entry("example.com"),
            Err(RuleError::Ip { .. })
        ));
        assert!(matches!(
            rules.add_ip("10.0.0.0/33"),
            Err(RuleError::Ip { .. })
        ));
    }

    #[test]
    fn networks_match_addresses_in_any_form() {
        let mut rules = Rules::default();
        rules.add_ip("198.51.100.0/24").unwrap();
        rules.add_ip("2001:db8::/32").unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            rules
                .match_ip(ip("198.51.100.200"))
                .map(ToString::to_string),
            Some("198.51.100.0/24".into())
        );
        assert!(rules.match_ip(ip("::ffff:198.51.100.1")).is_some());
        assert!(rules.match_ip(ip("2001:db8:1::5")).is_some());
        assert!(rules.match_ip(ip("198.51.101.1")).is_none());
        assert!(rules.match_ip(ip("2001:db9::1")).is_none());
    }

    #[test]
    fn paths_match_by_prefix_as_sent_or_normalized() {
        let mut rules = Rules::default();
        rules.add_path("/admin").unwrap();
        rules.add_path("/.git/").unwrap();
        for blocked in [
            "/admin",
            "/admin/users",
            "/administrator",
            "/%61dmin",
            "//admin",
            "/x/../admin",
            "/./admin",
            "/.git/config",
            "/%2egit/HEAD",
        ] {
            assert!(rules.match_path(blocked).is_some(), "{blocked} passed");
        }
        for allowed in ["/", "/public/admin", "/.github", "/admi", "/ADMIN"] {
            assert_eq!(rules.match_path(allowed), None, "{allowed} blocked");
        }
    }

    #[test]
    fn normalization() {
        for (path, want) in [
            ("/", "/"),
            ("", "/"),
            ("/a//b/./c/../d", "/a/b/d"),
            ("/a/b/", "/a/b/"),
            ("/../../etc", "/etc"),
            ("/a/%2F/b", "/a/b"),
            ("/%zz/%4", "/%zz/%4"),
            ("/a/..", "/"),
        ] {
            assert_eq!(normalize(path), want, "{path}");
        }
    }

    #[test]
    fn the_config_block_takes_strings_or_arrays() {
        let rules = Rules::from_config(&json!({
            "paths": ["/secret", "/internal"],
            "ips": "203.0.113.0/24"
        }))
        .unwrap();
        assert_eq!(rules.paths, ["/secret", "/internal"]);
        assert_eq!(rules.nets, ["203.0.113.0/24".parse::<IpNet>().unwrap()]);
        assert!(Rules::from_config(&json!(null)).unwrap().is_empty());
        assert!(Rules::from_config(&json!({})).unwrap().is_empty());

        for (bad, why) in [
            (json!({"path": ["/x"]}), "unknown key \"path\""),
            (json!({"paths": [1]}), "expected strings"),
            (json!({"paths": "relative"}), "does not start with '/'"),
            (json!({"ips": ["nope"]}), "neither an IP"),
            (json!(["/x"]), "expected an object"),
        ] {
            let err = Rules::from_config(&bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn files_hold_one_entry_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("deny.txt");
        std::fs::write(
            &file,
            "# scanners\n/wp-login.php\n\n  198.51.100.0/24  # a test net\n2001:db8::1\n",
        )
        .unwrap();
        let mut rules = Rules::default();
        rules.load_file(&file).unwrap();
        assert_eq!(rules.paths, ["/wp-login.php"]);
        assert_eq!(rules.nets.len(), 2);

        std::fs::write(&file, "/ok\nnot-an-entry\n").unwrap();
        let err = Rules::default().load_file(&file).unwrap_err().to_string();
        assert!(err.contains("deny.txt:2"), "{err}");
        assert!(err.contains("not-an-entry"), "{err}");

        let err = Rules::default()
            .load_file(&dir.path().join("missing"))
            .unwrap_err();
        assert!(matches!(err, RuleError::File { .. }));
    }
}
