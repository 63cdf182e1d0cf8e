//! Decisions and header mutations through the real binary.

use std::{collections::BTreeMap, time::Duration};

use http::StatusCode;
use sentinel_agent_protocol::{
    AgentResponse, Decision, Event, EventType, HeaderOp, RequestHeadersEvent,
};
use sentinel_tests::{
    agent::{Reply, ScriptAgent, decide, on_events, until},
    http::{Upstream, empty, fetch, get},
};
use sha2::{Digest, Sha256};

use super::*;

fn headers_event(e: &Event) -> &RequestHeadersEvent {
    match e {
        Event::RequestHeaders(h) => h,
        other => panic!("not request_headers: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_with_mutations_reaches_the_upstream_and_the_client() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let a = ScriptAgent::unix(
        true,
        on_events(|_| {
            Reply::Answer(AgentResponse {
                request_headers: vec![
                    HeaderOp::Add {
                        name: "X-Agent-Processed".into(),
                        value: "true".into(),
                    },
                    HeaderOp::Set {
                        name: "x-user".into(),
                        value: "alice".into(),
                    },
                    HeaderOp::Remove {
                        name: "x-secret".into(),
                    },
                ],
                response_headers: vec![HeaderOp::Set {
                    name: "x-checked-by".into(),
                    value: "echo".into(),
                }],
                ..AgentResponse::allow()
            })
        }),
    )
    .await;
    let d = daemon(
        &app,
        &["f"],
        &[agent(
            "echo",
            "custom",
            &unix(&a),
            "events \"request_headers\"\n        config { greeting \"hi\"; level 2; }",
        )],
        &[filter("f", "echo", "")],
        "",
    );
    let addr = d.listener("http");
    let reply = fetch(
        addr,
        "GET",
        "/users?id=7",
        &[("x-secret", "s3"), ("x-user", "mallory")],
        empty(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", d.log());
    assert_eq!(reply.header("x-checked-by"), Some("echo"));
    let seen = app.last();
    assert_eq!(seen.header("x-agent-processed"), Some("true"));
    assert_eq!(seen.header("x-user"), Some("alice"));
    assert_eq!(seen.header("x-secret"), None);

    // The handshake came first, with the agent's config block.
    let first = &a.seen()[0];
    match &first.event {
        Event::Configure(c) => {
            assert_eq!(c.agent_id, "echo");
            assert_eq!(c.config, serde_json::json!({"greeting": "hi", "level": 2}));
        }
        other => panic!("first event was not configure: {other:?}"),
    }
    let events = a.events(EventType::RequestHeaders);
    assert_eq!(events.len(), 1);
    let h = headers_event(&events[0]);
    assert_eq!(h.method, "GET");
    assert_eq!(h.uri, "/users?id=7");
    assert_eq!(h.metadata.client_ip, "127.0.0.1");
    assert_eq!(h.metadata.route_id.as_deref(), Some("app"));
    assert_eq!(h.metadata.upstream_id.as_deref(), Some("app"));
    assert_eq!(h.headers["x-secret"], ["s3"]);
    assert_eq!(
        Some(h.metadata.request_id.as_str()),
        reply.header("x-request-id")
    );
    assert!(!h.metadata.correlation_id.is_empty());
    assert_eq!(
        metric(
            &d,
            "sentinel_agent_requests_total",
            &[("agent", "echo"), ("status", "success")]
        ),
        1.0
    );
}

/// The page's nonce, from `data-nonce="..."`.
fn nonce_of(page: &str) -> String {
    let start = page
        .find("data-nonce=\"")
        .unwrap_or_else(|| panic!("no nonce in {page}"))
        + "data-nonce=\"".len();
    page[start..][..page[start..].find('"').unwrap_or(0)].to_owned()
}

/// The proof of work the page's script does.
fn solve(nonce: &str, difficulty: u32) -> String {
    (0u64..)
        .find(|n| {
            let d = Sha256::digest(format!("{nonce}:{n}").as_bytes());
            let mut bits = 0;
            for b in d.iter() {
                if *b == 0 {
                    bits += 8;
                } else {
                    bits += b.leading_zeros();
                    break;
                }
            }
            bits >= difficulty
        })
        .map(|n| n.to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_redirect_and_a_real_challenge() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let a = ScriptAgent::unix(
        false,
        on_events(|r| {
            let Event::RequestHeaders(h) = &r.event else {
                return decide(Decision::Allow);
            };
            match h.uri.as_str() {
                "/block" => decide(Decision::Block {
                    status: 451,
                    body: Some("not here\n".into()),
                    headers: BTreeMap::from([("x-why".into(), "policy".into())]),
                }),
                "/redirect" => decide(Decision::Redirect {
                    url: "https://login.example/".into(),
                    status: 307,
                }),
                u if u.starts_with("/challenge") => decide(Decision::Challenge {
                    challenge_type: "javascript".into(),
                    params: BTreeMap::from([("reason".into(), "new client".into())]),
                }),
                _ => decide(Decision::Allow),
            }
        }),
    )
    .await;
    let d = daemon(
        &app,
        &["f"],
        &[agent(
            "gate",
            "waf",
            &unix(&a),
            "events \"request_headers\"",
        )],
        &[filter("f", "gate", "")],
        "waf {\n    challenge { difficulty 8; }\n}\n",
    );
    let addr = d.listener("http");

    let r = get(addr, "/block").await;
    assert_eq!(r.status.as_u16(), 451);
    assert_eq!(r.text(), "not here\n");
    assert_eq!(r.header("x-why"), Some("policy"));
    let r = get(addr, "/redirect").await;
    assert_eq!(r.status.as_u16(), 307);
    assert_eq!(r.header("location"), Some("https://login.example/"));

    // A challenge never lets the request through by itself.
    let page = get(addr, "/challenge?x=1").await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    assert_eq!(page.header("x-sentinel-challenge"), Some("javascript"));
    assert!(page.text().contains("new client"), "params are on the page");
    assert_eq!(app.seen().len(), 0, "nothing reached the upstream");

    // Solving it gives a cookie; with the cookie the request passes.
    let nonce = nonce_of(&page.text());
    let solution = solve(&nonce, 8);
    let verify = get(
        addr,
        &format!("/.well-known/sentinel-challenge?nonce={nonce}&solution={solution}&return=%2Fchallenge%3Fx%3D1"),
    )
    .await;
    assert_eq!(verify.status, StatusCode::SEE_OTHER);
    assert_eq!(verify.header("location"), Some("/challenge?x=1"));
    let cookie = verify
        .header("set-cookie")
        .unwrap_or_else(|| panic!("no cookie: {:?}", verify.headers))
        .split(';')
        .next()
        .unwrap_or_default()
        .to_owned();
    let passed = fetch(
        addr,
        "GET",
        "/challenge?x=1",
        &[("cookie", &cookie)],
        empty(),
    )
    .await;
    assert_eq!(passed.status, StatusCode::OK, "{}", d.log());
    assert_eq!(app.seen().len(), 1);

    // A wrong solution or a forged cookie does not.
    let wrong = get(
        addr,
        &format!("/.well-known/sentinel-challenge?nonce={nonce}&solution=nope"),
    )
    .await;
    assert_eq!(wrong.status, StatusCode::FORBIDDEN);
    let forged = fetch(
        addr,
        "GET",
        "/challenge",
        &[(
            "cookie",
            "sentinel_challenge=7fffffff.0123456789abcdef0123456789abcdef",
        )],
        empty(),
    )
    .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    assert_eq!(app.seen().len(), 1);
    for (decision, n) in [("block", 1.0), ("redirect", 1.0), ("challenge", 2.0)] {
        assert_eq!(
            metric(
                &d,
                "sentinel_decisions_total",
                &[
                    ("route", "app"),
                    ("decision", decision),
                    ("enforced", "true")
                ]
            ),
            n,
            "{decision}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_block_wins_and_mutations_accumulate() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let first = ScriptAgent::unix(
        true,
        on_events(|_| {
            Reply::Answer(AgentResponse {
                request_headers: vec![HeaderOp::Set {
                    name: "x-first".into(),
                    value: "1".into(),
                }],
                ..AgentResponse::allow()
            })
        }),
    )
    .await;
    let second = ScriptAgent::unix(
        true,
        on_events(|r| {
            let Event::RequestHeaders(h) = &r.event else {
                return decide(Decision::Allow);
            };
            // It sees what the first agent did.
            assert_eq!(h.headers.get("x-first").map(|v| v[0].as_str()), Some("1"));
            if h.uri == "/stop" {
                decide(Decision::block(403))
            } else {
                Reply::Answer(AgentResponse {
                    request_headers: vec![HeaderOp::Add {
                        name: "x-second".into(),
                        value: "2".into(),
                    }],
                    ..AgentResponse::allow()
                })
            }
        }),
    )
    .await;
    let third = ScriptAgent::unix(true, on_events(|_| decide(Decision::Allow))).await;
    let d = daemon(
        &app,
        &["one", "two", "three"],
        &[
            agent("first", "auth", &unix(&first), "events \"request_headers\""),
            agent(
                "second",
                "waf",
                &unix(&second),
                "events \"request_headers\"",
            ),
            agent(
                "third",
                "custom",
                &unix(&third),
                "events \"request_headers\"",
            ),
        ],
        &[
            filter("one", "first", ""),
            filter("two", "second", ""),
            filter("three", "third", ""),
        ],
        "",
    );
    let addr = d.listener("http");
    let r = get(addr, "/go").await;
    assert_eq!(r.status, StatusCode::OK, "{}", d.log());
    let seen = app.last();
    assert_eq!(seen.header("x-first"), Some("1"));
    assert_eq!(seen.header("x-second"), Some("2"));
    assert_eq!(third.events(EventType::RequestHeaders).len(), 1);

    let r = get(addr, "/stop").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(
        third.events(EventType::RequestHeaders).len(),
        1,
        "agents after a block are not called"
    );
    assert_eq!(app.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_response_phase_mutates_and_blocks() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let a = ScriptAgent::unix(
        true,
        on_events(|r| match &r.event {
            Event::ResponseHeaders(h) if h.status >= 500 => decide(Decision::Block {
                status: 502,
                body: Some("upstream trouble hidden\n".into()),
                headers: BTreeMap::new(),
            }),
            Event::ResponseHeaders(h) => {
                assert!(h.headers.contains_key("x-upstream"));
                Reply::Answer(AgentResponse {
                    response_headers: vec![
                        HeaderOp::Set {
                            name: "x-frame-options".into(),
                            value: "DENY".into(),
                        },
                        HeaderOp::Remove {
                            name: "x-upstream".into(),
                        },
                    ],
                    ..AgentResponse::allow()
                })
            }
            _ => decide(Decision::Allow),
        }),
    )
    .await;
    let d = daemon(
        &app,
        &["out"],
        &[agent(
            "shield",
            "custom",
            &unix(&a),
            "events \"request_headers\" \"response_headers\"",
        )],
        &[filter("out", "shield", "phase \"response\"")],
        "",
    );
    let addr = d.listener("http");
    let r = get(addr, "/page").await;
    assert_eq!(r.status, StatusCode::OK, "{}", d.log());
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    assert_eq!(r.header("x-upstream"), None);
    // Phase "response": the agent never got the request's headers.
    assert!(a.events(EventType::RequestHeaders).is_empty());

    let r = get(addr, "/page?status=500").await;
    assert_eq!(r.status.as_u16(), 502);
    assert_eq!(r.text(), "upstream trouble hidden\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_complete_reaches_log_agents_without_delaying_anyone() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let gate = ScriptAgent::unix(
        true,
        on_events(|r| match &r.event {
            Event::RequestHeaders(h) if h.uri == "/deny" => decide(Decision::block(403)),
            _ => decide(Decision::Allow),
        }),
    )
    .await;
    // A slow log agent: the client must not wait for it.
    let log = ScriptAgent::unix(
        true,
        on_events(|_| Reply::After(Duration::from_millis(400), AgentResponse::allow())),
    )
    .await;
    let d = daemon(
        &app,
        &["gate", "log"],
        &[
            agent("gate", "waf", &unix(&gate), "events \"request_headers\""),
            agent(
                "analytics",
                "custom",
                &unix(&log),
                "events \"log\"\n        timeout-ms 2000",
            ),
        ],
        &[filter("gate", "gate", ""), filter("log", "analytics", "")],
        "",
    );
    let addr = d.listener("http");
    let started = std::time::Instant::now();
    let r = fetch(
        addr,
        "POST",
        "/things",
        &[],
        sentinel_tests::http::body("0123456789"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_millis(350),
        "the log agent delayed the client"
    );
    let r = get(addr, "/deny").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    until(
        Duration::from_secs(5),
        "two request_complete events",
        || log.events(EventType::RequestComplete).len() == 2,
    )
    .await;
    let mut done: Vec<_> = log
        .events(EventType::RequestComplete)
        .into_iter()
        .map(|e| match e {
            Event::RequestComplete(c) => c,
            other => panic!("{other:?}"),
        })
        .collect();
    done.sort_by_key(|c| c.status);
    assert_eq!(done[0].status, 200);
    assert_eq!(done[0].request_body_size, 10);
    assert!(done[0].response_body_size > 0);
    assert_eq!(done[0].upstream_attempts, 1);
    assert_eq!(
        done[0].metadata.as_ref().map(|m| m.route_id.clone()),
        Some(Some("app".into()))
    );
    assert_eq!(done[1].status, 403);
    assert_eq!(done[1].decisions.len(), 1);
    assert_eq!(done[1].decisions[0].agent, "gate");
    assert_eq!(done[1].decisions[0].decision, "block");
    assert!(done[1].decisions[0].enforced);
    // The log agent only ever got log events.
    assert!(log.events(EventType::RequestHeaders).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_mode_records_decisions_and_never_enforces_them() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let a = ScriptAgent::unix(true, on_events(|_| decide(Decision::block(403)))).await;
    let d = daemon(
        &app,
        &["f"],
        &[agent("waf", "waf", &unix(&a), "events \"request_headers\"")],
        &[filter("f", "waf", "")],
        "profile {\n    mode \"monitor\"\n}\n",
    );
    let r = get(d.listener("http"), "/attack").await;
    assert_eq!(r.status, StatusCode::OK, "monitor mode must not block");
    assert_eq!(app.seen().len(), 1);
    assert_eq!(
        metric(
            &d,
            "sentinel_decisions_total",
            &[
                ("route", "app"),
                ("decision", "block"),
                ("enforced", "false")
            ]
        ),
        1.0
    );
}
