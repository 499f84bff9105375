//! canal-lab: the local lab (see DESIGN.md for the command contract).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use canal_e2e::Error;
use canal_e2e::images;
use canal_e2e::lab::{
    self, Context, MatrixOptions, PodOptions, PodPort, Protocol, StateDir, Target, UpOptions,
};
use canal_e2e::realnode::cli as real;
use clap::{Parser, Subcommand};

/// canal's local lab: a real etcd + kube-apiserver, node network namespaces,
/// and canal's real binaries, on one machine.
#[derive(Parser, Debug)]
#[command(name = "canal-lab", version, about)]
struct Cli {
    /// Where the lab keeps its state (kubeconfig, logs, pid files).
    #[arg(long, global = true, default_value = lab::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start the lab; returns when every node is programmed.
    Up {
        /// Number of nodes (node-1 ... node-N).
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        /// Nodes without canal-agent and canal-cni (Node objects and
        /// namespaces only, e.g. to work on the controller).
        #[arg(long)]
        no_agents: bool,
        /// Do not run canal-controller (allocate podCIDRs yourself).
        #[arg(long)]
        no_controller: bool,
        /// Seconds to wait for the network to be programmed.
        #[arg(long, default_value_t = lab::DEFAULT_READY_TIMEOUT.as_secs())]
        timeout: u64,
        /// When `up` fails, leave its processes and namespaces running for
        /// inspection (by default they are stopped; the logs always stay).
        #[arg(long)]
        keep_on_failure: bool,
        /// Real nodes: kubelet, containerd and kube-proxy in every node
        /// namespace, kube-controller-manager and kube-scheduler next to the
        /// API server, and canal installed with `helm install` of the chart.
        #[arg(long)]
        kubelet: bool,
        /// With --kubelet: leave canal out (the nodes stay NotReady).
        #[arg(long, requires = "kubelet")]
        no_canal: bool,
        /// The IP families: ipv4, ipv6 (an IPv6-only underlay and pod
        /// range) or dual (a dual-stack underlay, both ranges, IPv4 first).
        #[arg(long, default_value = "ipv4")]
        ip_family: lab::IpFamily,
        /// NetworkPolicy enforcement (CanalNetwork policy.enabled): on or
        /// off. Default: on (both dataplanes guard both families; pods get
        /// IPv6 once the policy component lists it in policy-families).
        #[arg(long)]
        policy: Option<OnOff>,
    },
    /// Check, in about a second, that this machine can run the lab (root,
    /// network namespaces, VXLAN, iptables, ipset, tools, canal's binaries,
    /// Go if the control plane is not built); `up` runs the same checks.
    Preflight {
        /// Check for a lab without agents (no iptables, ipset, VXLAN).
        #[arg(long)]
        no_agents: bool,
        /// Check for a lab without canal-controller.
        #[arg(long)]
        no_controller: bool,
    },
    /// Run the upstream Kubernetes e2e suite (e2e.test) against the lab's
    /// real-kubelet cluster: `canal-lab e2e --ginkgo.focus=Netpol --ginkgo.skip=SCTP`.
    E2e {
        /// Arguments for e2e.test (ginkgo's and the framework's flags).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Stop everything and remove what `up` made (also after a crash).
    Down,
    /// Show what runs and whether it is healthy.
    Status,
    /// Run kubectl with the lab's kubeconfig: `canal-lab kubectl -- get nodes`.
    Kubectl {
        /// Arguments for kubectl.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run kubectl-canal (`kubectl canal`) with the lab's kubeconfig:
    /// `canal-lab canal explain x/a y/b:80/TCP`, `canal-lab canal status`.
    Canal {
        /// Arguments for kubectl-canal.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Pods (the kubelet stand-in).
    #[command(subcommand)]
    Pod(PodCommand),
    /// Nodes of a running lab.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Probe from a pod: prints "connected" (exit 0) or "blocked" (exit 1).
    Probe {
        /// Source pod, NAMESPACE/NAME.
        from: String,
        /// Destination: a pod NAMESPACE/NAME, `internet` (the host outside
        /// the cluster), or an IP address.
        to: String,
        /// Destination port.
        #[arg(long)]
        port: u16,
        /// TCP or UDP.
        #[arg(long, default_value = "TCP")]
        protocol: Protocol,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = lab::DEFAULT_PROBE_TIMEOUT.as_millis() as u64)]
        timeout_ms: u64,
        /// Also print the source address the server saw, or why it failed (stderr).
        #[arg(long, short)]
        verbose: bool,
        /// The IP family to probe, 4 or 6 (default: the lab's first).
        #[arg(long)]
        family: Option<lab::Family>,
    },
    /// Probe every pod pair in parallel and print the truth table.
    Matrix {
        /// Destination port.
        #[arg(long, default_value_t = 80)]
        port: u16,
        /// TCP or UDP.
        #[arg(long, default_value = "TCP")]
        protocol: Protocol,
        /// Print `{"ns/from": {"ns/to": true|false}}`.
        #[arg(long)]
        json: bool,
        /// Per-probe timeout in milliseconds.
        #[arg(long, default_value_t = lab::DEFAULT_PROBE_TIMEOUT.as_millis() as u64)]
        timeout_ms: u64,
        /// The IP family to probe, 4 or 6 (default: the lab's first).
        #[arg(long)]
        family: Option<lab::Family>,
    },
    /// Container images for real-kubelet nodes, built without a registry
    /// or a container engine.
    #[command(subcommand)]
    Images(ImagesCommand),
    /// (internal) The API forwarder into the node namespaces.
    #[command(name = "__forward", hide = true)]
    Forward {
        /// The API server address.
        #[arg(long)]
        upstream: SocketAddr,
        /// Port to listen on inside each node namespace.
        #[arg(long)]
        port: u16,
    },
    /// (internal) Holds a real node's mount namespace.
    #[command(name = "__node-holder", hide = true)]
    NodeHolder {
        /// The mount plan (JSON).
        #[arg(long)]
        plan: PathBuf,
        /// Created once the mounts are in place.
        #[arg(long)]
        ready: PathBuf,
    },
    /// (internal) The root-namespace forwarder to a real-kubelet lab's API server.
    #[command(name = "__api-forward", hide = true)]
    ApiForward {
        /// The control-plane namespace.
        #[arg(long)]
        netns: String,
        /// The API server inside it.
        #[arg(long)]
        upstream: SocketAddr,
        /// Where to listen (port 0: any).
        #[arg(long)]
        listen: SocketAddr,
        /// Gets the bound port.
        #[arg(long)]
        port_file: PathBuf,
    },
    /// (internal) The echo server of a pod or of the internet host.
    #[command(name = "__echo", hide = true)]
    Echo {
        /// PORT/PROTOCOL to serve, repeated.
        #[arg(long)]
        listen: Vec<String>,
        /// Created once every port is bound.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Address to bind, repeated (a pod's IPv4 and IPv6 addresses).
        #[arg(long, default_value = "0.0.0.0")]
        bind: Vec<std::net::IpAddr>,
    },
    /// (internal) Forged packets from inside a namespace (anti-spoofing by hand).
    #[command(name = "__spoof", hide = true)]
    Spoof {
        /// The namespace to send from (a pod's: see `canal-lab status`).
        #[arg(long)]
        netns: String,
        /// The source address to forge.
        #[arg(long)]
        src: std::net::Ipv4Addr,
        /// Destination IP:PORT.
        #[arg(long)]
        dst: std::net::SocketAddrV4,
        /// udp or tcp (SYNs).
        #[arg(long, default_value = "udp")]
        protocol: lab::spoof::Kind,
        /// How many packets.
        #[arg(long, default_value_t = 10)]
        count: u32,
    },
}

/// `on` / `off`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Subcommand, Debug)]
enum PodCommand {
    /// Create a pod on a node: Pod object, network namespace wired by the
    /// node's CNI chain, status, and an echo server on its ports.
    Add {
        /// NAMESPACE/NAME (the namespace is created when missing).
        pod: String,
        /// The node to run on.
        #[arg(long)]
        node: String,
        /// A label K=V, repeated.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// A port PORT/PROTOCOL:NAME, repeated (default: TCP and UDP 80 and
        /// 81 named serve-<port>-<tcp|udp>).
        #[arg(long = "port")]
        ports: Vec<String>,
    },
    /// Delete a pod (CNI DEL, then the namespace and the Pod object).
    Del {
        /// NAMESPACE/NAME.
        pod: String,
    },
}

#[derive(Subcommand, Debug)]
enum ImagesCommand {
    /// Build every image the lab imports (the canal image: a cached Debian
    /// base + the release binaries, built first when stale) and print
    /// `REFERENCE ARCHIVE` for each; import one with
    /// `ctr -n k8s.io images import --local ARCHIVE`.
    Build {
        /// Directory for the archives (default: target/images).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Use target/release as it is instead of running cargo build.
        #[arg(long)]
        no_cargo: bool,
    },
    /// Build the repository's Dockerfile offline with buildah as CI does
    /// (prebuilt binaries, the locally made runtime base) into an OCI
    /// archive, and print its path.
    Dockerfile {
        /// The archive to write (default: target/images/dockerfile.oci.tar).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Use target/release as it is instead of running cargo build.
        #[arg(long)]
        no_cargo: bool,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCommand {
    /// Add a node to the running lab and wait until it is programmed.
    Add {
        /// Node name (a DNS label).
        name: String,
    },
    /// Remove a node (its pods first).
    Del {
        /// Node name.
        name: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(matches!(
        cli.command,
        Command::Forward { .. } | Command::Echo { .. } | Command::ApiForward { .. }
    ));
    let state = StateDir::new(&cli.state_dir);
    // Before any thread exists: it only mounts and then sleeps.
    if let Command::NodeHolder { plan, ready } = &cli.command {
        return match canal_e2e::realnode::holder::run(plan, ready) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("canal-lab: {e}");
                ExitCode::FAILURE
            }
        };
    }
    // The helpers run for as long as the lab: one thread is plenty.
    let runtime = match cli.command {
        Command::Forward { .. } | Command::Echo { .. } | Command::ApiForward { .. } => {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        }
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("canal-lab: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, &state)) {
        Ok(code) => code,
        // One line per cause, each naming its fix.
        Err(Error::Preflight(failures)) => {
            for f in failures {
                eprintln!("canal-lab: {f}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("canal-lab: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(helper: bool) {
    let default = if helper {
        "info"
    } else {
        "warn,kube_client=off"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn parse_labels(labels: &[String]) -> Result<Vec<(String, String)>, Error> {
    labels
        .iter()
        .map(|l| match l.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(Error::Lab(format!("label {l:?}: expected KEY=VALUE"))),
        })
        .collect()
}

async fn run(command: Command, state: &StateDir) -> Result<ExitCode, Error> {
    match command {
        Command::Up {
            nodes,
            no_agents,
            no_controller,
            timeout,
            keep_on_failure,
            kubelet,
            no_canal,
            ip_family,
            policy,
        } => {
            let started = Instant::now();
            if kubelet {
                // The real-kubelet lab's underlay, kubelets and chart values
                // are IPv4 only: refuse rather than bring up another family.
                if ip_family != lab::IpFamily::Ipv4 {
                    return Err(Error::Lab(format!(
                        "--kubelet runs IPv4 only; --ip-family {ip_family} needs the in-process lab (without --kubelet)"
                    )));
                }
                return real::up(state, nodes, !no_canal, timeout, started).await;
            }
            let policy = !matches!(policy, Some(OnOff::Off));
            if !policy {
                eprintln!(
                    "canal-lab: NetworkPolicy is off in this lab (CanalNetwork policy.enabled=false)"
                );
            }
            let opts = UpOptions {
                nodes,
                agents: !no_agents,
                controller: !no_controller,
                ready_timeout: Duration::from_secs(timeout),
                progress: true,
                keep_on_failure,
                ip_family,
                policy,
                ..UpOptions::default()
            };
            let ctx = lab::up(state, &opts).await?;
            let underlay = match ctx.lab.underlay6 {
                Some(u6) if ip_family.has_v4() => format!("{} and {u6}", ctx.lab.underlay),
                Some(u6) => u6.to_string(),
                None => ctx.lab.underlay.to_string(),
            };
            println!(
                "lab up in {:.1}s: {} node(s), {ip_family}, API server {}, underlay {underlay}\nkubeconfig: {}\ntry: canal-lab --state-dir {} kubectl -- get nodes -o wide",
                started.elapsed().as_secs_f64(),
                nodes,
                ctx.lab.server,
                state.kubeconfig().display(),
                state.dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Preflight {
            no_agents,
            no_controller,
        } => {
            let failures = lab::preflight::check(&lab::preflight::Needs {
                bin_dir: lab::default_bin_dir(),
                agents: !no_agents,
                controller: !no_controller,
            });
            if !failures.is_empty() {
                return Err(Error::Preflight(failures));
            }
            println!(
                "preflight ok: root, network namespaces, VXLAN, iptables and ipset in a new namespace, the tools of scripts/packages, canal's binaries, the control plane (or Go to build it)"
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Down => {
            let removed = lab::down(state);
            if removed.is_empty() {
                println!("nothing to remove in {}", state.dir.display());
            } else {
                println!(
                    "stopped {} process(es), removed {} namespace(s){}",
                    removed.processes.len(),
                    removed.namespaces.len(),
                    if removed.state_dir {
                        format!(" and {}", state.dir.display())
                    } else {
                        String::new()
                    }
                );
            }
            if removed.failures.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                for f in &removed.failures {
                    eprintln!("could not remove {f}");
                }
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Status if canal_e2e::realnode::is_real(state) => real::status(state).await,
        Command::E2e { args } => real::e2e(state, &args).await,
        Command::NodeHolder { .. } => Ok(ExitCode::FAILURE),
        Command::ApiForward {
            netns,
            upstream,
            listen,
            port_file,
        } => {
            canal_e2e::realnode::forward::run(netns, upstream, listen, port_file).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status => {
            let ctx = Context::open(state).await?;
            let (text, healthy) = lab::status(&ctx).await?;
            print!("{text}");
            Ok(if healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Kubectl { args } => {
            state.load()?;
            let status = lab::kubectl(state)?
                .args(&args)
                .status()
                .map_err(|e| Error::Io("running kubectl".into(), e))?;
            Ok(ExitCode::from(status.code().unwrap_or(1) as u8))
        }
        Command::Canal { args } => {
            state.load()?;
            // Next to canal-agent (target/debug, the image's /usr/local/bin).
            let bin = canal_e2e::lab::default_bin_dir().join("kubectl-canal");
            let status = std::process::Command::new(&bin)
                .env("KUBECONFIG", state.kubeconfig())
                .args(&args)
                .status()
                .map_err(|e| Error::Io(format!("running {}", bin.display()), e))?;
            // 0 allowed, 1 denied, 2 error: passed on as they are.
            Ok(ExitCode::from(status.code().unwrap_or(2) as u8))
        }
        Command::Pod(PodCommand::Add {
            pod,
            node,
            labels,
            ports,
        }) => {
            let ctx = Context::open(state).await?;
            let (ns, name) = lab::pods::parse_key(&pod)?;
            let mut opts = PodOptions::new(&ns, &name, &node);
            for (k, v) in parse_labels(&labels)? {
                opts = opts.label(&k, &v);
            }
            if !ports.is_empty() {
                let ports = ports
                    .iter()
                    .map(|p| PodPort::parse(p).map_err(Error::Lab))
                    .collect::<Result<Vec<_>, _>>()?;
                opts = opts.ports(ports);
            }
            let record = lab::pods::add(&ctx, opts).await?;
            let ips: Vec<String> = record.ips.iter().map(ToString::to_string).collect();
            println!("pod {} on {}: {}", record.key(), record.node, ips.join(","));
            Ok(ExitCode::SUCCESS)
        }
        Command::Pod(PodCommand::Del { pod }) => {
            let ctx = Context::open(state).await?;
            let (ns, name) = lab::pods::parse_key(&pod)?;
            lab::pods::del(&ctx, &ns, &name).await?;
            println!("pod {pod} deleted");
            Ok(ExitCode::SUCCESS)
        }
        Command::Node(NodeCommand::Add { name }) => {
            let ctx = Context::open(state).await?;
            let added = lab::add_node(&ctx, &name, lab::DEFAULT_READY_TIMEOUT).await?;
            let addresses: Vec<String> = added
                .node
                .addresses()
                .iter()
                .map(ToString::to_string)
                .collect();
            print!(
                "node {} added ({}, netns {})",
                added.node.name,
                addresses.join(", "),
                added.node.netns
            );
            if let (Some(annotated), Some(routes)) =
                (added.annotated_after, added.routes_everywhere_after)
            {
                print!(
                    "; after its Node object was created: podCIDR and VTEP annotations in {} ms, routes to it on every other node in {} ms",
                    annotated.as_millis(),
                    routes.as_millis()
                );
            }
            println!(
                "; lab programmed after {} ms",
                added.programmed_after.as_millis()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Node(NodeCommand::Del { name }) => {
            let ctx = Context::open(state).await?;
            lab::del_node(&ctx, &name).await?;
            println!("node {name} removed");
            Ok(ExitCode::SUCCESS)
        }
        Command::Probe {
            from,
            to,
            port,
            protocol,
            timeout_ms,
            verbose,
            family,
        } => {
            let ctx = Context::open(state).await?;
            let target: Target = to.parse()?;
            let outcome = lab::probe_family(
                &ctx,
                &from,
                &target,
                family,
                port,
                protocol,
                Duration::from_millis(timeout_ms),
            )
            .await?;
            if verbose {
                match outcome.seen_source {
                    Some(src) => eprintln!(
                        "{from} -> {to}:{port}/{protocol}: server saw {src} after {} ms",
                        outcome.elapsed.as_millis()
                    ),
                    None => eprintln!(
                        "{from} -> {to}:{port}/{protocol}: {} after {} ms",
                        outcome.detail,
                        outcome.elapsed.as_millis()
                    ),
                }
            }
            if outcome.connected {
                println!("connected");
                Ok(ExitCode::SUCCESS)
            } else {
                println!("blocked");
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Matrix {
            port,
            protocol,
            json,
            timeout_ms,
            family,
        } => {
            let ctx = Context::open(state).await?;
            let run = lab::run_matrix(
                &ctx,
                &MatrixOptions {
                    port,
                    protocol,
                    family,
                    timeout: Duration::from_millis(timeout_ms),
                    ..MatrixOptions::default()
                },
            )
            .await?;
            if json {
                println!("{}", run.matrix.to_json());
            } else {
                let family = family.unwrap_or_else(|| ctx.lab.ip_family.primary());
                println!(
                    "{port}/{protocol} over {family} ('.' connected, 'X' blocked; rows: from, columns: to)"
                );
                print!("{}", run.matrix.render());
                println!(
                    "{}/{} pairs connected",
                    run.matrix.connected(),
                    run.matrix.len()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Images(ImagesCommand::Build { out, no_cargo }) => {
            let started = Instant::now();
            let opts = images::CanalImageOptions {
                out_dir: out,
                build: !no_cargo,
            };
            for image in images::build_all(&opts)? {
                println!("{} {}", image.reference, image.path.display());
            }
            eprintln!("images ready in {:.1}s", started.elapsed().as_secs_f64());
            Ok(ExitCode::SUCCESS)
        }
        Command::Images(ImagesCommand::Dockerfile { out, no_cargo }) => {
            let started = Instant::now();
            let mut opts = images::DockerfileBuild {
                build: !no_cargo,
                ..images::DockerfileBuild::default()
            };
            if let Some(out) = out {
                opts.out = out;
            }
            let path = images::dockerfile_build(&opts)?;
            println!("{}", path.display());
            eprintln!(
                "Dockerfile built in {:.1}s",
                started.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Forward { upstream, port } => {
            lab::forward::run(state.clone(), upstream, port).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Echo {
            listen,
            ready_file,
            bind,
        } => {
            let ports = listen
                .iter()
                .map(|l| {
                    PodPort::parse(l)
                        .map(|p| (p.port, p.protocol))
                        .map_err(Error::Lab)
                })
                .collect::<Result<Vec<_>, _>>()?;
            lab::echo::serve(&bind, &ports, ready_file).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Spoof {
            netns,
            src,
            dst,
            protocol,
            count,
        } => {
            let forged = lab::spoof::Forged {
                src,
                dst,
                kind: protocol,
                tag: std::process::id(),
                count,
            };
            lab::spoof::send_in(&netns, forged)?;
            println!("sent {count} packets from {src} to {dst}");
            Ok(ExitCode::SUCCESS)
        }
    }
}
