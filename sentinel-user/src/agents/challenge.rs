//! Answering a `challenge` decision with a real challenge.
//!
//! The client gets a page (the built-in one or `waf.challenge.page`) that
//! must solve a proof of work: find a counter such that
//! SHA-256(`nonce:counter`) starts with `difficulty` zero bits. Its answer
//! goes to [`VERIFY_PATH`]; when it is right, Sentinel sets a cookie, bound
//! to the client's address and valid for `ttl-seconds`, and sends the client
//! back where it was going. A request that carries a valid cookie passes an
//! agent's challenge; one without never does. Nonces and cookies are HMACs
//! under one key, so no state is kept per client.

use std::{
    net::IpAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use sha2::{Digest, Sha256};

use crate::{config::ChallengeConfig, form::percent_decode, proxy::ProxyBody};

/// Where a solved challenge is sent.
pub const VERIFY_PATH: &str = "/.well-known/sentinel-challenge";

/// How long a challenge page's nonce may be answered.
const NONCE_TTL: Duration = Duration::from_secs(300);

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, thiserror::Error)]
pub enum ChallengeError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("secret-file {path} holds {len} bytes; at least 32 are needed")]
    ShortSecret { path: String, len: usize },
    #[error("no randomness for the challenge key: {reason}")]
    Random { reason: String },
}

