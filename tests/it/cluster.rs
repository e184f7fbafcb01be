//! Cluster mode (SPEC 9): several real `easel serve` processes on one real Redis
//! (`redis-server` started by the test on a free loopback port), clients of one session on
//! different nodes.

use std::time::Duration;

use crate::support::*;
use serde_json::{json, Value};

/// The nodes of a scenario, whatever Redis is behind them.
struct Cluster0<'a> {
    nodes: &'a [TestServer],
}

/// Redis and `n` nodes on it.
struct Cluster {
    redis: RedisServer,
    nodes: Vec<TestServer>,
}

/// A node on `redis`, trusting its CA if it speaks TLS.
fn node(redis: &RedisServer, name: &str) -> TestServer {
    node_with(redis, name, Vec::new())
}

/// [`node`] with more environment.
fn node_with(redis: &RedisServer, name: &str, more: Vec<(String, String)>) -> TestServer {
    let mut env = vec![("EASEL_NODE_ID".into(), name.into())];
    if let Some(ca) = redis.ca_file() {
        env.push(("SSL_CERT_FILE".into(), ca.display().to_string()));
    }
    env.extend(more);
    TestServer::start_opts(
        "",
        StartOpts {
            args: vec!["--redis".into(), redis.url()],
            env,
            data_dir: None,
        },
    )
}

fn cluster(n: usize) -> Cluster {
    let redis = RedisServer::start();
    let nodes = (0..n).map(|i| node(&redis, &format!("node{i}"))).collect();
    Cluster { redis, nodes }
}

/// `n` nodes on a three-shard Redis Cluster (`cluster.redis_cluster_nodes`).
/// Over TLS, each node trusts the cluster's CA and shows its client certificate.
fn on_redis_cluster(shards: &RedisClusterServer, n: usize) -> Vec<TestServer> {
    let seeds: Vec<String> = shards.urls().iter().map(|u| format!("{u:?}")).collect();
    let mut config = format!("[cluster]\nredis_cluster_nodes = [{}]\n", seeds.join(", "));
    if let Some((cert, key)) = shards.client_certificate() {
        config += &format!("redis_tls_cert = {:?}\nredis_tls_key = {:?}\n", cert, key);
    }
    (0..n)
        .map(|i| {
            let mut env = vec![("EASEL_NODE_ID".into(), format!("shard-node{i}"))];
            if let Some(ca) = shards.ca_file() {
                env.push(("SSL_CERT_FILE".into(), ca.display().to_string()));
            }
            TestServer::start_opts(
                &config,
                StartOpts {
                    env,
                    ..Default::default()
                },
            )
        })
        .collect()
}

const SLOW: Duration = Duration::from_secs(15);

