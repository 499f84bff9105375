//! Benchmark of policy enforcement at node scale, both dataplanes in the
//! same run on the same inputs: render and apply ~20,000 rules and 100,000
//! set members into a fresh network namespace (cold), then 100 incremental
//! changes; compared with a plain `iptables-restore` (+ `ipset restore`) of
//! the same text, one `iptables` exec per rule, a plain `nft -f` of the
//! same nftables script, and the nftables dataplane run through `nft -f -`
//! per transaction instead of libnftables. Prints its figures; needs root.
//!
//! `cargo bench -p canal-agent --bench policy_apply` (env BENCH_RUNS=3,
//! BENCH_CHANGES=100, BENCH_EXECS=1000 adjust the effort; BENCH_ONLY=nftables
//! skips the iptables half; BENCH_DUMP=<dir> writes the nftables cold script
//! and each incremental plan there, to replay with `nft -f` or profile).

#[path = "../tests/support/netns.rs"]
mod netns;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use canal_agent::policy::{
    DataplaneChoice, EnforcementConfig, Exec, PolicyEnforcer, PolicyInputs, PolicyMetrics, render,
};
use canal_crds::{
    CompiledPolicy, Endpoint, NodePolicySetSpec, Peer, PeerSelector, PeerSetSpec, PortMatch,
    Protocol, Rule,
};
use netns::Netns;

const ENDPOINTS: usize = 100;
const POLICIES: usize = 400;
const PEER_SETS: usize = 200;
const MEMBERS_PER_SET: usize = 500;
const PEERS_PER_RULE: usize = 23;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn iface(i: usize) -> String {
    format!("cali{i:011x}")
}

fn peer_set(i: usize) -> PeerSetSpec {
    let ips: Vec<String> = (0..MEMBERS_PER_SET)
        .map(|j| {
            let n = i * MEMBERS_PER_SET + j;
            format!("10.{}.{}.{}", 64 + n / 65536, (n / 256) % 256, n % 256)
        })
        .collect();
    PeerSetSpec {
        selector: PeerSelector::default(),
        member_count: ips.len() as u32,
        ips,
        ports: vec![],
    }
}

fn policy(p: usize, tcp_ports: &[u16]) -> CompiledPolicy {
    let peers = (0..PEERS_PER_RULE)
        .map(|k| Peer {
            peer_set: Some(format!("ps-{}", (p * 7 + k) % PEER_SETS)),
            ip_block: None,
        })
        .collect();
    let mut ports: Vec<PortMatch> = tcp_ports
        .iter()
        .map(|&port| PortMatch {
            protocol: Protocol::TCP,
            port: Some(port),
            end_port: None,
            named_port: None,
            named_port_set: None,
        })
        .collect();
    ports.push(PortMatch {
        protocol: Protocol::UDP,
        port: Some(5000),
        end_port: Some(5100),
        named_port: None,
        named_port_set: None,
    });
    CompiledPolicy {
        name: format!("ns-{}/policy-{p}", p % 50),
        ingress: vec![Rule {
            peers: Some(peers),
            ports,
        }],
        egress: vec![],
    }
}

fn endpoint(i: usize) -> Endpoint {
    Endpoint {
        namespace: format!("ns-{}", i % 50),
        pod: format!("pod-{i}"),
        interface: iface(i),
        ips: vec![format!("10.244.1.{}", i + 2)],
        named_ports: vec![],
        ingress_policies: (0..4)
            .map(|k| policy_name((i * 4 + k) % POLICIES))
            .collect(),
        egress_policies: vec![policy_name(i % POLICIES)],
    }
}

fn policy_name(p: usize) -> String {
    format!("ns-{}/policy-{p}", p % 50)
}

fn inputs(dataplane: DataplaneChoice) -> PolicyInputs {
    PolicyInputs {
        config: EnforcementConfig {
            dataplane,
            ..EnforcementConfig::default()
        },
        generation: Some(1),
        spec: NodePolicySetSpec {
            endpoints: (0..ENDPOINTS).map(endpoint).collect(),
            policies: (0..POLICIES).map(|p| policy(p, &[80, 443, 8080])).collect(),
        },
        peer_sets: (0..PEER_SETS)
            .map(|i| (format!("ps-{i}"), peer_set(i)))
            .collect(),
        endpoints_unknown: false,
    }
}

