//! The client verbs that reach into a running microVM through its endpoint:
//! `hearth exec`, `hearth cp` (the agent API under `/.hearth/v1/`, with a
//! shell token, so the microVM needs SHELL_INGRESS) and `hearth port-forward`
//! (the app's ports, with an endpoint token).

use std::process::ExitCode;

use clap::Subcommand;

use crate::connect::{self, EXIT_FAILURE};
use crate::cp_cli::{self, CpArgs};
use crate::exec_cli::{self, ExecArgs};
use crate::port_forward::{self, PortForwardArgs};

#[derive(Debug, Subcommand)]
pub enum GuestCommand {
    /// Run a command in a microVM, streaming its output; exits with its status.
    ///
    /// Needs SHELL_INGRESS (`hearth run IMAGE --shell`): the command runs as
    /// root through the endpoint's agent API, streamed both ways over a
    /// WebSocket. Exit status: the command's; 128+N when a signal N killed it;
    /// 124 when --timeout killed it; 1 when hearth itself failed.
    Exec(ExecArgs),
    /// Copy a file into or out of a microVM (streamed; any size).
    ///
    /// `hearth cp LOCAL ID:/path` or `hearth cp ID:/path LOCAL`. Needs SHELL_INGRESS. An upload keeps the local file's mode (or --mode)
    /// and creates missing parent directories; a path ending in `/` (or a
    /// local directory as DST) receives the file under its own name.
    /// Directories are not copied: pipe tar through `hearth exec -i`.
    Cp(CpArgs),
    /// Forward a local port to a microVM's port, adding the token (as kubectl port-forward).
    ///
    /// `hearth port-forward ID [LOCAL:]REMOTE` listens on 127.0.0.1:LOCAL. HTTP/1.1 only (WebSocket upgrades included): each request on a local
    /// connection is sent to the endpoint with X-aws-proxy-auth and
    /// X-aws-proxy-port. The token (CreateMicrovmAuthToken for that port) is
    /// renewed before it expires. Runs until interrupted (then exits 0).
    PortForward(PortForwardArgs),
}

pub async fn main(command: GuestCommand) -> ExitCode {
    match command {
        GuestCommand::Exec(args) => {
            let json = args.connect.json;
            match exec_cli::exec(args).await {
                Ok(code) => code,
                Err(err) => {
                    connect::print_error(&err, json);
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        GuestCommand::Cp(args) => {
            let json = args.connect.json;
            connect::report(cp_cli::cp(args).await, json)
        }
        GuestCommand::PortForward(args) => {
            let json = args.connect.json;
            connect::report(port_forward::run(args).await, json)
        }
    }
}
