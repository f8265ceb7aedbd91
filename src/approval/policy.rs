//! Which of the agent's tool calls run without asking the operator (pure).
//!
//! A tool call in, a verdict out: allowed (with the rule that allowed it)
//! or for the operator to decide (with why, and what it would do where the
//! policy knows). The rule is "read-only diagnosis runs, everything else
//! waits": the file tools that only read, `ssh pve status|forensics`, and
//! `ssh devvm <command>` where the command is a plain read-only diagnosis
//! from the allow-list below (or from the operator's policy file). Anything
//! that does not parse, chains or substitutes commands, redirects, passes
//! ssh options, or is not on a list, waits.

use std::path::{Component, Path};

use serde::Deserialize;
use serde_json::Value;

/// What happens to a tool call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Runs at once; the reason names the rule.
    Allow { reason: String },
    /// Waits for the operator; the reason says why, `effect` what it would
    /// do in plain words where the policy knows.
    Ask { reason: String, effect: Option<String> },
}

impl Verdict {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Verdict::Allow { .. })
    }

    fn allow(reason: impl Into<String>) -> Self {
        Verdict::Allow { reason: reason.into() }
    }

    fn ask(reason: impl Into<String>) -> Self {
        Verdict::Ask { reason: reason.into(), effect: None }
    }
}

/// The operator's additions to the allow-list (`BREAKGLASS_POLICY_FILE`),
/// each with its reason:
///
/// ```toml
/// [[allow]]
/// host = "devvm"
/// command = "docker ps"      # the command's first words
/// reason = "lists containers; changes nothing"
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub allow: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// `devvm` or `pve`.
    pub host: String,
    /// The remote command's first words; more words may follow unless `exact`.
    pub command: String,
    pub reason: String,
    #[serde(default)]
    pub exact: bool,
}

impl Policy {
    /// Parses a policy file's text, refusing rules that could never be safe
    /// to match (empty, or with shell metacharacters).
    pub fn from_toml(text: &str) -> Result<Policy, String> {
        let policy: Policy = toml::from_str(text).map_err(|e| e.to_string())?;
        for rule in &policy.allow {
            if !matches!(rule.host.as_str(), "devvm" | "pve") {
                return Err(format!("rule {:?}: host must be devvm or pve", rule.command));
            }
            if rule.command.split_whitespace().next().is_none() || has_metacharacters(&rule.command) {
                return Err(format!("rule {:?}: give plain words, no shell metacharacters or quotes", rule.command));
            }
            if rule.reason.trim().is_empty() {
                return Err(format!("rule {:?}: give its reason", rule.command));
            }
        }
        Ok(policy)
    }

    /// The verdict on one tool call (`tool_name`, `tool_input` of the
    /// agent's `PreToolUse` hook).
    pub fn check(&self, tool: &str, input: &Value) -> Verdict {
        match tool {
            "Read" | "Grep" | "Glob" => Verdict::allow(format!("{tool} only reads")),
            "Bash" => match input.get("command").and_then(Value::as_str) {
                Some(command) => self.check_command(command),
                None => Verdict::ask("a Bash call without a command"),
            },
            other => Verdict::ask(format!("{other} is not on the list of tools that run without asking")),
        }
    }

    /// The verdict on one shell command line.
    pub fn check_command(&self, command: &str) -> Verdict {
        if command.chars().any(|c| matches!(c, '\n' | '\r' | '\0')) {
            return Verdict::ask("the command spans several lines");
        }
        if command.contains('#') {
            return Verdict::ask("the command holds a comment or a '#'");
        }
        let Some(words) = shlex::split(command) else {
            return Verdict::ask("the command does not parse (unbalanced quotes)");
        };
        let (Some("ssh"), Some(host)) = (words.first().map(String::as_str), words.get(1).map(String::as_str)) else {
            return Verdict::ask("only `ssh devvm …` and `ssh pve …` run without asking");
        };
        if host.starts_with('-') {
            return Verdict::ask("ssh options (-o, -J, …) can run other commands");
        }
        // ssh joins its arguments with spaces and the remote shell parses
        // the result: with no metacharacters and no quotes left, that is
        // plain word splitting, and the words below are what will run.
        let remote = words[2..].join(" ");
        if has_metacharacters(&remote) {
            return Verdict::ask("the command chains, substitutes, redirects, quotes or globs");
        }
        let argv: Vec<&str> = remote.split_whitespace().collect();
        if argv.is_empty() {
            return Verdict::ask("an interactive login");
        }
        if let Some(rule) = self.allow.iter().find(|rule| rule.host == host && rule.matches(&argv)) {
            return Verdict::allow(format!("policy file: {}", rule.reason));
        }
        match host {
            "pve" => pve_verdict(&argv),
            "devvm" => match read_only(&argv) {
                Some(reason) => Verdict::allow(reason),
                None => Verdict::ask(format!("`{}` is not a read-only diagnosis on the list", argv.join(" "))),
            },
            other => Verdict::ask(format!("{other} is not one of the agent's hosts (devvm, pve)")),
        }
    }
}