fn restore(ns: &Netns, program: &str, args: &[&str], text: &str) -> Duration {
    use std::io::Write;
    let start = Instant::now();
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", ns.path.display()))
        .arg(program)
        .args(args)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "{program} failed");
    start.elapsed()
}

/// Entering the namespace (`nsenter`, as the enforcer does) costs a little;
/// measure it to subtract it from the baselines.
fn netns_exec_overhead(ns: &Netns) -> Duration {
    let mut samples: Vec<Duration> = (0..10)
        .map(|_| {
            let start = Instant::now();
            let ok = Command::new("nsenter")
                .arg(format!("--net={}", ns.path.display()))
                .arg("true")
                .status()
                .unwrap()
                .success();
            assert!(ok);
            start.elapsed()
        })
        .collect();
    samples.sort();
    samples[samples.len() / 2]
}

/// CPU time (user + system) of this process and its waited-for children.
fn cpu_time() -> Duration {
    let get = |who| {
        // SAFETY: getrusage fills the struct we pass.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(who, &mut u) };
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        tv(u.ru_utime) + tv(u.ru_stime)
    };
    get(libc::RUSAGE_SELF) + get(libc::RUSAGE_CHILDREN)
}

fn pct(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let idx = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[idx]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if !netns::can_run() {
        eprintln!("policy_apply bench needs root with iptables and ipset; skipped");
        return;
    }
    // `cargo bench` passes --bench; nothing to parse.
    let runs = env_usize("BENCH_RUNS", 3);
    let changes = env_usize("BENCH_CHANGES", 100);
    let execs = env_usize("BENCH_EXECS", 1000);
    if std::env::var("BENCH_ONLY").as_deref() == Ok("nftables") {
        if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
            println!(
                "policy_apply benchmark (nftables only), load average at start: {}",
                load.trim()
            );
        }
        nftables(runs, changes).await;
        return;
    }

    let base = inputs(DataplaneChoice::IpTables);
    let t = Instant::now();
    let rendered = render(&base);
    let render_time = t.elapsed();
    let r = &rendered.ruleset;
    let ipt_text = r.iptables_restore_text();
    let ipset_text = r.ipset_restore_text();
    println!("policy_apply benchmark");
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        println!("  machine load average at start: {}", load.trim());
    }
    println!(
        "  workload: {ENDPOINTS} endpoints, {POLICIES} policies, {PEER_SETS} PeerSets x {MEMBERS_PER_SET} members"
    );
    println!(
        "  rendered: {} rules in {} chains, {} sets, {} members ({} KiB iptables text, {} KiB ipset text), render {}",
        r.rule_count(),
        r.chains.len(),
        r.sets.len(),
        r.member_count(),
        ipt_text.len() / 1024,
        ipset_text.len() / 1024,
        ms(render_time)
    );

    // Rust-side costs of one sync at this size (no kernel involved).
    {
        let mut times: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
        for _ in 0..10 {
            let t = Instant::now();
            let rr = render(&base).ruleset;
            times.entry("render").or_default().push(t.elapsed());
            let t = Instant::now();
            let k = canal_agent::policy::KernelState::from_ruleset(&rr);
            times
                .entry("state from ruleset")
                .or_default()
                .push(t.elapsed());
            let t = Instant::now();
            let p = canal_agent::policy::plan(&k, &rr);
            times
                .entry("diff (no change)")
                .or_default()
                .push(t.elapsed());
            assert!(p.is_empty());
        }
        println!("  rust-side, per sync at this size (median of 10):");
        for (what, mut v) in times {
            println!("    {what:<20} {}", ms(pct(&mut v, 0.5)));
        }
    }

    // Cold: canal's enforcer vs. the plain tools on the same text, interleaved runs.
    let mut cold = Vec::new();
    let mut plain_ipt = Vec::new();
    let mut plain_both = Vec::new();
    let mut overheads = Vec::new();
    for _ in 0..runs {
        let ns = Netns::new("pa-bench");
        let run_dir = tempfile::tempdir().unwrap();
        let mut e = PolicyEnforcer::new(run_dir.path(), PolicyMetrics::unregistered().unwrap())
            .with_exec(Exec::in_netns(&ns.path).unwrap());
        let start = Instant::now();
        let s = e.sync(&base).await.unwrap();
        cold.push(start.elapsed());
        assert!(s.applied && s.warnings.is_empty());
        drop(ns);

        let ns = Netns::new("pa-bench");
        let overhead = netns_exec_overhead(&ns);
        overheads.push(overhead);
        let a = restore(&ns, "ipset", &["restore"], &ipset_text).saturating_sub(overhead);
        let b =
            restore(&ns, "iptables-restore", &["--noflush"], &ipt_text).saturating_sub(overhead);
        plain_ipt.push(b);
        plain_both.push(a + b);
    }
    let cold_med = pct(&mut cold, 0.5);
    let ipt_med = pct(&mut plain_ipt, 0.5);
    let both_med = pct(&mut plain_both, 0.5);
    println!("\ncold apply into a fresh netns (median of {runs}):");
    println!(
        "  canal enforcer sync (read empty state, render, diff, ipset + iptables restore): {}",
        ms(cold_med)
    );
    println!(
        "  plain ipset restore + iptables-restore of the same text:                    {}",
        ms(both_med)
    );
    println!(
        "  plain iptables-restore alone:                                               {}",
        ms(ipt_med)
    );
    println!(
        "  enforcer vs plain (ipset + iptables): {:+.1}%   (nsenter overhead {} subtracted from the plain runs)",
        (cold_med.as_secs_f64() / both_med.as_secs_f64() - 1.0) * 100.0,
        ms(pct(&mut overheads, 0.5))
    );

    // One exec per rule: a subset, into an empty table and on top of the full one.
    let ns = Netns::new("pa-bench");
    restore(&ns, "ipset", &["restore"], &ipset_text);
    // The filter table's chains (the anti-spoofing and guard chains of the
    // raw and security tables are a handful of rules).
    let filter = canal_agent::policy::Table::Filter;
    let mut declare = String::from("*filter\n");
    for (name, _) in r.table_chains(filter) {
        declare.push_str(&format!(":{name} - [0:0]\n"));
    }
    declare.push_str("COMMIT\n");
    restore(&ns, "iptables-restore", &["--noflush"], &declare);
    let lines: Vec<Vec<String>> = r
        .table_chains(filter)
        .flat_map(|(n, c)| {
            c.rules.iter().map(move |rl| {
                let mut args = vec!["-w".to_string(), "-A".into(), n.clone()];
                args.extend(["-m", "comment", "--comment"].map(String::from));
                args.push(rl.comment());
                args.extend(rl.spec.split_whitespace().map(String::from));
                args
            })
        })
        .take(execs)
        .collect();
    let exec_rules = |ns: &Netns| {
        let start = Instant::now();
        for args in &lines {
            let ok = Command::new("nsenter")
                .arg(format!("--net={}", ns.path.display()))
                .arg("iptables")
                .args(args)
                .status()
                .unwrap()
                .success();
            assert!(ok, "{args:?}");
        }
        start.elapsed()
    };
    // Not net of the exec overhead: paying it per rule is the point of this baseline.
    let empty_execs = exec_rules(&ns);
    drop(ns);
    let ns = Netns::new("pa-bench");
    restore(&ns, "ipset", &["restore"], &ipset_text);
    restore(&ns, "iptables-restore", &["--noflush"], &ipt_text);
    let full_execs = exec_rules(&ns);
    drop(ns);
    let per_empty = empty_execs / lines.len() as u32;
    let per_full = full_execs / lines.len() as u32;
    let total = r.rule_count() as u32;
    println!(
        "\none `iptables -A` exec per rule ({} execs timed, extrapolated to {total} rules):",
        lines.len()
    );
    println!(
        "  first {} rules into an empty table: {} per rule -> ~{:.1} s for all (lower bound)",
        lines.len(),
        ms(per_empty),
        (per_empty * total).as_secs_f64()
    );
    println!(
        "  {} more rules on top of the full table: {} per rule -> ~{:.1} s for all (upper bound)",
        lines.len(),
        ms(per_full),
        (per_full * total).as_secs_f64()
    );

    // Incremental changes on top of the full ruleset.
    let ns = Netns::new("pa-bench");
    let run_dir = tempfile::tempdir().unwrap();
    let metrics = PolicyMetrics::unregistered().unwrap();
    let mut e = PolicyEnforcer::new(run_dir.path(), metrics.clone())
        .with_exec(Exec::in_netns(&ns.path).unwrap());
    let inc = incremental(&mut e, &base, changes).await;
    let drift_start = Instant::now();
    let d = e.check_drift().await.unwrap().unwrap();
    let drift = drift_start.elapsed();
    assert!(!d.applied);
    drop(ns);

    print_incremental("iptables", inc, changes);
    println!(
        "  drift check (iptables-save + ipset save + diff, nothing to repair): {}",
        ms(drift)
    );
    nftables(runs, changes).await;
}

