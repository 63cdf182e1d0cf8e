//! Active health checks: every interval, an HTTP GET of the check path on
//! each target; a target leaves after `unhealthy-threshold` consecutive
//! failures and returns after `healthy-threshold` consecutive successes.

use std::{sync::Weak, time::Duration};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Empty};
use tracing::debug;

use super::upstream::Upstream;

/// Probes `upstream`'s targets until the upstream is dropped (a reload
/// replaced or removed it).
pub async fn run(upstream: Weak<Upstream>) {
    let Some(interval) = upstream
        .upgrade()
        .and_then(|u| u.config.health_check.as_ref().map(|c| c.interval))
    else {
        return;
    };
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(u) = upstream.upgrade() else {
            return;
        };
        let Some(check) = u.config.health_check.clone() else {
            return;
        };
        let probes = (0..u.targets.len()).map(|i| {
            let u = u.clone();
            let check = check.clone();
            async move {
                let ok = probe(&u, i, &check.path, check.expected_status, check.timeout).await;
                u.record_check(i, ok);
            }
        });
        futures_join_all(probes).await;
    }
}

async fn probe(u: &Upstream, index: usize, path: &str, expected: u16, timeout: Duration) -> bool {
    let target = &u.targets[index];
    let uri = format!("{}{}", target.base, path);
    let request = match Request::builder()
        .method(Method::GET)
        .uri(&uri)
        .header(http::header::USER_AGENT, "sentinel-health-check")
        .body(
            Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed(),
        ) {
        Ok(r) => r,
        Err(error) => {
            debug!(%uri, %error, "health check request cannot be built");
            return false;
        }
    };
    match tokio::time::timeout(timeout, u.client.request(request)).await {
        Ok(Ok(response)) => {
            let ok = response.status().as_u16() == expected;
            // Read the body so the connection goes back to the pool.
            let _ = tokio::time::timeout(timeout, response.into_body().collect()).await;
            if !ok {
                debug!(upstream = %u.name, target = %target.address, "health check got an unexpected status");
            }
            ok
        }
        Ok(Err(error)) => {
            debug!(upstream = %u.name, target = %target.address, %error, "health check failed");
            false
        }
        Err(_) => {
            debug!(upstream = %u.name, target = %target.address, "health check timed out");
            false
        }
    }
}

/// Runs the probes of one round together.
async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(
    probes: impl Iterator<Item = F>,
) {
    let mut set = tokio::task::JoinSet::new();
    for p in probes {
        set.spawn(p);
    }
    while set.join_next().await.is_some() {}
}