impl Rule {
    fn matches(&self, argv: &[&str]) -> bool {
        let words: Vec<&str> = self.command.split_whitespace().collect();
        argv.starts_with(&words) && (!self.exact || argv.len() == words.len())
    }
}

/// Characters the remote shell would treat as more than a word.
fn has_metacharacters(s: &str) -> bool {
    s.chars().any(|c| {
        matches!(
            c,
            ';' | '&'
                | '|'
                | '<'
                | '>'
                | '('
                | ')'
                | '{'
                | '}'
                | '$'
                | '`'
                | '\\'
                | '"'
                | '\''
                | '*'
                | '?'
                | '['
                | ']'
                | '~'
                | '#'
                | '!'
                | '\n'
                | '\r'
                | '\0'
        )
    })
}

fn pve_verdict(argv: &[&str]) -> Verdict {
    let effect = |effect: &str, reason: &str| Verdict::Ask { reason: reason.into(), effect: Some(effect.into()) };
    match argv {
        ["status"] => Verdict::allow("ssh pve status only reads the VM's state"),
        ["forensics"] => Verdict::allow("ssh pve forensics only reads and saves a dump"),
        ["reset"] => effect("hard reset of the VM: unsaved guest state is lost", "a power verb that changes the VM"),
        ["stop"] => effect("hard stop of the VM: it is off until started", "a power verb that changes the VM"),
        ["start"] => effect("starts the VM", "a power verb that changes the VM"),
        ["cycle"] => effect(
            "stops the VM (hard) and starts it again: unsaved guest state is lost",
            "a power verb that changes the VM",
        ),
        _ => Verdict::ask("not one of the hypervisor's verbs"),
    }
}

/// Why a command on the target only reads, when it is on the allow-list.
fn read_only(argv: &[&str]) -> Option<String> {
    let (program, args) = argv.split_first()?;
    let flags_only = || args.iter().all(|a| a.starts_with('-'));
    let reason = |what: &str| Some(format!("{program}: {what}"));
    match *program {
        "uptime" | "free" | "hostname" | "uname" | "id" | "whoami" | "date" | "w" | "who" | "nproc" | "lscpu"
        | "lsmem" | "lsblk" | "vmstat" | "findmnt"
            if flags_only() =>
        {
            reason("reports the system's state")
        }
        "mount" if args.is_empty() => reason("lists mounts"),
        "df" | "ps" => reason("reports the system's state"),
        // `ss -K` closes the sockets it lists.
        "ss" if !args
            .iter()
            .any(|a| *a == "--kill" || (a.starts_with('-') && !a.starts_with("--") && a.contains('K'))) =>
        {
            reason("reports the system's state")
        }
        "top" if matches!(args, ["-bn1"] | ["-b", "-n", "1"] | ["-b", "-n1"] | ["-n", "1", "-b"]) => {
            reason("one batch snapshot")
        }
        "systemctl" => systemctl(args).then(|| format!("systemctl {}: only reads", args.join(" "))),
        "journalctl" => journalctl(args).then(|| "journalctl: reads the journal".to_owned()),
        "dmesg" => dmesg(args).then(|| "dmesg: reads the kernel log".to_owned()),
        "ip" => ip(args).then(|| "ip: shows addresses and routes".to_owned()),
        "cat" | "head" | "tail" | "ls" | "wc" | "stat" => {
            files(args).then(|| format!("{program}: reads under /proc, /sys or /var/log"))
        }
        _ => None,
    }
}

fn systemctl(args: &[&str]) -> bool {
    let mut words = args.iter().filter(|a| !matches!(**a, "--no-pager" | "-l" | "--full" | "--all" | "-a"));
    match words.next().copied() {
        Some("--failed") | None => words.all(|w| w.starts_with("--type=") || *w == "--failed"),
        Some("status" | "list-units" | "list-timers" | "is-active" | "is-failed" | "show" | "cat") => words
            .all(|w| !w.starts_with('-') || w.starts_with("--type=") || w.starts_with("--state=") || *w == "--failed"),
        _ => false,
    }
}