/// Figures of one incremental run.
struct Incremental {
    noop: Vec<Duration>,
    noop_render: Vec<Duration>,
    by_kind: BTreeMap<&'static str, Vec<Duration>>,
    all: Vec<Duration>,
    tools: Vec<Duration>,
    renders: Vec<Duration>,
    cpus: Vec<Duration>,
}

async fn incremental(e: &mut PolicyEnforcer, base: &PolicyInputs, changes: usize) -> Incremental {
    let mut cur = base.clone();
    e.sync(&cur).await.unwrap();
    let mut noop = Vec::new();
    let mut noop_render = Vec::new();
    for _ in 0..20 {
        let s = e.sync(&cur).await.unwrap();
        assert!(!s.applied);
        noop.push(s.duration);
        noop_render.push(s.render_time);
    }
    let mut by_kind: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    let mut all = Vec::new();
    let mut tools = Vec::new();
    let mut renders = Vec::new();
    let mut cpus = Vec::new();
    for i in 0..changes {
        let kind = change(&mut cur, i, 0);
        let cpu0 = cpu_time();
        let s = e.sync(&cur).await.unwrap();
        cpus.push(cpu_time() - cpu0);
        assert!(s.applied && !s.full, "{s:?}");
        by_kind.entry(kind).or_default().push(s.duration);
        all.push(s.duration);
        tools.push(s.restore_time);
        renders.push(s.render_time);
    }
    Incremental {
        noop,
        noop_render,
        by_kind,
        all,
        tools,
        renders,
        cpus,
    }
}

