//! What a built image carries besides its disk: the Dockerfile's ENV, USER,
//! WORKDIR, CMD, ENTRYPOINT and the rest, as they stand after the last step.

use std::collections::BTreeMap;

use crate::dockerfile::CommandForm;

/// `PATH` when neither the base image nor the Dockerfile sets one (Docker's).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The runtime configuration of an image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `ENV`, in order of first definition; later values replace earlier ones.
    pub env: Vec<(String, String)>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    pub cmd: Option<CommandForm>,
    pub entrypoint: Option<CommandForm>,
    /// `SHELL` (default `/bin/sh -c`).
    pub shell: Option<Vec<String>>,
    pub exposed: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub stop_signal: Option<String>,
}

impl ImageConfig {
    pub fn set_env(&mut self, key: &str, value: &str) {
        match self.env.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value.to_string(),
            None => self.env.push((key.to_string(), value.to_string())),
        }
    }

    pub fn env_value(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn shell(&self) -> Vec<String> {
        self.shell
            .clone()
            .unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into()])
    }

    /// The argv of a command in either form.
    pub fn argv(&self, form: &CommandForm) -> Vec<String> {
        match form {
            CommandForm::Exec(argv) => argv.clone(),
            CommandForm::Shell(text) => {
                let mut argv = self.shell();
                argv.push(text.clone());
                argv
            }
        }
    }

    /// The app's command, combining ENTRYPOINT and CMD as Docker does: an
    /// exec-form ENTRYPOINT gets CMD's words appended; a shell-form
    /// ENTRYPOINT ignores CMD; without ENTRYPOINT, CMD alone. Empty: none.
    pub fn command(&self) -> Vec<String> {
        match (&self.entrypoint, &self.cmd) {
            (Some(CommandForm::Exec(entry)), cmd) => {
                let mut argv = entry.clone();
                if let Some(cmd) = cmd {
                    argv.extend(self.argv(cmd));
                }
                argv
            }
            (Some(entry @ CommandForm::Shell(_)), _) => self.argv(entry),
            (None, Some(cmd)) => self.argv(cmd),
            (None, None) => Vec::new(),
        }
    }

    /// The working directory for processes (`/` when unset).
    pub fn cwd(&self) -> String {
        self.workdir.clone().unwrap_or_else(|| "/".into())
    }

    /// The environment processes see: `ENV`, and `PATH` when it is unset.
    pub fn process_env(&self) -> Vec<(String, String)> {
        let mut env = self.env.clone();
        if self.env_value("PATH").is_none() {
            env.push(("PATH".into(), DEFAULT_PATH.into()));
        }
        env
    }
}

/// `dir` joined to the working directory as WORKDIR and COPY do: absolute
/// paths stand alone, relative ones are relative to `cwd`; `.` and `..`
/// components are resolved lexically (never above `/`).
pub fn resolve_path(cwd: &str, path: &str) -> String {
    let joined = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{cwd}/{path}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(words: &[&str]) -> CommandForm {
        CommandForm::Exec(words.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn entrypoint_and_cmd_combine_as_in_docker() {
        let mut c = ImageConfig::default();
        assert!(c.command().is_empty());
        c.cmd = Some(exec(&["python3", "app.py"]));
        assert_eq!(c.command(), ["python3", "app.py"]);
        c.cmd = Some(CommandForm::Shell("python3 app.py".into()));
        assert_eq!(c.command(), ["/bin/sh", "-c", "python3 app.py"]);
        c.entrypoint = Some(exec(&["tini", "--"]));
        assert_eq!(
            c.command(),
            ["tini", "--", "/bin/sh", "-c", "python3 app.py"]
        );
        c.entrypoint = Some(CommandForm::Shell("exec run".into()));
        assert_eq!(c.command(), ["/bin/sh", "-c", "exec run"]);
        c.shell = Some(vec!["/bin/bash".into(), "-lc".into()]);
        assert_eq!(c.command(), ["/bin/bash", "-lc", "exec run"]);
    }

    #[test]
    fn env_and_paths() {
        let mut c = ImageConfig::default();
        c.set_env("A", "1");
        c.set_env("B", "2");
        c.set_env("A", "3");
        assert_eq!(c.env, [("A".into(), "3".into()), ("B".into(), "2".into())]);
        assert!(c
            .process_env()
            .iter()
            .any(|(k, v)| k == "PATH" && v == DEFAULT_PATH));
        assert_eq!(resolve_path("/app", "src"), "/app/src");
        assert_eq!(resolve_path("/app", "/srv/../x/./y"), "/x/y");
        assert_eq!(resolve_path("/", "../../.."), "/");
    }
}