fn journalctl(args: &[&str]) -> bool {
    const WRITES: &[&str] = &[
        "--vacuum",
        "--rotate",
        "--flush",
        "--sync",
        "--relinquish-var",
        "--smart-relinquish-var",
        "--setup-keys",
        "--update-catalog",
        "--follow",
        "-f",
    ];
    args.iter().all(|a| !WRITES.iter().any(|w| a.starts_with(w)))
}

fn dmesg(args: &[&str]) -> bool {
    const CHANGES: &[&str] =
        &["-c", "-C", "-D", "-E", "-n", "-w", "-W", "--clear", "--read-clear", "--console", "--follow"];
    args.iter().all(|a| !CHANGES.iter().any(|c| a == c || (c.starts_with("--") && a.starts_with(c))))
}

fn ip(args: &[&str]) -> bool {
    let words: Vec<&str> = args.iter().copied().filter(|a| !a.starts_with('-')).collect();
    let Some((object, rest)) = words.split_first() else {
        return false;
    };
    matches!(*object, "addr" | "address" | "a" | "route" | "r" | "ro" | "link" | "l" | "neigh" | "n")
        && rest.iter().all(|w| matches!(*w, "show" | "list" | "ls" | "dev") || !is_ip_command(w))
        && rest.first().is_none_or(|w| matches!(*w, "show" | "list" | "ls"))
}

/// `ip` subcommands that change something.
fn is_ip_command(word: &str) -> bool {
    matches!(
        word,
        "add" | "del" | "delete" | "change" | "replace" | "flush" | "set" | "append" | "prepend" | "save" | "restore"
    )
}