fn print_incremental(dataplane: &str, inc: Incremental, changes: usize) {
    let Incremental {
        mut noop,
        mut noop_render,
        mut by_kind,
        mut all,
        mut tools,
        mut renders,
        mut cpus,
    } = inc;
    let (noop, noop_render, by_kind, all, tools, renders, cpus) = (
        &mut noop,
        &mut noop_render,
        &mut by_kind,
        &mut all,
        &mut tools,
        &mut renders,
        &mut cpus,
    );
    println!("\n{dataplane}: incremental sync on top of the full ruleset ({changes} changes):");
    println!(
        "  all changes:    p50 {}  p99 {}  max {}",
        ms(pct(all, 0.5)),
        ms(pct(all, 0.99)),
        ms(pct(all, 1.0))
    );
    for (kind, v) in by_kind.iter_mut() {
        println!(
            "  {kind:<24} p50 {}  p99 {}  (n={})",
            ms(pct(v, 0.5)),
            ms(pct(v, 0.99)),
            v.len()
        );
    }
    println!(
        "  CPU time (agent + tools, what an idle machine would wait): p50 {}  p99 {}",
        ms(pct(cpus, 0.5)),
        ms(pct(cpus, 0.99))
    );
    println!(
        "  of which rendering:     p50 {}  p99 {}",
        ms(pct(renders, 0.5)),
        ms(pct(renders, 0.99))
    );
    println!(
        "  of which kernel apply:  p50 {}  p99 {}",
        ms(pct(tools, 0.5)),
        ms(pct(tools, 0.99))
    );
    println!(
        "  no-op resync:   p50 {}, of which rendering {}  (no restore executed)",
        ms(pct(noop, 0.5)),
        ms(pct(noop_render, 0.5))
    );
}

