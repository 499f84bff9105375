//! `kubectl canal` end to end (issue 15): the plugin binary run through
//! `canal-lab canal` against a 3-node lab with the conformance pods (x, y,
//! z / a, b, c, serving TCP and UDP 80 and 81 as `serve-80-tcp` ...): the
//! verdict line and exit codes, a named port resolved, an IP destination,
//! errors for an unknown pod, `status`. Every verdict is also checked
//! against a real probe of the same cell, so the CLI cannot pass by
//! printing the expected words. Prints the transcripts (the README's
//! example comes from here).

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use canal_e2e::Lab;
use canal_e2e::lab::matrix::{ProbeJob, run_probes};
use canal_e2e::lab::{Protocol, UpOptions};
use support::dataplane::{Dataplane, use_dataplane};
use support::policy::{apply_policies, delete_all_policies, wait_enforced};
use support::{canal_lab, serial};

/// Runs `canal-lab canal ARGS...`: (exit code, stdout, stderr).
fn canal(state: &Path, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["canal"];
    all.extend_from_slice(args);
    let out = canal_lab(state, &all);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    eprintln!(
        "$ kubectl canal {}\n{stdout}{stderr}(exit {:?})\n",
        args.join(" "),
        out.status.code()
    );
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

/// Whether `from` connects to `to:port` over `protocol` (one real probe).
async fn probe(lab: &Lab, from: &str, to: &str, port: u16, protocol: Protocol) -> bool {
    let src = lab.pod(from).expect("source pod");
    let dst = lab.pod(to).expect("destination pod");
    let job = ProbeJob {
        from: from.to_string(),
        netns: src.netns.clone(),
        to: to.to_string(),
        dst: SocketAddr::from((dst.ipv4().expect("IPv4"), port)),
    };
    let r = tokio::task::spawn_blocking(move || {
        run_probes(&[job], protocol, Duration::from_millis(1500), 1)
    })
    .await
    .expect("probe task");
    r.into_iter()
        .next()
        .is_some_and(|o| o.is_ok_and(|o| o.connected))
}

/// Explains one cell, checks the verdict line and exit code agree with
/// each other and with a real probe; returns the output.
async fn explain_probed(lab: &Lab, from: &str, to: &str, port: u16, protocol: Protocol) -> String {
    let proto = match protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    };
    let (code, out, err) = canal(
        &lab.state().dir,
        &["explain", from, &format!("{to}:{port}/{proto}")],
    );
    let probed = probe(lab, from, to, port, protocol).await;
    let want = if probed { "allowed" } else { "denied" };
    assert_eq!(
        out.lines().next(),
        Some(want),
        "{from} -> {to}:{port}/{proto}: probe {want}\n{out}{err}"
    );
    assert_eq!(code, if probed { 0 } else { 1 }, "exit code\n{out}{err}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubectl_canal_explain_and_status_on_a_lab() {
    let _serial = serial().await;
    let lab = Lab::up(
        Lab::test_state_dir("kubectl-canal"),
        UpOptions {
            nodes: 3,
            ..UpOptions::default()
        },
    )
    .await
    .expect("a 3-node lab");
    use_dataplane(&lab, Dataplane::NfTables).await;
    lab.add_conformance_pods().await.expect("conformance pods");
    let client = lab.client();
    let state = lab.state().dir.clone();
    wait_enforced(&lab, Duration::from_secs(30)).await;

    // No policy: allowed, both directions not isolated.
    let out = explain_probed(&lab, "x/a", "y/b", 80, Protocol::Tcp).await;
    assert!(out.contains("egress of x/a on node-"), "{out}");
    assert!(
        out.contains("not isolated (no NetworkPolicy selects y/b for ingress)"),
        "{out}"
    );
    assert!(out.contains("enforced, nftables"), "{out}");

    // Scenario: y/b from x/a on the named port serve-80-tcp only, and x/a
    // may send only to y (namespaceSelector) and to one ipBlock.
    apply_policies(
        &client,
        "metadata: {namespace: y, name: b-from-xa}\nspec:\n  podSelector: {matchLabels: {pod: b}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: x}}, podSelector: {matchLabels: {pod: a}}}], ports: [{port: serve-80-tcp}]}]\n---\nmetadata: {namespace: x, name: a-out}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {matchLabels: {ns: y}}}]}, {to: [{ipBlock: {cidr: 192.0.2.0/24, except: [192.0.2.128/25]}}], ports: [{port: 443}]}]",
    )
    .await;
    wait_enforced(&lab, Duration::from_secs(30)).await;
    let out = explain_probed(&lab, "x/a", "y/b", 80, Protocol::Tcp).await;
    assert!(
        out.contains("allowed by y/b-from-xa ingress rule 0"),
        "{out}"
    );
    assert!(
        out.contains("named port serve-80-tcp = TCP 80 on y/b"),
        "{out}"
    );
    assert!(out.contains("allowed by x/a-out egress rule 0"), "{out}");
    assert!(out.contains("peer: PeerSet "), "{out}");
    let out = explain_probed(&lab, "x/a", "y/b", 81, Protocol::Tcp).await;
    assert!(
        out.contains("y/b-from-xa ingress rule 0: peer matches, port does not match"),
        "{out}"
    );
    let out = explain_probed(&lab, "x/b", "y/b", 80, Protocol::Tcp).await;
    assert!(out.contains("peer does not match, port matches"), "{out}");
    let out = explain_probed(&lab, "x/a", "z/c", 80, Protocol::Udp).await;
    assert!(
        out.contains("x/a-out egress rule 0: peer does not match"),
        "{out}"
    );
    explain_probed(&lab, "z/c", "y/b", 80, Protocol::Udp).await;

    // A named port as the destination port; an IP destination (the pod's).
    let (code, out, _) = canal(&state, &["explain", "x/a", "y/b:serve-80-tcp"]);
    assert_eq!((code, out.lines().next()), (0, Some("allowed")), "{out}");
    assert!(out.contains("TCP 80 (port serve-80-tcp)"), "{out}");
    let b_ip = lab.pod("y/b").unwrap().ipv4().unwrap();
    let (code, out, _) = canal(&state, &["explain", "x/a", &format!("{b_ip}:81")]);
    assert_eq!((code, out.lines().next()), (1, Some("denied")), "{out}");
    assert!(
        out.contains(&format!("y/b ({b_ip}, node-")),
        "the address is y/b's: {out}"
    );
    // Outside addresses: the ipBlock and its except; only egress applies.
    let (code, out, _) = canal(&state, &["explain", "x/a", "192.0.2.10:443"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("allowed by x/a-out egress rule 1")
            && out.contains("ipBlock 192.0.2.0/24 except 192.0.2.128/25"),
        "{out}"
    );
    assert!(out.contains("192.0.2.10 is no pod of the cluster"), "{out}");
    let (code, out, _) = canal(&state, &["explain", "x/a", "192.0.2.200:443"]);
    assert_eq!(code, 1, "the except: {out}");

    // Errors: exit 2, one clear line on stderr, nothing on stdout.
    let (code, out, err) = canal(&state, &["explain", "x/nope", "y/b:80"]);
    assert_eq!((code, out.as_str()), (2, ""));
    assert!(err.contains("pod x/nope not found"), "{err}");
    let (code, _, err) = canal(&state, &["explain", "x/a", "y/b:80/ICMP"]);
    assert_eq!(code, 2);
    assert!(err.contains("expected NS/NAME[:PORT[/PROTO]]"), "{err}");
    let (code, _, err) = canal(&state, &["explain", "x/a", "y/b"]);
    assert_eq!(code, 2);
    assert!(err.contains("give the destination port"), "{err}");
    let (code, _, err) = canal(&state, &["--context", "nope", "status"]);
    assert_eq!(code, 2);
    assert!(err.contains("kubeconfig"), "{err}");
    let (code, _, err) = canal(
        &state,
        &["--kubeconfig", "/nonexistent/kubeconfig", "status"],
    );
    assert_eq!(code, 2);
    assert!(err.contains("kubeconfig: /nonexistent/kubeconfig"), "{err}");
    // --kubeconfig reads the file given.
    let kubeconfig = lab.state().kubeconfig();
    let (code, out, _) = canal(
        &state,
        &["--kubeconfig", &kubeconfig.to_string_lossy(), "status"],
    );
    assert_eq!(code, 0, "{out}");

    // status: a row per node, the generation each programmed.
    let (code, out, _) = canal(&state, &["status"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("NODE ") && lines[0].contains("PROGRAMMED"),
        "{out}"
    );
    for n in 1..=3 {
        let row = lines
            .iter()
            .find(|l| l.starts_with(&format!("node-{n} ")))
            .unwrap_or_else(|| panic!("node-{n} row: {out}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[1], cells[2], "generation = programmed: {row}");
        assert_eq!(&cells[3..5], ["True", "nftables"], "{row}");
        assert_eq!(cells[8], "2", "two overlay peers: {row}");
    }
    assert!(out.contains("policy enforced on 3/3 nodes"), "{out}");

    // Three conformance scenarios, for the record.
    for (name, yaml, cells) in [
        (
            "deny all ingress in x",
            "metadata: {namespace: x, name: deny-ingress}\nspec: {podSelector: {}}",
            vec![
                ("y/a", "x/b", 80, Protocol::Tcp),
                ("x/a", "y/b", 80, Protocol::Tcp),
            ],
        ),
        (
            "x/a from pods of x labelled pod=b",
            "metadata: {namespace: x, name: a-from-b}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]",
            vec![
                ("x/b", "x/a", 81, Protocol::Udp),
                ("x/c", "x/a", 81, Protocol::Udp),
            ],
        ),
        (
            "named port egress: x to serve-80-udp anywhere",
            "metadata: {namespace: x, name: named-out}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{ports: [{port: serve-80-udp, protocol: UDP}]}]",
            vec![
                ("x/a", "z/c", 80, Protocol::Udp),
                ("x/a", "z/c", 81, Protocol::Udp),
            ],
        ),
    ] {
        eprintln!("=== scenario: {name}");
        delete_all_policies(&client).await;
        apply_policies(&client, yaml).await;
        wait_enforced(&lab, Duration::from_secs(30)).await;
        for (from, to, port, proto) in cells {
            explain_probed(&lab, from, to, port, proto).await;
        }
    }
    let _ = lab.down();
}

/// The agent's pid on `node`.
fn agent_pid(lab: &Lab, node: &str) -> String {
    let path = lab.state().node(node).agent().pid();
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

fn signal(pid: &str, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, pid])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

/// Empties y/b's ingress chain behind the agent's back, in `dataplane`.
fn flush_ingress_chain(node_ns: &str, iface: &str, dataplane: Dataplane) {
    use canal_e2e::lab::netns;
    let (tool, args): (&str, Vec<String>) = match dataplane {
        Dataplane::IpTables => (
            "iptables",
            vec![
                "-t".into(),
                "filter".into(),
                "-F".into(),
                format!("CANAL-TW-{iface}"),
            ],
        ),
        Dataplane::NfTables => (
            "nft",
            vec![
                "flush".into(),
                "chain".into(),
                "inet".into(),
                "canal".into(),
                format!("tw-{iface}"),
            ],
        ),
    };
    netns::run(netns::exec(node_ns, tool).args(&args))
        .unwrap_or_else(|e| panic!("{tool} {args:?} in {node_ns}: {e}"));
}

/// Lines of `out` that report a repair naming `iface`.
fn repairs_of(out: &str, iface: &str) -> usize {
    out.lines()
        .filter(|l| l.contains("repaired at") && l.contains(iface))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubectl_canal_verify_reports_a_hand_flushed_chain_on_both_dataplanes() {
    let _serial = serial().await;
    let lab = Lab::up(
        Lab::test_state_dir("kubectl-canal-verify"),
        UpOptions {
            nodes: 3,
            ..UpOptions::default()
        },
    )
    .await
    .expect("a 3-node lab");
    lab.add_conformance_pods().await.expect("conformance pods");
    let client = lab.client();
    let state = lab.state().dir.clone();
    apply_policies(
        &client,
        "metadata: {namespace: y, name: b-from-xa}\nspec:\n  podSelector: {matchLabels: {pod: b}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: x}}, podSelector: {matchLabels: {pod: a}}}]}]",
    )
    .await;
    let b = lab.pod("y/b").unwrap();
    let b_ns = lab.node(&b.node).unwrap().netns;
    let iface = canal_crds::names::veth_name("y", "b");
    let args = ["explain", "--verify", "x/a", "y/b:80/TCP"];
    let mut frozen_checked = false;
    for dataplane in [Dataplane::IpTables, Dataplane::NfTables] {
        use_dataplane(&lab, dataplane).await;
        wait_enforced(&lab, Duration::from_secs(30)).await;
        // Untouched: both nodes' kernels hold what they programmed.
        let (code, out, err) = canal(&state, &args);
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(out.lines().next(), Some("allowed"));
        assert_eq!(
            out.lines().filter(|l| l.starts_with("verify ") && l.contains(": the kernel holds every chain")).count(),
            2,
            "{out}"
        );
        assert!(out.contains(dataplane.status()), "{out}");
        let before = repairs_of(&out, &iface);

        // Flushed by hand: the agent repairs it at once (firewall change
        // notification); the answer names the repair and the chain.
        flush_ingress_chain(&b_ns, &iface, dataplane);
        let (code, out, err) = support::eventually(
            "a repair of the flushed chain reported",
            Duration::from_secs(10),
            || async {
                let r = canal(&state, &args);
                if repairs_of(&r.1, &iface) > before {
                    Ok(r)
                } else {
                    Err(r.1)
                }
            },
        )
        .await;
        assert_eq!(code, 0, "repaired before the request's check: {out}{err}");
        // The plugin names the chains the answer relies on as the agent does.
        let chain = match dataplane {
            Dataplane::IpTables => format!("CANAL-TW-{iface}"),
            Dataplane::NfTables => format!("tw-{iface}"),
        };
        assert!(
            out.lines()
                .any(|l| l.starts_with("  this answer relies on chains ") && l.contains(&chain)),
            "{out}"
        );
        assert!(
            out.lines().any(|l| l.contains("repaired at")
                && l.contains(&chain)
                && l.ends_with("(a chain this answer relies on)")),
            "{out}"
        );

        // Flushed while the agent is frozen: the request waits; once the
        // agent runs again, it either finds the chain missing (exit 3,
        // "did NOT hold") or has repaired it first (a newer repair).
        let pid = agent_pid(&lab, &b.node);
        let before = repairs_of(&out, &iface);
        signal(&pid, "-STOP");
        flush_ingress_chain(&b_ns, &iface, dataplane);
        if !frozen_checked {
            // A frozen agent does not answer: --verify says so and fails.
            let (code, out, _) = canal(&state, &args);
            assert_eq!(code, 3, "{out}");
            assert!(
                out.contains(&format!("verify {}: no answer within 10 s", b.node)),
                "{out}"
            );
            frozen_checked = true;
        }
        let cli = {
            let state = state.clone();
            std::thread::spawn(move || canal(&state, &args))
        };
        std::thread::sleep(Duration::from_millis(1500));
        signal(&pid, "-CONT");
        let (code, out, err) = cli.join().expect("cli thread");
        let missing = out.lines().any(|l| {
            l.contains(&format!("verify {}: the kernel did NOT hold", b.node)) && l.contains(&iface)
        });
        let repaired = repairs_of(&out, &iface) > before;
        assert!(missing || repaired, "{out}{err}");
        assert_eq!(code, if missing { 3 } else { 0 }, "{out}{err}");
        wait_enforced(&lab, Duration::from_secs(30)).await;
    }
    let _ = lab.down();
}
