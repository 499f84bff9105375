//! `spec.policy.established` and denied-flow counters on a 3-node lab
//! (issue 15): a long TCP stream and a UDP stream to `x/c` from pods on
//! other nodes, and an allowed TCP stream between two other pods. With
//! `Cut` (the default), a policy update that keeps the streams allowed
//! cuts nothing; a policy denying them ends both within 1 s of the policy
//! being enforced while the allowed stream goes on uninterrupted; the
//! denied probes show in `canal_policy_denied_packets_total` on x/c's
//! node, and with `logDenied` the agent logs them. With `Keep`, the same
//! deny leaves the established streams alone. Both dataplanes.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use canal_e2e::Lab;
use canal_e2e::lab::prober::Prober;
use canal_e2e::lab::{Protocol, UpOptions};
use kube::Api;
use kube::api::{Patch, PatchParams};
use support::dataplane::{Dataplane, use_dataplane};
use support::policy::{apply_policies, delete_all_policies, wait_enforced, wait_probers};
use support::{eventually, serial};

/// A stream that echoes every few milliseconds and remembers each echo.
struct Stream {
    label: String,
    echoes: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl Stream {
    fn echoes(&self) -> Vec<Instant> {
        self.echoes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn last(&self) -> Option<Instant> {
        self.echoes().last().copied()
    }

    fn since(&self, t: Instant) -> usize {
        self.echoes().iter().filter(|e| **e >= t).count()
    }

    /// The longest time without an echo between `from` and `to`.
    fn longest_gap(&self, from: Instant, to: Instant) -> Duration {
        let mut prev = from;
        let mut gap = Duration::ZERO;
        for e in self.echoes().into_iter().filter(|e| *e >= from && *e <= to) {
            gap = gap.max(e - prev);
            prev = e;
        }
        gap.max(to.saturating_duration_since(prev))
    }
}

async fn tcp_stream(lab: &Lab, from: &str, to: &str) -> Stream {
    let conn = lab.open_stream(from, to, 80).await.expect("a TCP stream");
    let mut w = conn.stream;
    w.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    w.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut r = BufReader::new(w.try_clone().unwrap());
    let echoes = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (e, s) = (echoes.clone(), stop.clone());
    std::thread::spawn(move || {
        let mut line = String::new();
        while !s.load(Ordering::SeqCst) {
            if w.write_all(b"tick\n").is_ok() {
                line.clear();
                if r.read_line(&mut line).is_ok() && line == "tick\n" {
                    e.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Instant::now());
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    Stream {
        label: format!("{from} -> {to} 80/TCP stream"),
        echoes,
        stop,
    }
}

fn udp_stream(lab: &Lab, from: &str, to: &str) -> Stream {
    let netns = lab.pod(from).unwrap().netns;
    let dst = SocketAddr::from((lab.pod(to).unwrap().ipv4().unwrap(), 80));
    let echoes = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (e, s) = (echoes.clone(), stop.clone());
    std::thread::spawn(move || {
        canal_e2e::lab::netns::enter(&netns).expect("entering the pod");
        // One socket, one source port: one conntrack entry for the stream.
        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        u.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut buf = [0u8; 64];
        while !s.load(Ordering::SeqCst) {
            let _ = u.send_to(b"tick", dst);
            if let Ok((n, _)) = u.recv_from(&mut buf)
                && &buf[..n] == b"tick"
            {
                e.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    Stream {
        label: format!("{from} -> {to} 80/UDP stream"),
        echoes,
        stop,
    }
}

async fn set_established(lab: &Lab, mode: &str) {
    let api: Api<canal_crds::CanalNetwork> = Api::all(lab.client());
    api.patch(
        canal_crds::DEFAULT_NETWORK_NAME,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"policy": {"established": mode}}})),
    )
    .await
    .expect("patching spec.policy.established");
}

/// `canal_policy_denied_packets_total{endpoint="x/c",direction="ingress"}` on `node`.
fn denied_at(lab: &Lab, node: &str, endpoint: &str) -> Result<f64, String> {
    let text = lab.agent_metrics(node).map_err(|e| e.to_string())?;
    let want = format!(
        "canal_policy_denied_packets_total{{direction=\"ingress\",endpoint=\"{endpoint}\"}}"
    );
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(&want))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0))
}

/// The agent's text log without terminal colours.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... final byte in @..~
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

const DENY_C: &str =
    "metadata: {namespace: x, name: deny-c}\nspec: {podSelector: {matchLabels: {pod: c}}}";
const ALLOW_C: &str = "metadata: {namespace: x, name: allow-c}\nspec:\n  podSelector: {matchLabels: {pod: c}}\n  ingress: [{from: [{namespaceSelector: {}}]}]";

/// The pods used: two sources on other nodes than x/c, and an allowed pair.
fn pick(lab: &Lab) -> (String, String, (String, String)) {
    let target = lab.pod("x/c").unwrap().node;
    let keys: Vec<String> = ["x", "y", "z"]
        .iter()
        .flat_map(|ns| ["a", "b"].map(|p| format!("{ns}/{p}")))
        .collect();
    let remote: Vec<&String> = keys
        .iter()
        .filter(|k| lab.pod(k).unwrap().node != target)
        .collect();
    assert!(remote.len() >= 2, "pods on other nodes than x/c's");
    (
        remote[0].clone(),
        remote[1].clone(),
        ("z/a".to_string(), "y/b".to_string()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_ends_denied_streams_within_a_second_keep_leaves_them_iptables() {
    visibility(Dataplane::IpTables).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_ends_denied_streams_within_a_second_keep_leaves_them_nftables() {
    visibility(Dataplane::NfTables).await;
}

async fn visibility(dataplane: Dataplane) {
    let _serial = serial().await;
    let lab = Lab::up(
        Lab::test_state_dir(&format!("policy-visibility-{}", dataplane.status())),
        UpOptions {
            nodes: 3,
            ..UpOptions::default()
        },
    )
    .await
    .expect("a 3-node lab");
    use_dataplane(&lab, dataplane).await;
    lab.add_conformance_pods().await.expect("conformance pods");
    let client = lab.client();
    wait_enforced(&lab, Duration::from_secs(30)).await;
    let (tcp_from, udp_from, (ok_from, ok_to)) = pick(&lab);
    let target_node = lab.pod("x/c").unwrap().node;

    // Cut is the default.
    let tcp = tcp_stream(&lab, &tcp_from, "x/c").await;
    let udp = udp_stream(&lab, &udp_from, "x/c");
    let allowed = tcp_stream(&lab, &ok_from, &ok_to).await;
    let flowing = |s: &Stream, t: Instant| s.since(t) >= 5;
    let t = Instant::now();
    eventually("every stream echoes", Duration::from_secs(10), || async {
        [&tcp, &udp, &allowed]
            .iter()
            .all(|s| flowing(s, t))
            .then_some(())
            .ok_or_else(|| "not yet".to_string())
    })
    .await;

    // Adversarial: an isolating policy that still allows the streams cuts nothing.
    apply_policies(&client, ALLOW_C).await;
    wait_enforced(&lab, Duration::from_secs(10)).await;
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for s in [&tcp, &udp, &allowed] {
        assert!(flowing(s, t), "{}: still allowed, must go on", s.label);
    }

    // The deny: both streams end within 1 s of enforcement, the other goes on.
    let denied_before = denied_at(&lab, &target_node, "x/c").unwrap_or(0.0);
    let applied = Instant::now();
    delete_all_policies(&client).await;
    apply_policies(&client, DENY_C).await;
    wait_enforced(&lab, Duration::from_secs(10)).await;
    let enforced = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let end = Instant::now();
    for s in [&tcp, &udp] {
        let last = s.last().expect("it echoed before");
        let after_enforced = last.saturating_duration_since(enforced);
        eprintln!(
            "{}: last echo {} ms after the policy was applied, {} ms after every agent reported it enforced ({} ms after apply)",
            s.label,
            last.saturating_duration_since(applied).as_millis(),
            after_enforced.as_millis(),
            (enforced - applied).as_millis()
        );
        assert!(
            after_enforced < Duration::from_secs(1),
            "{}: echoed {} ms after enforcement",
            s.label,
            after_enforced.as_millis()
        );
        assert_eq!(
            s.since(enforced + Duration::from_secs(1)),
            0,
            "{}: cut",
            s.label
        );
    }
    let gap = allowed.longest_gap(applied, end);
    eprintln!("{}: longest gap {} ms", allowed.label, gap.as_millis());
    assert!(
        gap < Duration::from_millis(500),
        "{}: interrupted for {} ms",
        allowed.label,
        gap.as_millis()
    );

    // Denied probes move the counter on x/c's node.
    let probe = Prober::start(
        "denied probe",
        &lab.pod(&tcp_from).unwrap().netns,
        SocketAddr::from((lab.pod("x/c").unwrap().ipv4().unwrap(), 81)),
        Protocol::Tcp,
        Duration::from_millis(200),
        Duration::from_millis(50),
    );
    wait_probers("probes denied", &[&probe], Duration::from_secs(10), |p| {
        p.attempts().len() >= 5 && p.attempts().iter().all(|a| !a.connected)
    })
    .await;
    let counted = eventually(
        "canal_policy_denied_packets_total moves",
        Duration::from_secs(20),
        || async {
            let now = denied_at(&lab, &target_node, "x/c")?;
            (now > denied_before)
                .then_some(now)
                .ok_or(format!("{now} (was {denied_before})"))
        },
    )
    .await;
    eprintln!("denied packets at x/c: {denied_before} -> {counted}");

    // spec.policy.logDenied: the agent of x/c's node logs the denied probes.
    let api: Api<canal_crds::CanalNetwork> = Api::all(lab.client());
    api.patch(
        canal_crds::DEFAULT_NETWORK_NAME,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"policy": {"logDenied": true}}})),
    )
    .await
    .expect("patching spec.policy.logDenied");
    wait_enforced(&lab, Duration::from_secs(10)).await;
    let src = lab.pod(&tcp_from).unwrap().ipv4().unwrap();
    let line = eventually(
        "a denied-connection log line",
        Duration::from_secs(15),
        || async {
            let log = strip_ansi(&lab.agent_log(&target_node));
            let found = log
                .lines()
                .rev()
                .find(|l| {
                    l.contains("denied connection")
                        && l.contains(&format!("src={src}"))
                        && l.contains("port=81")
                        && l.contains("endpoint=x/c")
                        && l.contains("x/deny-c")
                })
                .map(str::to_string);
            found.ok_or_else(|| {
                let related: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("denied") || l.contains("flowlog") || l.contains("log"))
                    .collect();
                format!(
                    "not yet; related lines: {:?}",
                    &related[related.len().saturating_sub(5)..]
                )
            })
        },
    )
    .await;
    eprintln!("log line: {line}");
    probe.stop();
    api.patch(
        canal_crds::DEFAULT_NETWORK_NAME,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"policy": {"logDenied": false}}})),
    )
    .await
    .expect("patching spec.policy.logDenied");
    drop((tcp, udp));

    // Keep: the same deny leaves established streams alone.
    delete_all_policies(&client).await;
    set_established(&lab, "Keep").await;
    wait_enforced(&lab, Duration::from_secs(10)).await;
    let tcp = tcp_stream(&lab, &tcp_from, "x/c").await;
    let udp = udp_stream(&lab, &udp_from, "x/c");
    let t = Instant::now();
    eventually("the new streams echo", Duration::from_secs(10), || async {
        (flowing(&tcp, t) && flowing(&udp, t))
            .then_some(())
            .ok_or_else(|| "not yet".to_string())
    })
    .await;
    apply_policies(&client, DENY_C).await;
    wait_enforced(&lab, Duration::from_secs(10)).await;
    let enforced = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for s in [&tcp, &udp] {
        assert!(
            s.since(enforced + Duration::from_secs(1)) >= 5,
            "{}: Keep leaves an established stream",
            s.label
        );
    }
    set_established(&lab, "Cut").await;
    delete_all_policies(&client).await;
    drop((tcp, udp, allowed));
    let removed = lab.down();
    eprintln!("lab down: {removed:?}");
}