/// The nftables dataplane on the same inputs: cold vs a plain `nft -f` of
/// the same script, incremental through libnftables, and through `nft -f -`
/// per transaction (the alternative the library was chosen over).
async fn nftables(runs: usize, changes: usize) {
    use canal_agent::policy::nft::render::render as nft_render;
    let base = inputs(DataplaneChoice::NfTables);
    let t = Instant::now();
    let r = nft_render(&canal_agent::policy::model::build(&base));
    let render_time = t.elapsed();
    let script = r.script();
    println!(
        "\nnftables: {} rules in {} chains, {} sets and maps, {} elements ({} KiB script), model + render {}",
        r.rule_count(),
        r.chains.len(),
        r.sets.len(),
        r.element_count(),
        script.len() / 1024,
        ms(render_time)
    );
    stages(&base);
    let (mut cold, mut plain) = (Vec::new(), Vec::new());
    let (mut cold_cpu, mut plain_cpu) = (Vec::new(), Vec::new());
    for run in 0..runs {
        // Alternate which goes first, so a load change on the shared
        // machine does not always fall on the same side.
        for canal_side in [run % 2 == 0, run % 2 == 1] {
            let ns = Netns::new("pa-bench");
            if canal_side {
                let run_dir = tempfile::tempdir().unwrap();
                let mut e =
                    PolicyEnforcer::new(run_dir.path(), PolicyMetrics::unregistered().unwrap())
                        .with_exec(Exec::in_netns(&ns.path).unwrap());
                // Warm the library (dlopen, its thread) as a running agent has.
                let _ = e.support().await;
                let (start, cpu0) = (Instant::now(), cpu_time());
                let s = e.sync(&base).await.unwrap();
                cold.push(start.elapsed());
                cold_cpu.push(cpu_time() - cpu0);
                assert!(s.applied && s.warnings.is_empty());
            } else {
                let overhead = netns_exec_overhead(&ns);
                let cpu0 = cpu_time();
                plain.push(restore(&ns, "nft", &["-f", "-"], &script).saturating_sub(overhead));
                plain_cpu.push(cpu_time() - cpu0);
            }
        }
    }
    let (c, p) = (pct(&mut cold, 0.5), pct(&mut plain, 0.5));
    let (cc, pc) = (pct(&mut cold_cpu, 0.5), pct(&mut plain_cpu, 0.5));
    let pct_of = |a: Duration, b: Duration| (a.as_secs_f64() / b.as_secs_f64() - 1.0) * 100.0;
    println!("nftables: cold apply into a fresh netns (median of {runs}, order alternating):");
    println!(
        "  canal enforcer sync (read, model, render, diff, one transaction): {}  (CPU {})",
        ms(c),
        ms(cc)
    );
    println!(
        "  plain `nft -f` of the same script:                                  {}  (CPU {})",
        ms(p),
        ms(pc)
    );
    println!(
        "  enforcer vs plain nft -f: {:+.1}% wall, {:+.1}% CPU",
        pct_of(c, p),
        pct_of(cc, pc)
    );
    println!(
        "  all runs, wall canal / plain: {:?} / {:?}",
        cold.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        plain.iter().map(|d| ms(*d)).collect::<Vec<_>>()
    );

    let ns = Netns::new("pa-bench");
    let run_dir = tempfile::tempdir().unwrap();
    let mut e = PolicyEnforcer::new(run_dir.path(), PolicyMetrics::unregistered().unwrap())
        .with_exec(Exec::in_netns(&ns.path).unwrap());
    let inc = incremental(&mut e, &base, changes).await;
    let start = Instant::now();
    let d = e.check_drift().await.unwrap().unwrap();
    let drift = start.elapsed();
    assert!(!d.applied);
    drop(ns);
    print_incremental("nftables (libnftables, in-process)", inc, changes);
    println!(
        "  drift check (nft -j list table + diff, nothing to repair): {}",
        ms(drift)
    );

    let ns = Netns::new("pa-bench");
    let run_dir = tempfile::tempdir().unwrap();
    let mut e = PolicyEnforcer::new(run_dir.path(), PolicyMetrics::unregistered().unwrap())
        .with_exec(Exec::in_netns(&ns.path).unwrap())
        .with_nft_process();
    let n = changes.min(40);
    let inc = incremental(&mut e, &base, n).await;
    drop(ns);
    print_incremental("nftables via `nft -f -` per transaction (not used)", inc, n);
}

