//! The watchlist ops of the admin API: `watch_add`, `watch_remove`,
//! `watch_list`. Same checks and answers as the denylist's, on the
//! sk_lookup program's watchlist (`kernel::steer`).

use super::{
    Added, Entry, Removed, Response,
    server::{SOURCE_ADMIN, entry, failure, success, ttl},
};
use crate::{
    daemon::State,
    kernel::{NewRule, Upsert, clock},
    net::{RuleList, check_reason, validate_prefix},
};

/// Watchlist prefixes are checked as allowlist ones: a /0 watches
/// everything, which only moves traffic to the quarantine listener, but
/// host bits and IPv4-mapped prefixes are refused the same way.
const CHECK_AS: RuleList = RuleList::Allow;

pub(super) fn add(
    state: &State,
    prefix: &str,
    ttl_ms: Option<u64>,
    reason: Option<String>,
) -> Response {
    let checked = validate_prefix(prefix, CHECK_AS)
        .and_then(|p| Ok((p, ttl(state, ttl_ms)?)))
        .and_then(|ok| check_reason(reason.as_deref()).map(|()| ok));
    let (prefix, ttl) = match checked {
        Ok(ok) => ok,
        Err(error) => return failure(error.to_string()),
    };
    let rule = NewRule {
        ttl,
        source: SOURCE_ADMIN.to_owned(),
        reason: reason.unwrap_or_default(),
    };
    let outcome = state.lock_kernel().steering.watch_upsert(&prefix, &rule);
    match outcome {
        Ok(upsert) => success(Added {
            prefix,
            created: upsert == Upsert::Created,
            ttl_seconds: ttl.map(|t| t.as_secs_f64()),
        }),
        Err(error) => failure(error.to_string()),
    }
}

pub(super) fn remove(state: &State, prefix: &str) -> Response {
    let prefix = match validate_prefix(prefix, CHECK_AS) {
        Ok(p) => p,
        Err(error) => return failure(error.to_string()),
    };
    let outcome = state.lock_kernel().steering.watch_remove(&prefix);
    match outcome {
        Ok(true) => success(Removed { prefix }),
        Ok(false) => failure(format!("{prefix} is not in the watchlist")),
        Err(error) => failure(error.to_string()),
    }
}

pub(super) fn list(state: &State) -> Response {
    let listed = state.lock_kernel().steering.watch_entries();
    let now = clock::now_ns();
    match listed {
        Ok(mut entries) => {
            entries.sort_unstable_by_key(|(prefix, _)| *prefix);
            let shown: Vec<Entry> = entries
                .into_iter()
                .filter(|(_, v)| !v.is_expired(now))
                .map(|(prefix, v)| entry(prefix, &v, now))
                .collect();
            success(shown)
        }
        Err(error) => failure(error.to_string()),
    }
}
