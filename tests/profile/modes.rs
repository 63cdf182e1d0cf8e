//! The four operation modes, per route, and a reload that changes them.

use std::time::Duration;

use http::StatusCode;
use sentinel_agent_protocol::{Decision, EventType};
use sentinel_tests::{
    agent::{ScriptAgent, decide, on_events},
    http::{Upstream, get},
};

use super::*;

/// Four routes, one per mode, all through one blocking agent.
fn blocks(app: &Upstream, a: &ScriptAgent, global: &str) -> String {
    let route = |name: &str, mode: &str| {
        let profile = if mode.is_empty() {
            String::new()
        } else {
            format!("profile {{ mode \"{mode}\"; }}")
        };
        format!(
            "    route \"{name}\" {{\n        matches {{ path-prefix \"/{name}/\"; }}\n        upstream \"app\"\n        filters \"waf\"\n        {profile}\n    }}\n"
        )
    };
    format!(
        "listeners {{\n    listener \"http\" {{\n        address \"127.0.0.1:0\"\n    }}\n}}\n\
         routes {{\n{}{}{}{}{}}}\n\
         upstreams {{\n    upstream \"app\" {{\n        targets {{\n            target {{ address \"{}\"; }}\n        }}\n    }}\n}}\n\
         agents {{\n    agent \"waf\" type=\"waf\" {{\n        {}\n        events \"request_headers\"\n    }}\n}}\n\
         filters {{\n    filter \"waf\" {{ type \"agent\"; agent \"waf\"; }}\n}}\n\
         profile {{\n    mode \"{global}\"\n}}\n",
        route("off", "off"),
        route("lite", "lite"),
        route("monitor", "monitor"),
        route("protection", "protection"),
        route("default", ""),
        app.target(),
        unix(a),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mode_per_route_and_by_reload() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let a = ScriptAgent::unix(true, on_events(|_| decide(Decision::block(403)))).await;
    let text = blocks(&app, &a, "protection");
    let d = start(&text);
    let addr = d.listener("http");
    let calls = || a.events(EventType::RequestHeaders).len();

    // off and lite: the agent is never asked; the request goes through.
    assert_eq!(get(addr, "/off/x").await.status, StatusCode::OK);
    assert_eq!(get(addr, "/lite/x").await.status, StatusCode::OK);
    assert_eq!(calls(), 0);
    // monitor: asked, and its block is only recorded.
    assert_eq!(get(addr, "/monitor/x").await.status, StatusCode::OK);
    assert_eq!(calls(), 1);
    // protection (its own, and the global default): enforced.
    assert_eq!(
        get(addr, "/protection/x").await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(get(addr, "/default/x").await.status, StatusCode::FORBIDDEN);
    assert_eq!(calls(), 3);
    assert_eq!(app.seen().len(), 3);
    for (route, enforced, n) in [
        ("monitor", "false", 1.0),
        ("protection", "true", 1.0),
        ("default", "true", 1.0),
    ] {
        assert_eq!(
            metric(
                &d,
                "sentinel_decisions_total",
                &[
                    ("route", route),
                    ("decision", "block"),
                    ("enforced", enforced)
                ]
            ),
            n,
            "{route}"
        );
    }

    // A reload to global monitor: the route without its own mode follows.
    std::fs::write(
        &d.config_path,
        std::fs::read_to_string(&d.config_path)
            .unwrap_or_default()
            .replace(&text, &blocks(&app, &a, "monitor")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    d.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if get(addr, "/default/x").await.status == StatusCode::OK {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the reload did not apply:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        get(addr, "/protection/x").await.status,
        StatusCode::FORBIDDEN,
        "its own mode stays"
    );
}