/// The `i`-th change of an incremental run, of four kinds in turn; `variant`
/// picks other members, ports and interfaces for a second series on the
/// same base. Returns the kind.
fn change(cur: &mut PolicyInputs, i: usize, variant: usize) -> &'static str {
    match i % 4 {
        0 => {
            // A pod elsewhere comes: one PeerSet member.
            let ps = cur
                .peer_sets
                .get_mut(&format!("ps-{}", i % PEER_SETS))
                .unwrap();
            ps.ips
                .push(format!("10.{}.{}.{}", 200 + variant, i / 256, i % 256));
            "member added"
        }
        1 => {
            // That pod goes again.
            let ps = cur
                .peer_sets
                .get_mut(&format!("ps-{}", (i - 1) % PEER_SETS))
                .unwrap();
            ps.ips.pop();
            "member removed"
        }
        2 => {
            // A policy's ports change: one policy chain.
            let p = i % POLICIES;
            let port = 9000 + 100 * variant as u16 + i as u16;
            cur.spec.policies[p] = policy(p, &[80, 443, 8080, port]);
            "rule changed"
        }
        _ => {
            // A local pod is replaced: endpoint chains + dispatch.
            let slot = i % ENDPOINTS;
            let mut ep = endpoint(slot);
            ep.interface = format!("cali{:011x}", 0xf000_0000usize - 0x1000_0000 * variant + i);
            ep.pod = format!("pod-new-{variant}-{i}");
            cur.spec.endpoints[slot] = ep;
            "pod replaced"
        }
    }
}

/// Where the Rust side of an incremental nftables sync goes, per stage, for
/// each kind of change (no kernel involved): model, render, diff, the
/// state kept for the next sync, the element-only check.
fn stages(base: &PolicyInputs) {
    use canal_agent::policy::model::{ModelCache, build_with};
    use canal_agent::policy::nft::render::{NftCache, render_with};
    use canal_agent::policy::nft::{NftState, netlink, ruleset};
    let (mut mc, mut nc) = (ModelCache::default(), NftCache::default());
    let mut cur = base.clone();
    let cold = render_with(&build_with(&cur, &mut mc), &mut nc);
    if let Ok(dir) = std::env::var("BENCH_DUMP") {
        std::fs::write(format!("{dir}/cold.nft"), cold.script()).unwrap();
    }
    let mut known = NftState::from_ruleset(&cold);
    let mut times: BTreeMap<(&str, &str), Vec<Duration>> = BTreeMap::new();
    for i in 0..40 {
        // Other members, ports and interfaces than incremental()'s.
        let kind = change(&mut cur, i, 1);
        let mut time =
            |stage, t: Instant| times.entry((kind, stage)).or_default().push(t.elapsed());
        let t = Instant::now();
        let model = build_with(&cur, &mut mc);
        time("1 model", t);
        let t = Instant::now();
        let r = render_with(&model, &mut nc);
        time("2 render", t);
        let t = Instant::now();
        let plan = ruleset::plan(&known, &r);
        time("3 diff (plan + script)", t);
        assert!(!plan.is_empty());
        if let Ok(dir) = std::env::var("BENCH_DUMP") {
            // The exact scripts, to replay by hand (`nft -f`) or profile.
            let file = format!("{dir}/{i:02}-{}.nft", kind.replace(' ', "-"));
            std::fs::write(file, &plan.script).unwrap();
        }
        let t = Instant::now();
        let after = NftState::from_ruleset(&r);
        time("4 state for next sync", t);
        let t = Instant::now();
        let _ = netlink::element_only_delta(&known, &after);
        time("5 element-only check", t);
        known = after;
    }
    println!("nftables: Rust-side stages of one incremental sync (p50 of 10 each, no kernel):");
    for ((kind, stage), v) in &mut times {
        println!("  {kind:<15} {stage:<24} {}", ms(pct(v, 0.5)));
    }
}