pub struct Challenges {
    config: ChallengeConfig,
    key: Vec<u8>,
    page: String,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random16() -> Result<[u8; 16], ChallengeError> {
    let mut out = [0u8; 16];
    getrandom::fill(&mut out).map_err(|e| ChallengeError::Random {
        reason: e.to_string(),
    })?;
    Ok(out)
}

/// Leading zero bits of `digest`.
fn zero_bits(digest: &[u8]) -> u32 {
    let mut bits = 0;
    for b in digest {
        if *b == 0 {
            bits += 8;
        } else {
            bits += b.leading_zeros();
            break;
        }
    }
    bits
}

/// Whether `counter` solves `nonce` at `difficulty`.
pub fn solves(nonce: &str, counter: &str, difficulty: u8) -> bool {
    let digest = Sha256::digest(format!("{nonce}:{counter}").as_bytes());
    zero_bits(&digest) >= u32::from(difficulty)
}

/// Finds a solution, as the page's script does (tests and tools).
pub fn solve(nonce: &str, difficulty: u8) -> String {
    (0u64..)
        .map(|n| n.to_string())
        .find(|c| solves(nonce, c, difficulty))
        .unwrap_or_default()
}

fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A return path that stays on this site: absolute path, not `//host`.
fn safe_return(path: &str) -> &str {
    if path.starts_with('/') && !path.starts_with("//") && !path.contains(['\\', '\r', '\n']) {
        path
    } else {
        "/"
    }
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Challenges {
    pub fn new(config: &ChallengeConfig) -> Result<Self, ChallengeError> {
        let key = match &config.secret_file {
            Some(path) => {
                let key = std::fs::read(path).map_err(|source| ChallengeError::Read {
                    what: "secret-file",
                    path: path.display().to_string(),
                    source,
                })?;
                if key.len() < 32 {
                    return Err(ChallengeError::ShortSecret {
                        path: path.display().to_string(),
                        len: key.len(),
                    });
                }
                key
            }
            None => {
                let mut key = random16()?.to_vec();
                key.extend_from_slice(&random16()?);
                key
            }
        };
        let page = match &config.page {
            Some(path) => std::fs::read_to_string(path).map_err(|source| ChallengeError::Read {
                what: "challenge page",
                path: path.display().to_string(),
                source,
            })?,
            None => BUILT_IN_PAGE.to_owned(),
        };
        Ok(Self {
            config: config.clone(),
            key,
            page,
        })
    }

    /// The same key, a new configuration (a reload keeps issued cookies
    /// valid unless the secret file changed).
    pub fn reconfigured(&self, config: &ChallengeConfig) -> Result<Self, ChallengeError> {
        let mut next = Self::new(config)?;
        if config.secret_file.is_none() {
            next.key = self.key.clone();
        }
        Ok(next)
    }

    pub fn config(&self) -> &ChallengeConfig {
        &self.config
    }

    fn mac(&self, parts: &[&[u8]]) -> String {
        // HMAC takes keys of any length.
        let mut mac = match HmacSha256::new_from_slice(&self.key) {
            Ok(m) => m,
            Err(_) => return String::new(),
        };
        for p in parts {
            mac.update(p);
            mac.update(b"|");
        }
        hex(&mac.finalize().into_bytes()[..16])
    }

    fn nonce(&self, client: IpAddr) -> Result<String, ChallengeError> {
        let expires = now_s() + NONCE_TTL.as_secs();
        let random = hex(&random16()?);
        let ip = client.to_string();
        let tag = self.mac(&[
            b"nonce",
            expires.to_string().as_bytes(),
            random.as_bytes(),
            ip.as_bytes(),
        ]);
        Ok(format!("{expires:x}-{random}-{tag}"))
    }

    fn nonce_valid(&self, nonce: &str, client: IpAddr) -> bool {
        let mut parts = nonce.splitn(3, '-');
        let (Some(expires), Some(random), Some(tag)) = (parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        let Ok(expires) = u64::from_str_radix(expires, 16) else {
            return false;
        };
        if expires < now_s() {
            return false;
        }
        let ip = client.to_string();
        let want = self.mac(&[
            b"nonce",
            expires.to_string().as_bytes(),
            random.as_bytes(),
            ip.as_bytes(),
        ]);
        constant_eq(tag.as_bytes(), want.as_bytes())
    }

    fn pass_token(&self, client: IpAddr, expires: u64) -> String {
        let ip = client.to_string();
        let tag = self.mac(&[b"pass", expires.to_string().as_bytes(), ip.as_bytes()]);
        format!("{expires:x}.{tag}")
    }

    /// Whether the request carries a cookie of a challenge this client
    /// passed, still valid.
    pub fn passed(&self, headers: &HeaderMap, client: IpAddr) -> bool {
        let name = &self.config.cookie_name;
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .filter(|(k, _)| k == name)
            .any(|(_, token)| {
                let Some((expires, _)) = token.split_once('.') else {
                    return false;
                };
                let Ok(expires) = u64::from_str_radix(expires, 16) else {
                    return false;
                };
                expires >= now_s()
                    && constant_eq(
                        token.as_bytes(),
                        self.pass_token(client, expires).as_bytes(),
                    )
            })
    }

    /// The challenge page for a request to `target` (path and query).
    pub fn page(
        &self,
        client: IpAddr,
        target: &str,
        challenge_type: &str,
        params: &std::collections::BTreeMap<String, String>,
    ) -> Response<ProxyBody> {
        let nonce = match self.nonce(client) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "cannot issue a challenge");
                return plain(StatusCode::SERVICE_UNAVAILABLE, "challenge unavailable\n");
            }
        };
        let params_json = serde_json::to_string(params).unwrap_or_else(|_| "{}".to_owned());
        let html = self
            .page
            .replace("{{nonce}}", &escape_html(&nonce))
            .replace("{{difficulty}}", &self.config.difficulty.to_string())
            .replace("{{verify_url}}", VERIFY_PATH)
            .replace(
                "{{return}}",
                &escape_html(&percent_encode(safe_return(target))),
            )
            .replace("{{challenge_type}}", &escape_html(challenge_type))
            .replace("{{params}}", &escape_html(&params_json));
        let mut response = Response::new(full(html));
        *response.status_mut() =
            StatusCode::from_u16(self.config.status).unwrap_or(StatusCode::FORBIDDEN);
        let h = response.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Ok(v) = HeaderValue::from_str(challenge_type) {
            h.insert("x-sentinel-challenge", v);
        }
        response
    }

