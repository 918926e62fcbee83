//! `hearth-guest`: runs as PID 1 in a hearth VM (mounts, modules, network, reaping,
//! power-off) or as a plain process with `--listen ADDR` (tests).

use std::net::SocketAddr;

use hearth_guest::{cmdline, growfs, init, net, state::AgentState, PROBE_MARKER, READY_MARKER};

fn main() {
    let is_init = std::process::id() == 1;
    if is_init && std::env::args().next().as_deref() == Some("/init") {
        // Started from the initramfs: mount the real root and exec ourselves from it.
        init::stage1();
    }
    let mut listen: SocketAddr = SocketAddr::from(([0, 0, 0, 0], hearth_proto::GUEST_AGENT_PORT));
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => match args.next().map(|v| v.parse()) {
                Some(Ok(addr)) => listen = addr,
                _ => {
                    eprintln!("--listen needs an address like 127.0.0.1:49983");
                    std::process::exit(2);
                }
            },
            "--help" | "-h" => {
                println!("usage: hearth-guest [--listen ADDR]");
                return;
            }
            // The kernel passes unknown command line words to init; ignore them.
            _ if is_init => {}
            other => {
                eprintln!("unknown argument {other:?}");
                std::process::exit(2);
            }
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();

    let mut boot = cmdline::BootParams::default();
    if is_init {
        if let Err(e) = init::mount_filesystems() {
            init::console(&format!("hearth-guest: {e}: {}", source_text(&e)));
            init::power_off();
        }
        let raw_cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        boot = cmdline::parse(&raw_cmdline);
        if boot.probe {
            init::console(PROBE_MARKER);
            init::power_off();
        }
        init::load_modules(std::path::Path::new(init::MODULES_DIR));
        growfs::grow_root(&init::root_params(&raw_cmdline).device);
        if let Some(h) = &boot.hostname {
            init::set_hostname(h);
        }
    }

    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            init::console(&format!("hearth-guest: cannot start the runtime: {e}"));
            if is_init {
                init::power_off();
            }
            std::process::exit(1);
        }
    };
    let code = rt.block_on(run(is_init, boot, listen));
    if is_init {
        init::power_off();
    }
    std::process::exit(code);
}

fn source_text(e: &dyn std::error::Error) -> String {
    e.source().map(|s| s.to_string()).unwrap_or_default()
}

async fn run(is_init: bool, boot: cmdline::BootParams, listen: SocketAddr) -> i32 {
    hearth_guest::reaper::start();
    if is_init {
        if let Err(e) = net::configure(boot.ip, boot.gateway).await {
            tracing::error!(error = %e, detail = %source_text(&e), "network setup failed");
        }
    }
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%listen, error = %e, "cannot listen");
            return 1;
        }
    };
    let state = if is_init {
        AgentState::with_defaults(hearth_guest::state::Defaults::from_image(
            std::path::Path::new(hearth_guest::state::IMAGE_DEFAULTS),
        ))
    } else {
        AgentState::default()
    };
    match listener.local_addr() {
        Ok(a) if !is_init => eprintln!("listening on {a}"),
        _ => {}
    }
    init::console(READY_MARKER);
    let server = hearth_guest::serve(listener, state.clone());
    let shutdown = async {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
            }
            _ => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        r = server => {
            if let Err(e) = r {
                tracing::error!(error = %e, "server failed");
                return 1;
            }
            0
        }
        _ = shutdown => {
            tracing::info!("shutting down");
            state.processes.kill_all();
            0
        }
    }
}
