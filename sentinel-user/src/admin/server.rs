//! The daemon side of the admin API.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::watch,
};
use tracing::{debug, warn};

use super::{
    Added, Entry, ImportResult, MAX_REQUEST_BYTES, Ready, Removed, Request, Response, Stats, packed,
};
use crate::{
    daemon::State,
    kernel::{KernelError, NewRule, Upsert, clock, rules},
    net::{InputError, RuleList, check_reason, check_ttl, validate_prefix},
};

/// A connection with no complete request for this long is closed, so that
/// forgotten clients do not hold descriptors forever.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Source recorded on entries written through the admin API.
pub const SOURCE_ADMIN: &str = "admin";

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("another sentinel daemon is serving the admin socket {path}", path = .path.display())]
    InUse { path: PathBuf },
    #[error("cannot bind the admin socket {path}: {source}", path = .path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the admin socket with mode 0600, replacing a stale socket file
/// left by a daemon that died, but never one that a live daemon serves.
pub fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    let bind_err = |source| AdminError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(bind_err)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(AdminError::InUse {
                path: path.to_owned(),
            });
        }
        fs::remove_file(path).map_err(bind_err)?;
    }
    // Create the socket file without group or other permissions from the
    // start, rather than tightening it after a window in which anyone on the
    // host could connect.
    // SAFETY: umask only changes this process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = listener.map_err(bind_err)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}

/// Accepts connections until `shutdown` turns true.
pub async fn serve(listener: UnixListener, state: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(connection(stream, state.clone()));
                }
                Err(error) => {
                    warn!(%error, "admin socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = shutdown.changed() => break,
        }
    }
}

async fn connection(stream: UnixStream, state: Arc<State>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let limit = MAX_REQUEST_BYTES as u64 + 1;
        let mut bounded = (&mut reader).take(limit);
        let read = bounded.read_until(b'\n', &mut line);
        let n = match tokio::time::timeout(IDLE_TIMEOUT, read).await {
            Ok(Ok(n)) => n,
            Ok(Err(error)) => {
                debug!(%error, "admin connection read failed");
                return;
            }
            Err(_) => {
                debug!("admin connection idle for {IDLE_TIMEOUT:?}; closed");
                return;
            }
        };
        if n == 0 {
            return;
        }
        let response = if line.len() > MAX_REQUEST_BYTES {
            // The rest of the line cannot be resynchronised: answer, close.
            let response = failure(format!(
                "request larger than {MAX_REQUEST_BYTES} bytes; split it"
            ));
            let _ = write_response(&mut write, &response).await;
            return;
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(Request::ImportPacked {
                    list,
                    v4,
                    v6,
                    ttl_ms,
                    reason,
                }) => {
                    let header = PackedHeader {
                        list,
                        v4,
                        v6,
                        ttl_ms,
                        reason,
                    };
                    match import_packed(&state, header, &mut reader, &mut write).await {
                        Ok(response) => response,
                        // The body was not read whole: the stream cannot
                        // be resynchronised.
                        Err(response) => {
                            let _ = write_response(&mut write, &response).await;
                            return;
                        }
                    }
                }
                Ok(request) => {
                    let state = state.clone();
                    tokio::task::spawn_blocking(move || handle(&state, request))
                        .await
                        .unwrap_or_else(|e| failure(format!("internal error: {e}")))
                }
                Err(error) => failure(format!("bad request: {error}")),
            }
        };
        if write_response(&mut write, &response).await.is_err() {
            return;
        }
    }
}

/// The request line of an `import_packed`.
struct PackedHeader {
    list: RuleList,
    v4: u32,
    v6: u32,
    ttl_ms: Option<u64>,
    reason: Option<String>,
}

/// Serves an `import_packed`: checks the request line, asks for the body,
/// reads it whole, then checks every record and imports them at once.
/// `Err` when the connection must be closed after the answer (the body was
/// announced but not read).
async fn import_packed(
    state: &Arc<State>,
    header: PackedHeader,
    reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    write: &mut tokio::net::unix::OwnedWriteHalf,
) -> Result<Response, Response> {
    let PackedHeader {
        list,
        v4,
        v6,
        ttl_ms,
        reason,
    } = header;
    // Refused before the body is sent: nothing to skip, the connection
    // stays usable.
    let rule = match packed::body_len(v4, v6)
        .map_err(|e| e.to_string())
        .and_then(|len| new_rule(state, ttl_ms, reason).map(|rule| (len, rule)))
    {
        Ok(ok) => ok,
        Err(error) => {
            state.metrics.update(list, SOURCE_ADMIN, "invalid", 1);
            return Ok(failure(error));
        }
    };
    let (body_bytes, rule) = rule;
    if write_response(write, &success(Ready { body_bytes }))
        .await
        .is_err()
    {
        return Err(failure("cannot answer the request line"));
    }
    let mut body = vec![0u8; body_bytes];
    match tokio::time::timeout(IDLE_TIMEOUT, reader.read_exact(&mut body)).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => return Err(failure(format!("cannot read the body: {error}"))),
        Err(_) => return Err(failure("no complete body within the idle timeout")),
    }
    let state = state.clone();
    Ok(tokio::task::spawn_blocking(move || {
        match packed::decode(v4, v6, &body, list) {
            Ok(prefixes) => {
                // The body is no longer needed while the maps are written.
                drop(body);
                apply_import(&state, list, &prefixes, &rule)
            }
            Err(error) => {
                state.metrics.update(list, SOURCE_ADMIN, "invalid", 1);
                failure(error.to_string())
            }
        }
    })
    .await
    .unwrap_or_else(|e| failure(format!("internal error: {e}"))))
}