fn participant_ids(v: &Value) -> Vec<String> {
    let mut ids: Vec<String> = v["participants"]
        .as_array()
        .unwrap_or_else(|| panic!("no participants in {v}"))
        .iter()
        .filter_map(|p| p["id"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn clients_on_three_nodes_converge_and_a_late_joiner_on_another_node_gets_everything() {
    let c = cluster(3);
    converge_across(&c.nodes, &session_id("cl-converge")).await;
}

/// Writers on nodes 0 and 1 converge; a late joiner on node 2 gets it all and is heard.
async fn converge_across(nodes: &[TestServer], s: &str) {
    let s = s.to_owned();
    let c = Cluster0 { nodes };
    let mut a = c.nodes[0].wb_user(&s, "alice").await;
    let mut b = c.nodes[1].wb_user(&s, "bob").await;
    a.map_set("m", "from_a", "1").await;
    b.map_set("m", "from_b", "2").await;
    a.text_push("t", "hello").await;
    b.change(|d| {
        let arr = d.get_or_insert_array("arr");
        let mut txn = yrs::Transact::transact_mut(d);
        yrs::Array::push_back(&arr, &mut txn, "item");
    })
    .await;
    let both = |c: &WbClient| {
        c.map_get("m", "from_a").as_deref() == Some("1")
            && c.map_get("m", "from_b").as_deref() == Some("2")
            && c.text("t") == "hello"
    };
    a.wait_doc("a sees b's writes through Redis", both).await;
    b.wait_doc("b sees a's writes through Redis", both).await;

    // A late joiner on the third node loads the board from Redis (stream + versions).
    let mut late = c.nodes[2].wb_user(&s, "carol").await;
    late.wait_doc("the late joiner on node 2 has both writers' content", both)
        .await;
    late.map_set("m", "from_c", "3").await;
    a.wait_doc("a sees the late joiner's write", |c| {
        c.map_get("m", "from_c").as_deref() == Some("3")
    })
    .await;
}

/// `rediss://` (SPEC 9): nodes reach Redis over TLS, trusting its CA through the system's
/// trust store (`SSL_CERT_FILE`), and boards converge across them as over `redis://`.
#[tokio::test]
async fn nodes_on_a_tls_redis_converge() {
    let redis = RedisServer::start_tls();
    let nodes: Vec<TestServer> = (0..3)
        .map(|i| node(&redis, &format!("tls-node{i}")))
        .collect();
    converge_across(&nodes, &session_id("cl-tls")).await;
}

/// Without the CA, a node cannot verify Redis's certificate: it does not become ready.
#[tokio::test]
async fn a_node_that_does_not_trust_the_redis_certificate_is_not_ready() {
    let redis = RedisServer::start_tls();
    let node = TestServer::start_opts(
        "",
        StartOpts {
            args: vec!["--redis".into(), redis.url()],
            env: vec![("EASEL_NODE_ID".into(), "untrusting".into())],
            data_dir: None,
        },
    );
    let ready = node.http_get("/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    // "invalid peer certificate: UnknownIssuer" (or, on a machine with no trust store at
    // all, the error loading it).
    eventually("the node says why: Redis's certificate", SLOW, || async {
        let log = node.stderr_text().to_lowercase();
        (log.contains("redis cannot be reached") && log.contains("cert")).then_some(())
    })
    .await;
}

/// A Redis that asks for client certificates (`tls-auth-clients yes`): nodes that show one
/// (`EASEL_REDIS_TLS_CERT`, `EASEL_REDIS_TLS_KEY`) are ready and converge; a node that
/// shows none is refused by Redis's handshake and stays unready.
#[tokio::test]
async fn nodes_show_a_client_certificate_to_a_redis_that_asks_for_one() {
    let redis = RedisServer::start_tls_client_auth();
    let (cert, key) = redis.client_certificate().expect("a TLS Redis");
    let identity = vec![
        (
            "EASEL_REDIS_TLS_CERT".to_string(),
            cert.display().to_string(),
        ),
        ("EASEL_REDIS_TLS_KEY".to_string(), key.display().to_string()),
    ];
    let nodes: Vec<TestServer> = (0..3)
        .map(|i| node_with(&redis, &format!("mtls-node{i}"), identity.clone()))
        .collect();
    for node in &nodes {
        eventually(
            "a node with a client certificate is ready",
            SLOW,
            || async { (node.http_get("/readyz").await.status == 200).then_some(()) },
        )
        .await;
    }
    converge_across(&nodes, &session_id("cl-mtls")).await;

    let anonymous = node(&redis, "anonymous");
    let ready = anonymous.http_get("/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    eventually("the node says Redis cannot be reached", SLOW, || async {
        let log = anonymous.stderr_text().to_lowercase();
        log.contains("redis cannot be reached").then_some(())
    })
    .await;
}

#[tokio::test]
async fn chat_from_two_nodes_at_once_has_one_gapless_order_everywhere() {
    let c = cluster(3);
    chat_order_across(&c.nodes, &session_id("cl-chat")).await;
}

/// Senders on nodes 0 and 1 at once: one gapless order, seen in order on node 2 and at
/// the sender's own node, and the same history from every node and the HTTP route.
async fn chat_order_across(nodes: &[TestServer], s: &str) {
    let s = s.to_owned();
    let c = Cluster0 { nodes };
    let (mut a, _, _) = c.nodes[0].tutor(&s, &token("alice", &s, "student")).await;
    let (mut b, _, _) = c.nodes[1].tutor(&s, &token("bob", &s, "student")).await;
    let (mut watcher, _, _) = c.nodes[2].tutor(&s, &token("wes", &s, "student")).await;
    const EACH: usize = 20;
    for i in 0..EACH {
        a.send(&json!({"type":"chat","text":format!("a{i}")})).await;
        b.send(&json!({"type":"chat","text":format!("b{i}")})).await;
    }
    let mut seen = Vec::new();
    while seen.len() < 2 * EACH {
        let m = watcher.wait_type("chat").await;
        seen.push((m["seq"].as_u64().unwrap_or(0), m["text"].to_string()));
    }
    let seqs: Vec<u64> = seen.iter().map(|(s, _)| *s).collect();
    let expected: Vec<u64> = (1..=(2 * EACH) as u64).collect();
    assert_eq!(
        seqs, expected,
        "one gapless order, delivered in order on node 2"
    );

    // Every node gives a newcomer the same messages in the same order: its history, then
    // what that node's reader had not delivered yet when it joined, live.
    for node in c.nodes {
        let (mut newcomer, _, history) = node
            .tutor_q(&s, &token("hist", &s, "student"), "after_seq=0")
            .await;
        let mut texts: Vec<(u64, String)> = history["messages"]
            .as_array()
            .unwrap_or_else(|| panic!("history: {history}"))
            .iter()
            .map(|m| (m["seq"].as_u64().unwrap_or(0), m["text"].to_string()))
            .collect();
        while texts.len() < seen.len() {
            let m = newcomer.wait_type("chat").await;
            texts.push((m["seq"].as_u64().unwrap_or(0), m["text"].to_string()));
        }
        assert_eq!(texts, seen, "history then live on {}", node.addr);
    }
    let r = c.nodes[1]
        .api_json(
            "GET",
            &format!("/api/v2/session/{s}/tutor/messages?after_seq=0&limit=100"),
            &token("http", &s, "student"),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let via_http: Vec<u64> = r.json()["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("{}", r.text()))
        .iter()
        .map(|m| m["seq"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(via_http, expected);
    // And the sender's own node delivered its messages in the same order too.
    let mut at_a = Vec::new();
    while at_a.len() < 2 * EACH {
        at_a.push(a.wait_type("chat").await["seq"].as_u64().unwrap_or(0));
    }
    assert_eq!(at_a, expected);
    let _ = b.barrier().await;
}

#[tokio::test]
async fn presence_spans_nodes_with_summed_connection_counts() {
    let c = cluster(2);
    let s = session_id("cl-presence");
    let (mut a, _, _) = c.nodes[0].tutor(&s, &token("alice", &s, "tutor")).await;
    let (mut b1, welcome, _) = c.nodes[1].tutor(&s, &token("bob", &s, "student")).await;
    // Node 1 knows alice from Redis when it loads the session, or hears her presence
    // within a moment if node 0 had not published it yet.
    if participant_ids(&welcome) != ["alice", "bob"] {
        let heard = b1
            .wait_for("alice's presence at node 1", |v| {
                v["type"] == "presence" && v["user"]["id"] == "alice"
            })
            .await;
        assert_eq!(participant_ids(&heard), ["alice", "bob"], "{heard}");
    }
    let joined = a.wait_type("presence").await;
    assert_eq!(joined["event"], "joined");
    assert_eq!(joined["user"]["id"], "bob");
    // Bob's second connection, on the other node: no second `joined`, the count is 2.
    let (b2, welcome2, _) = c.nodes[0].tutor(&s, &token("bob", &s, "student")).await;
    let bob = welcome2["participants"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["id"] == "bob").cloned())
        .unwrap_or_else(|| panic!("bob missing: {welcome2}"));
    assert_eq!(bob["connections"], 2, "{welcome2}");
    // Closing one of bob's two connections is not a `left`; closing the last one is.
    b1.close().await;
    b2.close().await;
    let left = a.wait_type("presence").await;
    assert_eq!(left["event"], "left", "{left}");
    assert_eq!(left["user"]["id"], "bob");
    assert_eq!(participant_ids(&left), ["alice"]);
}

#[tokio::test]
async fn http_writes_on_one_node_reach_websocket_clients_and_long_polls_on_others() {
    let c = cluster(3);
    let s = session_id("cl-http");
    let t = token("tina", &s, "tutor");
    let mut ws = c.nodes[1].wb_user(&s, "wendy").await;
    let (mut chat, _, _) = c.nodes[1].tutor(&s, &token("wendy", &s, "student")).await;
    // A long poll on the third node, from the current state.
    let poll = {
        let path = format!("/api/v2/session/{s}/tutor/messages?after_seq=0&wait=10");
        let t = t.clone();
        let addr = c.nodes[2].addr;
        tokio::spawn(async move {
            http_request(
                addr,
                "GET",
                &path,
                &[("Authorization", format!("Bearer {t}").as_str())],
                None,
            )
            .await
        })
    };
    let update = {
        use yrs::{Map, Transact};
        let writer = yrs::Doc::new();
        let m = writer.get_or_insert_map("m");
        let mut txn = writer.transact_mut();
        m.insert(&mut txn, "via_http", "yes");
        txn.encode_update_v1()
    };
    let r = c.nodes[0]
        .api(
            "POST",
            &format!("/api/v2/session/{s}/whiteboard"),
            Some(&t),
            Some(&update),
        )
        .await;
    assert!(
        r.status == 200 || r.status == 204,
        "{} {}",
        r.status,
        r.text()
    );
    ws.wait_doc("the HTTP write on node 0 at node 1", |c| {
        c.map_get("m", "via_http").as_deref() == Some("yes")
    })
    .await;
    let r = c.nodes[0]
        .api_json(
            "POST",
            &format!("/api/v2/session/{s}/tutor/messages"),
            &t,
            Some(json!({"text":"posted over HTTP"})),
        )
        .await;
    assert!(
        r.status == 200 || r.status == 201,
        "{} {}",
        r.status,
        r.text()
    );
    let m = chat.wait_type("chat").await;
    assert_eq!(m["text"], "posted over HTTP");
    let answered = tokio::time::timeout(SLOW, poll)
        .await
        .unwrap_or_else(|_| panic!("the long poll on node 2 did not answer"))
        .unwrap_or_else(|e| panic!("poll task: {e}"));
    assert_eq!(answered.status, 200, "{}", answered.text());
    assert!(
        answered.text().contains("posted over HTTP"),
        "{}",
        answered.text()
    );
}

#[tokio::test]
async fn a_restore_through_one_node_reaches_clients_on_the_others() {
    let c = cluster(2);
    let s = session_id("cl-restore");
    let tutor = token("tina", &s, "tutor");
    let mut a = c.nodes[0].wb_user(&s, "alice").await;
    let mut b = c.nodes[1].wb_user(&s, "bob").await;
    a.map_set("m", "k", "v1").await;
    b.wait_doc("v1 at b", |c| c.map_get("m", "k").as_deref() == Some("v1"))
        .await;
    let n = c.nodes[1].take_snapshot(&s, &tutor).await;
    a.map_set("m", "k", "v2").await;
    b.wait_doc("v2 at b", |c| c.map_get("m", "k").as_deref() == Some("v2"))
        .await;
    let r = c.nodes[0]
        .api(
            "POST",
            &format!("/api/v2/session/{s}/snapshots/{n}/restore"),
            Some(&tutor),
            Some(b""),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    b.wait_doc(
        "the restore on node 0 at node 1, without reconnecting",
        |c| c.map_get("m", "k").as_deref() == Some("v1"),
    )
    .await;
    // Both nodes list the same versions.
    assert_eq!(
        c.nodes[0].snapshot_versions(&s, &tutor).await,
        c.nodes[1].snapshot_versions(&s, &tutor).await
    );
}

#[tokio::test]
async fn awareness_crosses_nodes_and_a_late_node_shows_it_on_connect() {
    use yrs::sync::Message;
    let c = cluster(3);
    let s = session_id("cl-aware");
    let a = c.nodes[0].wb_user(&s, "alice").await;
    let mut a = a;
    let mut b = c.nodes[1].wb_user(&s, "bob").await;
    a.send_awareness(&awareness_update(4242, 1, r#"{"user":"alice"}"#))
        .await;
    let alice_state = |m: &Message| match m {
        Message::Awareness(u) => awareness_entry(u, 4242).is_some_and(|e| e.json.contains("alice")),
        _ => false,
    };
    b.wait_for("alice's awareness at node 1", alice_state).await;
    // A node that loads the session now asks the others: its first client is greeted
    // with alice's state, or gets it right after.
    let mut late = c.nodes[2]
        .wb_connect(&s, &token("carol", &s, "student"))
        .await;
    late.wait_for("alice's awareness at the late node", alice_state)
        .await;
    // A closed connection's awareness is removed on every node.
    drop(a);
    let removed = |m: &Message| match m {
        Message::Awareness(u) => awareness_entry(u, 4242).is_some_and(|e| &*e.json == "null"),
        _ => false,
    };
    b.wait_for("alice's removal at node 1", removed).await;
    late.wait_for("alice's removal at node 2", removed).await;
}

#[tokio::test]
async fn a_killed_node_loses_nothing_acknowledged_and_its_users_leave_presence_though_it_restarts_under_its_id(
) {
    let mut c = cluster(2);
    let s = session_id("cl-kill");
    let (mut watcher, _, _) = c.nodes[0].tutor(&s, &token("wes", &s, "student")).await;
    let (_victim_chat, _, _) = c.nodes[1].tutor(&s, &token("vic", &s, "student")).await;
    let joined = watcher.wait_type("presence").await;
    assert_eq!(joined["user"]["id"], "vic");
    let mut observer = c.nodes[0].wb_user(&s, "obs").await;
    let mut writer = c.nodes[1].wb_user(&s, "vic").await;
    for i in 0..50 {
        writer.map_set("m", &format!("k{i}"), "v").await;
    }
    observer
        .wait_doc("the observer saw every write", |c| {
            c.map_get("m", "k49").as_deref() == Some("v")
        })
        .await;
    c.nodes[1].kill();
    // Restarted at once under the same node id (as a container's PID 1 is): the new
    // process must not keep the dead one's users alive with its heartbeat.
    let _restarted = node(&c.redis, "node1");
    // What the observer saw is in Redis: a fresh client on the surviving node has it.
    let fresh = c.nodes[0].wb_user(&s, "fresh").await;
    assert!((0..50).all(|i| fresh.map_get("m", &format!("k{i}")).as_deref() == Some("v")));
    // Its user leaves presence once its heartbeat expires (SPEC 9: within 60 s).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match watcher.next_event(left).await {
            TutorEvent::Json(v) if v["type"] == "presence" => {
                assert_eq!(v["event"], "left", "{v}");
                assert_eq!(v["user"]["id"], "vic");
                break;
            }
            TutorEvent::Json(_) => {}
            other => panic!("vic never left presence within 60 s: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_redis_outage_makes_nodes_unready_and_closes_writers_then_they_recover() {
    let mut c = cluster(1);
    let s = session_id("cl-outage");
    let n = &c.nodes[0];
    let r = n.http_get("/readyz").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mut a = n.wb_user(&s, "alice").await;
    let mut observer = n.wb_user(&s, "olga").await;
    a.map_set("m", "before", "1").await;
    // Relayed only once Redis acknowledged the append: what the observer sees is stored.
    observer
        .wait_doc("the write before the outage", |c| {
            c.map_get("m", "before").as_deref() == Some("1")
        })
        .await;
    c.redis.stop();
    eventually("readyz 503 while Redis is down", SLOW, || async {
        (n.http_get("/readyz").await.status == 503).then_some(())
    })
    .await;
    // A write that cannot be appended is not relayed and closes its writer with 1013.
    let _ = a.map_set("m", "during", "1").await;
    assert_eq!(a.expect_close(SLOW).await, Some(1013));
    // New upgrades are refused with 503 meanwhile.
    let path = format!(
        "{}?token={}",
        TestServer::wb_path(&s),
        token("bob", &s, "student")
    );
    let up = ws_upgrade_raw(n.addr, &path, &[]).await;
    assert_eq!(up.status, 503, "{}", up.text());
    c.redis.restart();
    eventually("readyz 200 once Redis is back", SLOW, || async {
        (n.http_get("/readyz").await.status == 200).then_some(())
    })
    .await;
    let b = n.wb_user(&s, "bob").await;
    assert_eq!(b.map_get("m", "before").as_deref(), Some("1"));
    assert_eq!(
        b.map_get("m", "during"),
        None,
        "nothing unappended was kept"
    );
}

#[tokio::test]
async fn edits_mutes_and_removals_act_on_every_node() {
    let c = cluster(2);
    let s = session_id("cl-moderate");
    let (mut tina, _, _) = c.nodes[0].tutor(&s, &token("tina", &s, "tutor")).await;
    let (mut alice, _, _) = c.nodes[1].tutor(&s, &token("alice", &s, "student")).await;
    let mut bob_wb = c.nodes[1].wb_user(&s, "bob").await;
    let (mut bob, _, _) = c.nodes[1].tutor(&s, &token("bob", &s, "student")).await;
    let posted = chat(&mut alice, "frist").await;
    let seq = posted["seq"].as_u64().unwrap_or(0);
    tina.wait_type("chat").await;
    alice
        .send(&json!({"type":"edit","seq":seq,"text":"first"}))
        .await;
    let edited = tina.wait_type("chat_edited").await;
    assert_eq!(edited["text"], "first", "{edited}");
    // A mute on node 0 holds on node 1.
    tina.send(&json!({"type":"mute","user":"alice","until":null}))
        .await;
    assert_eq!(alice.wait_type("moderation").await["action"], "mute");
    alice
        .send(&json!({"type":"chat","text":"still here?"}))
        .await;
    assert_eq!(alice.wait_type("error").await["reason"], "muted");
    // A removal on node 0 closes bob's connections on node 1, both endpoints, and he
    // cannot come back through either node.
    tina.send(&json!({"type":"remove","user":"bob"})).await;
    assert_eq!(bob.expect_close(SLOW).await, Some(4403));
    assert_eq!(bob_wb.expect_close(SLOW).await, Some(4403));
    for n in &c.nodes {
        let path = format!(
            "{}?token={}",
            TestServer::tutor_path(&s),
            token("bob", &s, "student")
        );
        let r = ws_upgrade_raw(n.addr, &path, &[]).await;
        assert_refusal(&r, 403, Some("forbidden"), "banned on every node");
    }
}

#[tokio::test]
async fn a_node_restarted_with_sigterm_closes_with_1012_and_its_clients_come_back() {
    let mut c = cluster(2);
    let s = session_id("cl-restart");
    let mut a = c.nodes[0].wb_user(&s, "alice").await;
    let mut b = c.nodes[1].wb_user(&s, "bob").await;
    b.map_set("m", "before", "1").await;
    a.wait_doc("b's write at a", |c| {
        c.map_get("m", "before").as_deref() == Some("1")
    })
    .await;
    c.nodes[1].sigterm();
    assert_eq!(b.expect_close(SLOW).await, Some(1012));
    let exit = c.nodes[1].wait_exit(SLOW).await;
    assert!(exit.is_some_and(|e| e.success()), "{exit:?}");
    // The node comes back (a new process on the same Redis); its client reconnects there.
    c.nodes[1] = node(&c.redis, "node1");
    let mut back = c.nodes[1].wb_user(&s, "bob").await;
    assert_eq!(back.map_get("m", "before").as_deref(), Some("1"));
    a.map_set("m", "while_away", "2").await;
    back.wait_doc("a's write after the restart", |c| {
        c.map_get("m", "while_away").as_deref() == Some("2")
    })
    .await;
    back.map_set("m", "after", "3").await;
    a.wait_doc("the restarted node's client's write", |c| {
        c.map_get("m", "after").as_deref() == Some("3")
    })
    .await;
}

#[tokio::test]
async fn on_a_three_shard_redis_cluster_boards_converge_and_chat_keeps_one_order() {
    let shards = RedisClusterServer::start(3);
    let nodes = on_redis_cluster(&shards, 3);
    // Several sessions, so their hash tags land on different shards.
    for i in 0..3 {
        converge_across(&nodes, &session_id(&format!("rc-converge{i}"))).await;
    }
    for i in 0..2 {
        chat_order_across(&nodes, &session_id(&format!("rc-chat{i}"))).await;
    }
}

/// `rediss://` seeds of a Redis Cluster that speaks TLS only (its bus too) and asks for
/// client certificates: boards converge and chat keeps one order, as on plain TCP.
#[tokio::test]
async fn on_a_tls_redis_cluster_with_client_certificates_boards_converge_and_chat_keeps_one_order()
{
    let shards = RedisClusterServer::start_tls(3);
    let nodes = on_redis_cluster(&shards, 3);
    converge_across(&nodes, &session_id("rc-tls-converge")).await;
    chat_order_across(&nodes, &session_id("rc-tls-chat")).await;
}

/// Sends `signal` (STOP, CONT) to a node's process.
fn signal(node: &TestServer, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(node.pid().to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} failed");
}

#[tokio::test]
async fn a_node_that_reads_late_catches_up_after_another_nodes_version_trimmed_the_stream() {
    let c = cluster(2);
    let s = session_id("cl-trimmed");
    let tutor = token("tina", &s, "tutor");
    let mut a = c.nodes[0].wb_user(&s, "alice").await;
    let mut b = c.nodes[1].wb_user(&s, "bob").await;
    a.map_set("m", "before", "1").await;
    b.wait_doc("node 1 reads node 0's first write", |c| {
        c.map_get("m", "before").as_deref() == Some("1")
    })
    .await;

    // Node 1 reads nothing while node 0 writes and folds it all into a version, which
    // trims those entries from the stream.
    signal(&c.nodes[1], "STOP");
    for i in 0..5 {
        a.map_set("m", &format!("k{i}"), "v").await;
    }
    a.barrier().await;
    c.nodes[0].take_snapshot(&s, &tutor).await;
    signal(&c.nodes[1], "CONT");
    // The next entry node 1 reads is past a gap: it catches up from the version.
    a.map_set("m", "after", "1").await;
    b.wait_doc(
        "node 1's client has what the version folded in, and what came after",
        |c| {
            (0..5).all(|i| c.map_get("m", &format!("k{i}")).is_some())
                && c.map_get("m", "after").is_some()
        },
    )
    .await;
    let metrics = c.nodes[1].http_get("/metrics").await.text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("easel_cluster_catch_ups_total ") && !l.ends_with(" 0")),
        "node 1 counts the catch-up"
    );
}

#[tokio::test]
async fn a_client_that_reconnects_through_another_node_keeps_its_cursor_on_every_node() {
    use yrs::sync::Message;
    let c = cluster(3);
    let s = session_id("cl-moved");
    let state_at = |json: &'static str| {
        move |m: &Message| match m {
            Message::Awareness(u) => {
                awareness_entry(u, 5151).is_some_and(|e| e.json.contains(json))
            }
            _ => false,
        }
    };
    let mut alice = c.nodes[0].wb_user(&s, "alice").await;
    let mut dave = c.nodes[0].wb_user(&s, "dave").await;
    let mut carol = c.nodes[2].wb_user(&s, "carol").await;
    alice
        .send_awareness(&awareness_update(5151, 1, r#"{"at":"node0"}"#))
        .await;
    carol
        .wait_for("alice's cursor from node 0", state_at("node0"))
        .await;
    // No sticky sessions: alice's client comes back through node 1 with its clientID,
    // then its old socket on node 0 closes.
    let mut moved = c.nodes[1].wb_user(&s, "alice").await;
    moved
        .send_awareness(&awareness_update(5151, 2, r#"{"at":"node1"}"#))
        .await;
    carol
        .wait_for("alice's cursor, now published by node 1", state_at("node1"))
        .await;
    dave.wait_for("alice's cursor at node 0 too", state_at("node1"))
        .await;
    drop(alice);
    moved
        .send_awareness(&awareness_update(5151, 3, r#"{"at":"still node1"}"#))
        .await;
    carol
        .wait_for("alice's next move on node 2", state_at("still node1"))
        .await;
    dave.wait_for("alice's next move on node 0", state_at("still node1"))
        .await;
    // Node 0 keeps alice's state: its old socket's close removed nothing node 1 speaks for.
    let mut late = c.nodes[0]
        .wb_connect(&s, &token("erin", &s, "student"))
        .await;
    late.wait_for(
        "alice's cursor greets a new client of node 0",
        state_at("still node1"),
    )
    .await;
}

#[tokio::test]
async fn a_message_deleted_right_after_it_was_posted_is_never_shown_deleted_first() {
    let c = cluster(2);
    let s = session_id("cl-early-delete");
    let bot = token("bot", &s, "tutor");
    let (mut watcher, _, _) = c.nodes[0].tutor(&s, &token("wes", &s, "student")).await;
    let (mut far, _, _) = c.nodes[1].tutor(&s, &token("fay", &s, "student")).await;
    let path = format!("/api/v2/session/{s}/tutor/messages");
    for round in 0..5 {
        let r = c.nodes[0]
            .api_json(
                "POST",
                &path,
                &bot,
                Some(json!({"text": format!("oops {round}")})),
            )
            .await;
        assert!(r.status == 200 || r.status == 201, "{}", r.text());
        let seq = r.json()["seq"].as_u64().expect("a seq");
        let r = c.nodes[0]
            .api_json("DELETE", &format!("{path}/{seq}"), &bot, None)
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        // On both nodes: the message, then its deletion; never the deletion first.
        for client in [&mut watcher, &mut far] {
            let first = client
                .wait_for("the message or its deletion", |v| {
                    v["seq"].as_u64() == Some(seq)
                        && (v["type"] == "chat" || v["type"] == "chat_deleted")
                })
                .await;
            assert_eq!(first["type"], "chat", "the deletion came first: {first}");
            client
                .wait_for("the deletion", |v| {
                    v["type"] == "chat_deleted" && v["seq"].as_u64() == Some(seq)
                })
                .await;
        }
    }
}

#[tokio::test]
async fn a_redis_that_answers_but_refuses_writes_makes_the_node_unready() {
    let c = cluster(1);
    let config = |value: &str| {
        let client = ::redis::Client::open(c.redis.url()).expect("client");
        let mut con = client.get_connection().expect("connection");
        ::redis::cmd("CONFIG")
            .arg("SET")
            .arg("min-replicas-to-write")
            .arg(value)
            .query::<::redis::Value>(&mut con)
            .expect("CONFIG SET");
    };
    assert_eq!(c.nodes[0].http_get("/readyz").await.status, 200);
    // No replica exists, so Redis refuses every write (NOREPLICAS) and still answers PING.
    config("1");
    eventually("readyz 503 while Redis refuses writes", SLOW, || async {
        (c.nodes[0].http_get("/readyz").await.status == 503).then_some(())
    })
    .await;
    config("0");
    eventually("readyz 200 once Redis takes writes again", SLOW, || async {
        (c.nodes[0].http_get("/readyz").await.status == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_awareness_event_in_redis_that_the_guard_refuses_is_counted_and_harmless() {
    use yrs::updates::encoder::Encode;
    let c = cluster(1);
    let s = session_id("cl-hostile-aw");
    let mut a = c.nodes[0].wb_user(&s, "alice").await;
    // Something other than a node wrote a state nested 100,000 deep into the event stream.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let bytes = awareness_update(77, 1, &deep).encode_v1();
    {
        let client = ::redis::Client::open(c.redis.url()).expect("client");
        let mut con = client.get_connection().expect("connection");
        ::redis::cmd("XADD")
            .arg(format!("easel:{{{s}}}:ev"))
            .arg("*")
            .arg("n")
            .arg("intruder")
            .arg("k")
            .arg("aw")
            .arg("d")
            .arg(bytes)
            .query::<::redis::Value>(&mut con)
            .expect("XADD");
    }
    eventually("the refusal counted", SLOW, || async {
        let text = c.nodes[0].http_get("/metrics").await.text();
        let refused = metric_sample(&text, "easel_guard_refusals_total{reason=\"awareness\"}");
        (refused >= Some(1.0)).then_some(())
    })
    .await;
    // The node is up and the session works.
    a.map_set("m", "k", "v").await;
    a.barrier().await;
    assert_server_alive(&c.nodes[0], &s).await;
}

/// Runs one command on `redis`, as a crash would leave it (not as easel would write).
fn redis_cmd(redis: &RedisServer, args: &[&str]) -> ::redis::Value {
    let client = ::redis::Client::open(redis.url()).expect("client");
    let mut con = client.get_connection().expect("connection");
    let mut cmd = ::redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query(&mut con).expect("redis command")
}

/// SPEC 5.1 and 9: a Redis that lost its last acknowledged writes (a crash under
/// `appendfsync everysec`; the loss made here by hand, counters and entries alike) must not
/// hand the lost seqs out again. A chat seq clients saw would name a second message, and a
/// node whose cursor is past the lost whiteboard seqs would skip the entries reusing them:
/// its clients would never see them.
#[tokio::test]
async fn after_redis_lost_writes_no_seen_seq_is_reused_and_nodes_still_converge() {
    let c = cluster(2);
    let s = session_id("cl-lost");
    let mut a = c.nodes[0].wb_user(&s, "alice").await;
    let mut b = c.nodes[1].wb_user(&s, "bob").await;
    for i in 0..3 {
        a.map_set("m", &format!("k{i}"), "v").await;
    }
    b.wait_doc("node 1 has node 0's writes", |c| {
        c.map_get("m", "k2").is_some()
    })
    .await;
    let (mut t0, _, _) = c.nodes[0].tutor(&s, &token("tina", &s, "student")).await;
    let (mut t1, _, _) = c.nodes[1].tutor(&s, &token("tom", &s, "student")).await;
    for text in ["one", "two", "three"] {
        chat(&mut t0, text).await;
    }
    let three = t1
        .wait_for("node 1 has chat seq 3", |v| {
            v["type"] == "chat" && v["seq"] == 3
        })
        .await;
    assert_eq!(three["text"], "three");

    let wb_head = match redis_cmd(&c.redis, &["GET", &format!("easel:{{{s}}}:wb:seq")]) {
        ::redis::Value::BulkString(b) => String::from_utf8(b).unwrap().parse::<u64>().unwrap(),
        other => panic!("wb:seq: {other:?}"),
    };
    assert!(wb_head >= 3, "{wb_head}");
    let wb = format!("easel:{{{s}}}:wb");
    let (last, before_last) = (format!("0-{wb_head}"), format!("0-{}", wb_head - 1));
    redis_cmd(&c.redis, &["XDEL", &wb, &last, &before_last]);
    let lost_head = (wb_head - 2).to_string();
    redis_cmd(&c.redis, &["SET", &format!("{wb}:seq"), &lost_head]);
    let chat_key = format!("easel:{{{s}}}:chat");
    redis_cmd(&c.redis, &["XDEL", &chat_key, "0-2", "0-3"]);
    redis_cmd(&c.redis, &["SET", &format!("{chat_key}:seq"), "1"]);

    // Node 1 writes first: its entry goes past every seq node 0 has read, so node 0 reads it.
    b.map_set("m", "after", "v").await;
    a.wait_doc("node 0's client sees node 1's write after the loss", |c| {
        c.map_get("m", "after").is_some()
    })
    .await;
    let after = chat(&mut t1, "after the loss").await;
    assert_eq!(after["seq"], 4, "seqs 2 and 3 were seen: {after}");
    let at_node0 = t0
        .wait_for("node 0 delivers it", |v| {
            v["type"] == "chat" && v["text"] == "after the loss"
        })
        .await;
    assert_eq!(at_node0["seq"], 4);
}

/// The same loss as above, all of Redis's data this time (a restart that lost it), and the
/// first write after it made by a node that loads the session afresh: it has seen no seq,
/// so only the other node's watch, raising the counters when Redis's `run_id` changed, keeps
/// it from handing out seqs that node 0's clients saw.
#[tokio::test]
async fn after_redis_restarts_empty_a_node_that_loads_afresh_still_goes_past_the_seen_seqs() {
    let mut c = cluster(1);
    let s = session_id("cl-empty");
    let mut a = c.nodes[0].wb_user(&s, "alice").await;
    for i in 0..3 {
        a.map_set("m", &format!("k{i}"), "v").await;
    }
    let (mut t0, _, _) = c.nodes[0].tutor(&s, &token("tina", &s, "student")).await;
    for text in ["one", "two"] {
        chat(&mut t0, text).await;
    }
    let wb_seq_key = format!("easel:{{{s}}}:wb:seq");
    let counter = |redis: &RedisServer, key: &str| match redis_cmd(redis, &["GET", key]) {
        ::redis::Value::BulkString(b) => String::from_utf8(b).unwrap().parse::<u64>().unwrap(),
        ::redis::Value::Nil => 0,
        other => panic!("{key}: {other:?}"),
    };
    let seen = counter(&c.redis, &wb_seq_key);
    assert!(seen >= 3, "{seen}");

    c.redis.restart_empty();
    // Node 0 notices the new run_id and raises the counters to what it had read.
    eventually("node 0 raised the whiteboard counter", SLOW, || async {
        (counter(&c.redis, &wb_seq_key) >= seen).then_some(())
    })
    .await;
    assert!(counter(&c.redis, &format!("easel:{{{s}}}:chat:seq")) >= 2);
    // Node 0's next write lists the session again (`easel:sessions` was lost too).
    a.map_set("m", "k3", "v").await;
    eventually("easel:sessions lists the session again", SLOW, || async {
        (redis_cmd(&c.redis, &["SISMEMBER", "easel:sessions", &s]) == ::redis::Value::Int(1))
            .then_some(())
    })
    .await;

    // A node started now loads the session from the emptied Redis and writes first.
    let late = node(&c.redis, "late");
    let mut b = late.wb_user(&s, "bob").await;
    b.map_set("m", "after", "v").await;
    a.wait_doc("node 0's client sees the late node's write", |c| {
        c.map_get("m", "after").is_some()
    })
    .await;
    let (mut t1, _, _) = late.tutor(&s, &token("tom", &s, "student")).await;
    let after = chat(&mut t1, "after the loss").await;
    assert_eq!(after["seq"], 3, "seqs 1 and 2 were seen: {after}");
}
