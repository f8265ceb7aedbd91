//! Which of the agent's tool calls run without asking the operator (pure).
//!
//! A tool call in, a verdict out: allowed (with the rule that allowed it)
//! or for the operator to decide (with why, and what it would do where the
//! policy knows). The rule is "read-only diagnosis runs, everything else
//! waits": the file tools that only read, `ssh pve status|forensics`, and
//! `ssh devvm <command>` where the command is a plain read-only diagnosis
//! from the allow-list in `read_only` (or from the operator's policy file). Anything
//! that does not parse, chains or substitutes commands, redirects, passes
//! ssh options, or is not on a list, waits.

mod read_only;

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
            "devvm" => match read_only::read_only(&argv) {
                Ok(reason) => Verdict::allow(reason),
                Err(reason) => Verdict::ask(reason),
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

    /// The commands among `commands` that the policy would run unasked.
    fn allowed_among<'a>(commands: &[&'a str]) -> Vec<&'a str> {
        commands.iter().copied().filter(|c| bash(c).is_allowed()).collect()
    }

    /// The commands among `commands` that would wait, with the reasons.
    fn waiting_among(commands: &[&str]) -> Vec<String> {
        commands
            .iter()
            .filter_map(|c| match bash(c) {
                Verdict::Allow { .. } => None,
                Verdict::Ask { reason, .. } => Some(format!("{c}: {reason}")),
            })
            .collect()
    }

    #[test]
    fn common_read_only_forms_run() {
        let commands = [
            "ssh devvm journalctl -xe",
            "ssh devvm journalctl -b -1 -p err --no-pager",
            "ssh devvm journalctl -k -n 50",
            "ssh devvm journalctl -u nginx --since today -o export",
            "ssh devvm journalctl -n200 -o short-precise _PID=1",
            "ssh devvm journalctl --output-fields=MESSAGE -o json -n 5",
            "ssh devvm dmesg -T --level=err,warn",
            "ssh devvm dmesg -T -l err",
            "ssh devvm df -i",
            "ssh devvm df -hT /var",
            "ssh devvm free -h",
            "ssh devvm free -m",
            "ssh devvm uptime -p",
            "ssh devvm uname -a",
            "ssh devvm hostname",
            "ssh devvm hostname -I",
            "ssh devvm date",
            "ssh devvm date -u",
            "ssh devvm date -Iseconds",
            "ssh devvm date +%s",
            "ssh devvm lsblk -f",
            "ssh devvm vmstat",
            "ssh devvm vmstat 1 5",
            "ssh devvm vmstat -w 2 3",
            "ssh devvm findmnt",
            "ssh devvm findmnt -T /var",
            "ssh devvm who",
            "ssh devvm who -b",
            "ssh devvm w",
            "ssh devvm ss -s",
            "ssh devvm ss -tunap",
            "ssh devvm ss -tn state established",
            "ssh devvm ip -4 addr show dev eth0",
            "ssh devvm ip -s link",
            "ssh devvm ip -j -p route show table main",
            "ssh devvm ip neigh",
            "ssh devvm ps -Ao pid,ppid,cmd,%mem --sort=-%mem",
            "ssh devvm ps -A -o pid,user,etime,args -p 1,2",
            "ssh devvm ps -ef --forest",
            "ssh devvm ps auxf",
            "ssh devvm top -b -n 1",
            "ssh devvm top -n 1 -b",
            "ssh devvm stat /var/log/syslog",
            "ssh devvm wc -l /var/log/syslog",
            "ssh devvm head -c 4096 /var/log/syslog",
            "ssh devvm tail -200 /var/log/syslog",
            "ssh devvm tail -n +1 /var/log/dpkg.log",
            "ssh devvm cat /proc/1/status",
            "ssh devvm cat /proc/self/mountinfo",
            "ssh devvm cat /proc/1/task/1/stack",
            "ssh devvm cat /proc/pressure/memory",
            "ssh devvm cat /proc/sys/vm/swappiness",
            "ssh devvm cat /proc/net/dev",
            "ssh devvm ls -la /proc/1",
            "ssh devvm ls /proc",
            "ssh devvm cat /sys/fs/cgroup/memory.pressure",
            "ssh devvm systemctl status nginx --no-pager -l",
            "ssh devvm systemctl is-active nginx",
            "ssh devvm systemctl show nginx -p ActiveState",
            "ssh devvm systemctl --no-pager status nginx",
            "ssh devvm systemctl list-timers --all",
        ];
        assert_eq!(waiting_among(&commands), Vec::<String>::new());
    }

    #[test]
    fn date_and_hostname_that_would_set_or_read_a_file_wait() {
        let commands = [
            "ssh devvm date -s@0",
            "ssh devvm date -s 2001-01-01",
            "ssh devvm date --set=2001-01-01",
            "ssh devvm date --se=2001-01-01",
            "ssh devvm date 010100002001",
            "ssh devvm date -f /etc/shadow",
            "ssh devvm hostname --file=/proc/sys/kernel/random/uuid",
            "ssh devvm hostname -F /etc/hostname",
            "ssh devvm hostname newname",
            "ssh devvm hostname -b newname",
            "ssh devvm uname --kernel-name=x",
        ];
        assert_eq!(allowed_among(&commands), Vec::<&str>::new());
    }

    #[test]
    fn ss_options_that_kill_read_files_or_never_end_wait() {
        let commands = [
            "ssh devvm ss --ki",
            "ssh devvm ss --kil",
            "ssh devvm ss -K",
            "ssh devvm ss -tnK",
            "ssh devvm ss -D /etc/nologin",
            "ssh devvm ss --diag=/x",
            "ssh devvm ss -F file",
            "ssh devvm ss --filter=file",
            "ssh devvm ss -E",
            "ssh devvm ss --events",
            "ssh devvm ss -N netns",
            "ssh devvm ss --net=netns",
        ];
        assert_eq!(allowed_among(&commands), Vec::<&str>::new());
    }

    #[test]
    fn dmesg_options_that_clear_change_read_files_or_follow_wait() {
        let commands = [
            "ssh devvm dmesg -Tc",
            "ssh devvm dmesg -TC",
            "ssh devvm dmesg -n1",
            "ssh devvm dmesg -n 1",
            "ssh devvm dmesg --cl",
            "ssh devvm dmesg --rea",
            "ssh devvm dmesg -F /etc/shadow",
            "ssh devvm dmesg --file=/etc/shadow",
            "ssh devvm dmesg -w",
            "ssh devvm dmesg -Tw",
            "ssh devvm dmesg -W",
            "ssh devvm dmesg -S",
            "ssh devvm dmesg -D",
            "ssh devvm dmesg -E",
            "ssh devvm dmesg --console-off",
        ];
        assert_eq!(allowed_among(&commands), Vec::<&str>::new());
    }

    #[test]
    fn journalctl_abbreviated_writers_followers_and_other_journals_wait() {
        let commands = [
            "ssh devvm journalctl --rot",
            "ssh devvm journalctl --fl",
            "ssh devvm journalctl --syn",
            "ssh devvm journalctl --up",
            "ssh devvm journalctl --se",
            "ssh devvm journalctl --rel",
            "ssh devvm journalctl --sm",
            "ssh devvm journalctl --vacuum-size=1",
            "ssh devvm journalctl --cursor-file=/etc/nologin",
            "ssh devvm journalctl -f",
            "ssh devvm journalctl -ef",
            "ssh devvm journalctl -u nginx -f",
            "ssh devvm journalctl --follow",
            "ssh devvm journalctl --file=/etc/shadow",
            "ssh devvm journalctl -i /etc/shadow",
            "ssh devvm journalctl -D /root",
            "ssh devvm journalctl --directory=/root",
            "ssh devvm journalctl --root=/mnt",
            "ssh devvm journalctl -M other",
            "ssh devvm journalctl -n --flush",
        ];
        assert_eq!(allowed_among(&commands), Vec::<&str>::new());
    }

    #[test]
    fn reports_that_repeat_for_ever_or_read_files_wait() {
        let commands = [
            "ssh devvm free -s1",
            "ssh devvm free -s 1",
            "ssh devvm free -c5",
            "ssh devvm free --seconds=1",
            "ssh devvm findmnt --poll",
            "ssh devvm findmnt -p",
            "ssh devvm findmnt -F /etc/shadow",
            "ssh devvm vmstat 1",
            "ssh devvm vmstat 1 100000",
            "ssh devvm vmstat 3600 2",
            "ssh devvm top -b",
            "ssh devvm top -b -n 100000",
            "ssh devvm top -bn1 -d 100000",
            "ssh devvm who /etc/shadow",
            "ssh devvm who /var/log/wtmp",
            "ssh devvm w /etc/shadow",
            "ssh devvm uptime /etc/shadow",
            "ssh devvm ps auxe",
            "ssh devvm ps e",
            "ssh devvm ps -auxe",
            "ssh devvm ps -uxe",
            "ssh devvm ps -auex",
            "ssh devvm ps -eo pid,args",
            "ssh devvm ps -Aoetime",
            "ssh devvm ps -u xe",
            "ssh devvm df --sync",
            "ssh devvm lsblk /etc/shadow",
            "ssh devvm lscpu --sysroot=/root",
        ];
        assert_eq!(allowed_among(&commands), Vec::<&str>::new());
    }

    #[test]
    fn ip_batch_force_netns_and_changes_wait() {
        let commands = [
            "ssh devvm ip -b - addr",
            "ssh devvm ip -b addr",
            "ssh devvm ip -batch x",
            "ssh devvm ip -force addr",
            "ssh devvm ip -force -batch /tmp/x",
            "ssh devvm ip -n ns addr",
            "ssh devvm ip -netns ns addr",
            "ssh devvm ip addr add 10.0.0.1/24 dev eth0",
            "ssh devvm ip link set eth0 down",
            "ssh devvm ip link set dev eth0 down",
            "ssh devvm ip route del default",
            "ssh devvm ip a del 10.0.0.1/24 dev eth0",
            "ssh devvm ip neigh flush all",
            "ssh devvm ip netns exec x reboot",
        ];
        assert_eq!(allowed_among(&commands), Vec::<&str>::new());
    }

    #[test]
    fn files_that_hold_secrets_block_follow_or_read_stdin_wait() {
        let commands = [
            "ssh devvm cat /proc/1/root/etc/shadow",
            "ssh devvm cat /proc/self/root/etc/shadow",
            "ssh devvm cat /proc/thread-self/root/etc/shadow",
            "ssh devvm cat /proc/self/environ",
            "ssh devvm cat /proc/1/environ",
            "ssh devvm cat /proc/1/mem",
            "ssh devvm ls /proc/1/cwd",
            "ssh devvm cat /proc/1/task/1/root/etc/shadow",
            "ssh devvm cat /proc/1/task/1/environ",
            "ssh devvm cat /proc/1/fd/3",
            "ssh devvm cat /proc/1/map_files/x",
            "ssh devvm cat /proc/kcore",
            "ssh devvm head -c 4096 /proc/kmsg",
            "ssh devvm cat /sys/kernel/tracing/trace_pipe",
            "ssh devvm cat /sys/kernel/debug/tracing/trace_pipe",
            "ssh devvm wc --files0-from=/etc/shadow",
            "ssh devvm wc --files0-from=/etc/shadow /var/log/syslog",
            "ssh devvm tail --fo /var/log/syslog",
            "ssh devvm tail --pid=1 -f /var/log/syslog",
            "ssh devvm tail -F /var/log/syslog",
            "ssh devvm tail -s 1 /var/log/syslog",
            "ssh devvm tail -100f /var/log/syslog",
            "ssh devvm tail --retry /var/log/syslog",
            "ssh devvm cat -",
            "ssh devvm cat - /var/log/syslog",
            "ssh devvm cat /var/log/syslog -",
            "ssh devvm ls -R /proc",
            "ssh devvm cat /var/log/../../etc/shadow",
            "ssh devvm cat /var/logs/x",
            "ssh devvm cat proc/meminfo",
            "ssh devvm stat --cached=never /etc/shadow",
        ];
        assert_eq!(allowed_among(&commands), Vec::<&str>::new());
    }

    #[test]
    fn an_option_off_the_list_waits_with_the_option_named() {
        let Verdict::Ask { reason, .. } = bash("ssh devvm ss --kil") else { panic!("ss --kil must wait") };
        assert_eq!(reason, "ss: `--kil` is not one of its options that only read");
        let Verdict::Ask { reason, .. } = bash("ssh devvm dmesg -Tc") else { panic!("dmesg -Tc must wait") };
        assert_eq!(reason, "dmesg: `-c` (in `-Tc`) is not one of its options that only read");
        let Verdict::Ask { reason, .. } = bash("ssh devvm cat /proc/1/environ") else { panic!("must wait") };
        assert_eq!(reason, "cat: /proc/1/environ is not a file that only reports the system's state");
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