async fn write_response(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    response: &Response,
) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(response).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    bytes.push(b'\n');
    write.write_all(&bytes).await
}

pub(super) fn failure(error: impl Into<String>) -> Response {
    Response {
        ok: false,
        error: Some(error.into()),
        result: None,
    }
}

pub(super) fn success(result: impl serde::Serialize) -> Response {
    match serde_json::value::to_raw_value(&result) {
        Ok(value) => Response {
            ok: true,
            error: None,
            result: Some(value),
        },
        Err(e) => failure(format!("internal error: {e}")),
    }
}

/// The TTL to apply: the requested one checked against the maximum, or the
/// configured default.
pub(super) fn ttl(state: &State, ttl_ms: Option<u64>) -> Result<Option<Duration>, InputError> {
    let policy = state.ttl_policy();
    match ttl_ms {
        Some(ms) => {
            let ttl = Duration::from_millis(ms);
            check_ttl(ttl, policy.max)?;
            Ok(Some(ttl))
        }
        None => Ok(policy.default),
    }
}

/// Serves one request. Runs on a blocking thread: map operations are
/// syscalls.
pub fn handle(state: &State, request: Request) -> Response {
    match request {
        Request::Add {
            list,
            prefix,
            ttl_ms,
            reason,
        } => add(state, list, &prefix, ttl_ms, reason),
        Request::Import {
            list,
            prefixes,
            ttl_ms,
            reason,
        } => import(state, list, &prefixes, ttl_ms, reason),
        // Its body follows on the connection, which serves it.
        Request::ImportPacked { .. } => {
            failure("import_packed is served on a connection, with its body")
        }
        Request::Remove { list, prefix } => remove(state, list, &prefix),
        Request::List { list } => entries(state, list),
        Request::WatchAdd {
            prefix,
            ttl_ms,
            reason,
        } => super::watch::add(state, &prefix, ttl_ms, reason),
        Request::WatchRemove { prefix } => super::watch::remove(state, &prefix),
        Request::WatchList {} => super::watch::list(state),
        Request::Status {} => success(
            state
                .status
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        ),
        Request::Stats {} => {
            let kernel = state.lock_kernel();
            success(Stats {
                interfaces: kernel.stats(),
                denylist_entries: kernel.tables.count(RuleList::Deny),
                allowlist_entries: kernel.tables.count(RuleList::Allow),
            })
        }
    }
}

fn add(
    state: &State,
    list: RuleList,
    prefix: &str,
    ttl_ms: Option<u64>,
    reason: Option<String>,
) -> Response {
    let checked = validate_prefix(prefix, list)
        .and_then(|p| Ok((p, ttl(state, ttl_ms)?)))
        .and_then(|ok| check_reason(reason.as_deref()).map(|()| ok));
    let (prefix, ttl) = match checked {
        Ok(ok) => ok,
        Err(error) => {
            state.metrics.update(list, SOURCE_ADMIN, "invalid", 1);
            return failure(error.to_string());
        }
    };
    let rule = NewRule {
        ttl,
        source: SOURCE_ADMIN.to_owned(),
        reason: reason.unwrap_or_default(),
    };
    let mut kernel = state.lock_kernel();
    let outcome = kernel.tables.upsert(list, &prefix, &rule);
    state.metrics.set_entries(&kernel.tables);
    drop(kernel);
    match outcome {
        Ok(upsert) => {
            let created = upsert == Upsert::Created;
            state.metrics.update(
                list,
                SOURCE_ADMIN,
                if created { "added" } else { "replaced" },
                1,
            );
            success(Added {
                prefix,
                created,
                ttl_seconds: ttl.map(|t| t.as_secs_f64()),
            })
        }
        Err(error) => {
            state
                .metrics
                .update(list, SOURCE_ADMIN, result_label(&error), 1);
            failure(error.to_string())
        }
    }
}