    /// Answers a request to [`VERIFY_PATH`]: a cookie and a redirect back
    /// when the proof is right, the challenge again when it is not.
    pub fn verify(&self, query: &str, client: IpAddr, secure: bool) -> Response<ProxyBody> {
        let nonce = query_param(query, "nonce").unwrap_or_default();
        let solution = query_param(query, "solution").unwrap_or_default();
        let back = query_param(query, "return").unwrap_or_else(|| "/".to_owned());
        let back = safe_return(&back).to_owned();
        let ok = self.nonce_valid(&nonce, client)
            && solution.len() <= 20
            && solves(&nonce, &solution, self.config.difficulty);
        if !ok {
            return self.page(client, &back, "javascript", &Default::default());
        }
        let expires = now_s() + self.config.ttl.as_secs();
        let cookie = format!(
            "{}={}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{}",
            self.config.cookie_name,
            self.pass_token(client, expires),
            self.config.ttl.as_secs(),
            if secure { "; Secure" } else { "" }
        );
        let mut response = Response::new(full(String::new()));
        *response.status_mut() = StatusCode::SEE_OTHER;
        let h = response.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            h.insert(header::SET_COOKIE, v);
        }
        if let Ok(v) = HeaderValue::from_str(&back) {
            h.insert(header::LOCATION, v);
        }
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn full(text: String) -> ProxyBody {
    Full::new(Bytes::from(text))
        .map_err(|never| match never {})
        .boxed()
}

fn plain(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(full(text.to_owned()));
    *response.status_mut() = status;
    response
}

/// The built-in page: a short explanation and a script that solves the
/// proof of work (its own SHA-256, since `crypto.subtle` is missing on
/// plain-HTTP origins) and follows the verify link.
const BUILT_IN_PAGE: &str = include_str!("challenge.html");

#[cfg(test)]
mod tests {
    use super::*;

    fn service(difficulty: u8) -> Challenges {
        Challenges::new(&ChallengeConfig {
            difficulty,
            ..ChallengeConfig::default()
        })
        .unwrap()
    }

    fn extract_nonce(page: &str) -> String {
        let start = page.find("data-nonce=\"").unwrap() + "data-nonce=\"".len();
        page[start..][..page[start..].find('"').unwrap()].to_owned()
    }

    async fn body(r: Response<ProxyBody>) -> String {
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_solved_challenge_sets_a_cookie_for_that_client_only() {
        let s = service(8);
        let client: IpAddr = "203.0.113.5".parse().unwrap();
        let page = s.page(client, "/private?x=1", "javascript", &Default::default());
        assert_eq!(page.status(), StatusCode::FORBIDDEN);
        let html = body(page).await;
        let nonce = extract_nonce(&html);
        let solution = solve(&nonce, 8);
        assert!(solves(&nonce, &solution, 8));

        let wrong = s.verify(
            &format!("nonce={nonce}&solution=x&return=/private"),
            client,
            false,
        );
        assert_eq!(wrong.status(), StatusCode::FORBIDDEN);

        let other: IpAddr = "203.0.113.6".parse().unwrap();
        let stolen = s.verify(&format!("nonce={nonce}&solution={solution}"), other, false);
        assert_eq!(
            stolen.status(),
            StatusCode::FORBIDDEN,
            "nonces are bound to the client"
        );

        let ok = s.verify(
            &format!("nonce={nonce}&solution={solution}&return=%2Fprivate%3Fx%3D1"),
            client,
            true,
        );
        assert_eq!(ok.status(), StatusCode::SEE_OTHER);
        assert_eq!(ok.headers()[header::LOCATION], "/private?x=1");
        let cookie = ok.headers()[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(cookie.ends_with("; Secure"), "{cookie}");
        let pair = cookie.split(';').next().unwrap();

        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("a=b; {pair}")).unwrap(),
        );
        assert!(s.passed(&headers, client));
        assert!(!s.passed(&headers, other));
        assert!(!service(8).passed(&headers, client), "another key");
        let mut forged = HeaderMap::new();
        forged.insert(
            header::COOKIE,
            HeaderValue::from_str("sentinel_challenge=ffffffffff.00").unwrap(),
        );
        assert!(!s.passed(&forged, client));
    }

    #[test]
    fn return_paths_stay_on_site() {
        assert_eq!(safe_return("/a/b?c"), "/a/b?c");
        assert_eq!(safe_return("//evil.example/"), "/");
        assert_eq!(safe_return("https://evil.example/"), "/");
        assert_eq!(safe_return("/\\evil"), "/");
    }
}
