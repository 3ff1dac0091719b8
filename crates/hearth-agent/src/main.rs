//! hearth-agent: the guest's PID 1 and the host's agent inside the VM.
//!
//! As PID 1 it boots the guest (modules, root filesystem, basic system set-up),
//! reaps every process, and serves the hearth protocol on the `hearth.agent`
//! virtio-serial port. Started by hand it serves the same protocol on a Unix
//! socket (`--unix-listen PATH`) or a given device (`--port PATH`), for tests.

mod applog;
mod applog_stream;
mod channel;
mod children;
mod exec;
mod files;
mod init;
mod log;
mod process;
mod pty;
mod session;
mod stream;
mod sys;
mod system;
mod tcp;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use children::Children;
use stream::Agent;

const USAGE: &str = "usage: hearth-agent [--unix-listen PATH | --port PATH]";

/// Where the protocol is served.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Listen {
    /// The virtio-serial port, found by name, or a fixed device path.
    Port(Option<PathBuf>),
    /// A Unix socket, for tests on the host.
    Unix(PathBuf),
}

fn parse_args(args: &[String]) -> Result<Listen, String> {
    match args {
        [] => Ok(Listen::Port(None)),
        [flag, path] if flag == "--unix-listen" => Ok(Listen::Unix(PathBuf::from(path))),
        [flag, path] if flag == "--port" => Ok(Listen::Port(Some(PathBuf::from(path)))),
        _ => Err(USAGE.to_owned()),
    }
}

fn main() {
    std::panic::set_hook(Box::new(|info| log!("panic: {info}")));
    let is_init = std::process::id() == 1;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let listen = match parse_args(&args) {
        Ok(listen) => listen,
        // The kernel hands unrecognised command-line words to init as arguments;
        // PID 1 ignores what it does not understand and serves the virtio port.
        Err(_) if is_init => Listen::Port(None),
        Err(usage) => {
            log!("{usage}");
            std::process::exit(2);
        }
    };
    if is_init {
        init::boot();
    }
    let agent = Arc::new(Agent {
        children: Arc::new(Children::default()),
        is_init,
        started: Instant::now(),
        app_log: Arc::default(),
    });
    loop {
        let outcome = std::panic::catch_unwind(|| serve(&listen, &agent));
        match outcome {
            Ok(Ok(())) => log!("service stopped unexpectedly"),
            Ok(Err(err)) => log!("{err}"),
            Err(_) => log!("service panicked"),
        }
        if !is_init {
            std::process::exit(1);
        }
        // PID 1 must never exit: start over after a pause.
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Builds the runtime and serves until something fatal happens.
fn serve(listen: &Listen, agent: &Arc<Agent>) -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("hearth-agent")
        .build()?;
    runtime.block_on(async {
        tokio::spawn(children::run_reaper(agent.children.clone()));
        if agent.is_init {
            tokio::spawn(children::forward_signals(agent.children.clone()));
        }
        if let Some((stdout, stderr)) = applog::pipe_paths(agent.is_init) {
            tokio::spawn(applog::capture(agent.app_log.clone(), stdout, stderr));
        }
        match listen {
            Listen::Unix(path) => {
                let serving = tokio::spawn(channel::serve_unix(path.clone(), agent.clone()));
                serving.await??;
            }
            Listen::Port(path) => {
                // Restarted if it ever panics: the port is the only way in.
                loop {
                    let serving = tokio::spawn(channel::serve_port(path.clone(), agent.clone()));
                    if let Err(err) = serving.await {
                        log!("port service failed: {err}; restarting");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn argument_parsing() {
        assert_eq!(parse_args(&[]), Ok(Listen::Port(None)));
        assert_eq!(
            parse_args(&strings(&["--unix-listen", "/tmp/a"])),
            Ok(Listen::Unix(PathBuf::from("/tmp/a")))
        );
        assert_eq!(
            parse_args(&strings(&["--port", "/dev/vport0p1"])),
            Ok(Listen::Port(Some(PathBuf::from("/dev/vport0p1"))))
        );
        assert!(parse_args(&strings(&["--bogus"])).is_err());
    }
}