fn import(
    state: &State,
    list: RuleList,
    prefixes: &[String],
    ttl_ms: Option<u64>,
    reason: Option<String>,
) -> Response {
    // All or nothing on input: one bad line and nothing is written.
    let mut parsed: Vec<IpNet> = Vec::with_capacity(prefixes.len());
    for (n, text) in prefixes.iter().enumerate() {
        match validate_prefix(text, list) {
            Ok(p) => parsed.push(p),
            Err(error) => {
                state.metrics.update(list, SOURCE_ADMIN, "invalid", 1);
                return failure(format!("entry {}: {error}", n + 1));
            }
        }
    }
    let rule = match new_rule(state, ttl_ms, reason) {
        Ok(rule) => rule,
        Err(error) => {
            state.metrics.update(list, SOURCE_ADMIN, "invalid", 1);
            return failure(error);
        }
    };
    apply_import(state, list, &parsed, &rule)
}

/// The rule an import writes: its TTL and reason checked.
fn new_rule(state: &State, ttl_ms: Option<u64>, reason: Option<String>) -> Result<NewRule, String> {
    let ttl = ttl(state, ttl_ms)
        .and_then(|t| check_reason(reason.as_deref()).map(|()| t))
        .map_err(|e| e.to_string())?;
    Ok(NewRule {
        ttl,
        source: SOURCE_ADMIN.to_owned(),
        reason: reason.unwrap_or_default(),
    })
}

/// Writes checked prefixes and answers with what happened, counting it.
fn apply_import(state: &State, list: RuleList, parsed: &[IpNet], rule: &NewRule) -> Response {
    let mut kernel = state.lock_kernel();
    let imported = kernel.tables.import(list, parsed, rule);
    state.metrics.set_entries(&kernel.tables);
    drop(kernel);
    state
        .metrics
        .update(list, SOURCE_ADMIN, "added", imported.created as u64);
    state
        .metrics
        .update(list, SOURCE_ADMIN, "replaced", imported.replaced as u64);
    match imported.stopped {
        None => success(ImportResult {
            created: imported.created,
            replaced: imported.replaced,
        }),
        Some(error) => {
            let written = imported.created + imported.replaced;
            state.metrics.update(
                list,
                SOURCE_ADMIN,
                result_label(&error),
                (parsed.len() - written) as u64,
            );
            failure(format!(
                "{error} ({written} of {} entries written before it)",
                parsed.len()
            ))
        }
    }
}

fn remove(state: &State, list: RuleList, prefix: &str) -> Response {
    let prefix = match validate_prefix(prefix, list) {
        Ok(p) => p,
        Err(error) => {
            state.metrics.update(list, SOURCE_ADMIN, "invalid", 1);
            return failure(error.to_string());
        }
    };
    let mut kernel = state.lock_kernel();
    let outcome = kernel.tables.remove(list, &prefix);
    state.metrics.set_entries(&kernel.tables);
    drop(kernel);
    match outcome {
        Ok(true) => {
            state.metrics.update(list, SOURCE_ADMIN, "removed", 1);
            success(Removed { prefix })
        }
        Ok(false) => {
            state.metrics.update(list, SOURCE_ADMIN, "not_found", 1);
            failure(format!("{prefix} is not in the {list}"))
        }
        Err(error) => {
            state.metrics.update(list, SOURCE_ADMIN, "error", 1);
            failure(error.to_string())
        }
    }
}

fn entries(state: &State, list: RuleList) -> Response {
    let kernel = state.lock_kernel();
    let listed = kernel.tables.entries(list);
    drop(kernel);
    let now = clock::now_ns();
    match listed {
        Ok(mut entries) => success({
            // Maps iterate in hash order; operators read prefixes in order.
            entries.sort_unstable_by_key(|(prefix, _)| *prefix);
            entries
                .into_iter()
                .filter(|(_, v)| !v.is_expired(now))
                .map(|(prefix, v)| entry(prefix, &v, now))
                .collect::<Vec<_>>()
        }),
        Err(error) => failure(error.to_string()),
    }
}

/// How `list` shows one entry, live at `now` (`CLOCK_MONOTONIC_COARSE`).
pub(super) fn entry(prefix: IpNet, v: &sentinel_common::RuleValue, now: u64) -> Entry {
    Entry {
        prefix,
        source: rules::text(&v.source),
        reason: rules::text(&v.reason),
        ttl_remaining_seconds: (v.expires_at_ns != 0)
            .then(|| v.expires_at_ns.saturating_sub(now) as f64 / 1e9),
        hits: v.hits,
        last_hit: (v.last_hit_ns != 0)
            .then(|| humantime::format_rfc3339_seconds(clock::to_wall(v.last_hit_ns)).to_string()),
        created: humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + Duration::from_secs(v.created_at_unix_s),
        )
        .to_string(),
    }
}

/// The `result` label of `sentinel_denylist_updates_total` for an error.
pub fn result_label(error: &KernelError) -> &'static str {
    match error {
        KernelError::Full { .. } => "full",
        _ => "error",
    }
}