/// Paths only under /proc, /sys and /var/log, never climbing out; options
/// that follow a file for ever are refused.
fn files(args: &[&str]) -> bool {
    let mut paths = 0;
    for arg in args {
        if arg.starts_with('-') {
            if matches!(*arg, "-f" | "-F" | "--follow") || arg.starts_with("--follow") {
                return false;
            }
            continue;
        }
        if arg.bytes().all(|b| b.is_ascii_digit()) {
            continue; // `tail -n 50`
        }
        let path = Path::new(arg);
        let inside = ["/proc", "/sys", "/var/log"].iter().any(|root| path.starts_with(root));
        if !inside || path.components().any(|c| matches!(c, Component::ParentDir)) {
            return false;
        }
        paths += 1;
    }
    paths > 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bash(command: &str) -> Verdict {
        Policy::default().check("Bash", &json!({ "command": command, "description": "x" }))
    }

    #[test]
    fn read_only_diagnosis_runs_and_everything_else_waits() {
        let allowed = [
            "ssh devvm uptime",
            "ssh devvm 'free -m'",
            "ssh devvm \"df -h /\"",
            "ssh devvm ps aux",
            "ssh devvm top -bn1",
            "ssh devvm systemctl --failed",
            "ssh devvm systemctl status nginx",
            "ssh devvm systemctl list-units --type=service --state=failed",
            "ssh devvm journalctl -u nginx -n 200 --no-pager",
            "ssh devvm dmesg -T",
            "ssh devvm ss -tlnp",
            "ssh devvm ip addr",
            "ssh devvm ip -br a show",
            "ssh devvm ip route",
            "ssh devvm tail -n 100 /var/log/syslog",
            "ssh devvm cat /proc/meminfo",
            "ssh devvm ls -la /sys/fs/cgroup",
            "ssh pve status",
            "ssh pve forensics",
        ];
        for command in allowed {
            assert!(bash(command).is_allowed(), "{command}: {:?}", bash(command));
        }
        let waits = [
            // Chained, substituted, redirected, globbed, several lines.
            "ssh devvm 'uptime; reboot'",
            "ssh devvm uptime; rm -rf /",
            "ssh devvm uptime && curl evil",
            "ssh devvm uptime || true",
            "ssh devvm uptime | sh",
            "ssh devvm $(reboot)",
            "ssh devvm `reboot`",
            "ssh devvm 'cat /var/log/syslog' > /tmp/x",
            "ssh devvm cat /var/log/*.log",
            "ssh devvm uptime\nreboot",
            "ssh devvm uptime # comment",
            // Diagnosis tools with an option that changes something.
            "ssh devvm ss -K dst 10.0.0.1",
            "ssh devvm ss -tnK",
            "ssh devvm ss --kill",
            "ssh devvm 'uptime",
            "ssh devvm \"cat '/var/log/a b'\"",
            // ssh options and other hosts or programs.
            "ssh -o ProxyCommand=reboot devvm uptime",
            "ssh devvm -o ProxyCommand=reboot uptime",
            "ssh -J jump devvm uptime",
            "ssh prod uptime",
            "ssh devvm",
            "/usr/bin/ssh devvm uptime",
            "uptime",
            "rm -rf /",
            "sudo ssh devvm uptime",
            // Writes, restarts, kills, sudo on the target.
            "ssh devvm sudo systemctl restart nginx",
            "ssh devvm systemctl restart nginx",
            "ssh devvm systemctl stop nginx",
            "ssh devvm kill -9 1234",
            "ssh devvm rm /var/log/syslog",
            "ssh devvm journalctl --vacuum-time=1d",
            "ssh devvm journalctl -f",
            "ssh devvm dmesg -c",
            "ssh devvm ip addr add 10.0.0.1/24 dev eth0",
            "ssh devvm ip route flush all",
            "ssh devvm tail -f /var/log/syslog",
            "ssh devvm cat /etc/shadow",
            "ssh devvm cat /var/log/../../etc/shadow",
            "ssh devvm mount /dev/sdb1 /mnt",
            "ssh devvm top",
            // Power verbs that change the VM, and what is not a verb.
            "ssh pve reset",
            "ssh pve cycle",
            "ssh pve stop",
            "ssh pve start",
            "ssh pve status extra",
            "ssh pve 'status; id'",
        ];
        for command in waits {
            assert!(!bash(command).is_allowed(), "{command:?} must wait for the operator");
        }
    }

    #[test]
    fn the_tools_that_only_read_run_and_others_wait() {
        let policy = Policy::default();
        for tool in ["Read", "Grep", "Glob"] {
            assert!(policy.check(tool, &json!({ "file_path": "/x" })).is_allowed(), "{tool}");
        }
        for tool in ["Write", "Edit", "WebFetch", "Task", "NotebookEdit"] {
            assert!(!policy.check(tool, &json!({})).is_allowed(), "{tool}");
        }
        assert!(!policy.check("Bash", &json!({ "description": "no command" })).is_allowed());
    }

    #[test]
    fn a_power_verb_says_what_it_will_do() {
        let Verdict::Ask { effect, .. } = bash("ssh pve reset") else { panic!("reset must wait") };
        assert_eq!(effect.as_deref(), Some("hard reset of the VM: unsaved guest state is lost"));
    }

    #[test]
    fn the_policy_file_extends_the_list_with_its_reasons() {
        let policy = Policy::from_toml(
            r#"
            [[allow]]
            host = "devvm"
            command = "docker ps"
            reason = "lists containers; changes nothing"

            [[allow]]
            host = "devvm"
            command = "systemctl restart nginx"
            reason = "the runbook's first step"
            exact = true
            "#,
        )
        .unwrap();
        let check = |c: &str| policy.check_command(c);
        assert_eq!(check("ssh devvm docker ps -a"), Verdict::allow("policy file: lists containers; changes nothing"));
        assert!(check("ssh devvm systemctl restart nginx").is_allowed());
        assert!(!check("ssh devvm systemctl restart nginx postgres").is_allowed(), "exact");
        assert!(!check("ssh devvm docker ps; docker rm -f x").is_allowed(), "metacharacters still wait");
        assert!(!check("ssh pve docker ps").is_allowed(), "rules are per host");

        for bad in [
            "[[allow]]\nhost = \"devvm\"\ncommand = \"docker ps; reboot\"\nreason = \"x\"",
            "[[allow]]\nhost = \"prod\"\ncommand = \"docker ps\"\nreason = \"x\"",
            "[[allow]]\nhost = \"devvm\"\ncommand = \"docker ps\"\nreason = \" \"",
            "[[allow]]\nhost = \"devvm\"\ncommand = \"\"\nreason = \"x\"",
            "[[allow]]\nhost = \"devvm\"\ncommand = \"x\"\nreason = \"x\"\nregex = \".*\"",
        ] {
            assert!(Policy::from_toml(bad).is_err(), "{bad}");
        }
    }
}
