//! Which commands on the target only read (pure): for each program on the
//! list, the options it may take, the operands it may name and, for the
//! file readers, the files (README, "Approvals").
//!
//! Everything here is an allow-list, because a list of what is known to be
//! bad misses what nobody thought of. An option is accepted only when it is
//! spelled in full exactly as listed: getopt also takes an unambiguous
//! prefix (`--ki` for `--kill`), so a word that is merely the start of a
//! listed name is refused rather than guessed at. A cluster of short
//! options (`-tnp`) is accepted only when every letter is listed, and an
//! option that takes a value takes it as getopt does (the rest of the
//! cluster, `=value`, or the next word), so that a value is never read as
//! an option here while the program reads it as one, or the other way round.

use std::path::{Component, Path};

/// Why `argv` only reads, or why it has to wait for the operator.
pub(super) fn read_only(argv: &[&str]) -> Result<String, String> {
    let Some((&program, args)) = argv.split_first() else {
        return Err("an empty command".to_owned());
    };
    let reports = |what: &str| Ok(format!("{program}: {what}"));
    match program {
        "uptime" | "free" | "hostname" | "uname" | "whoami" | "nproc" | "lscpu" | "lsmem" => {
            let spec = match program {
                "uptime" => UPTIME,
                "free" => FREE,
                "hostname" => HOSTNAME,
                "uname" => UNAME,
                "nproc" => NPROC,
                "lscpu" => LSCPU,
                "lsmem" => LSMEM,
                _ => &[],
            };
            getopt(program, spec, args)?.no_operands()?;
            reports("reports the system's state")
        }
        "id" | "w" => {
            let parsed = getopt(program, if program == "id" { ID } else { W }, args)?;
            parsed.operands_all(1, "a user name", is_name)?;
            reports("reports the system's state")
        }
        "who" => {
            // Its operand is a file read as the login records, unless it is
            // the two words `am i`.
            let parsed = getopt(program, WHO, args)?;
            if !matches!(parsed.operands[..], [] | ["am", "i" | "I"]) {
                return Err("who: a file operand is read as the login records".to_owned());
            }
            reports("reports the system's state")
        }
        "date" => {
            // An operand that is not a `+FORMAT` sets the clock.
            let parsed = getopt(program, DATE, args)?;
            parsed.operands_all(1, "a +FORMAT", |w| w.starts_with('+'))?;
            reports("reports the system's state")
        }
        "lsblk" => {
            getopt(program, LSBLK, args)?
                .operands_all(usize::MAX, "a device under /dev", |w| w.starts_with("/dev/") && climbs_nowhere(w))?;
            reports("reports the system's state")
        }
        "findmnt" => {
            getopt(program, FINDMNT, args)?.operands_all(2, "a source or a mount point", |_| true)?;
            reports("reports the system's state")
        }
        "df" => {
            getopt(program, DF, args)?
                .operands_all(usize::MAX, "an absolute path", |w| w.starts_with('/') && climbs_nowhere(w))?;
            reports("reports the system's state")
        }
        "vmstat" => {
            vmstat(args)?;
            reports("reports the system's state")
        }
        "mount" if args.is_empty() => reports("lists mounts"),
        "ps" => {
            ps(args)?;
            reports("reports the system's state")
        }
        "top" => {
            top(args)?;
            reports("one batch snapshot")
        }
        "ss" => {
            // The operands are a filter (`state established`, `dport = :22`).
            getopt(program, SS, args)?;
            reports("reports the system's state")
        }
        "systemctl" => {
            systemctl(args)?;
            Ok(format!("systemctl {}: only reads", args.join(" ")))
        }
        "journalctl" => {
            getopt(program, JOURNALCTL, args)?.operands_all(usize::MAX, "a FIELD=value match", is_journal_match)?;
            reports("reads the journal")
        }
        "dmesg" => {
            getopt(program, DMESG, args)?.no_operands()?;
            reports("reads the kernel log")
        }
        "ip" => {
            ip(args)?;
            reports("shows addresses and routes")
        }
        "cat" | "head" | "tail" | "ls" | "wc" | "stat" => {
            files(program, args)?;
            reports("reads under /proc, /sys or /var/log")
        }
        _ => Err(format!("`{}` is not a read-only diagnosis on the list", argv.join(" "))),
    }
}

// Each program's options, one entry an option: its names (a single
// character is the short option, anything longer the long one, in full),
// then `=` when it takes a value, `[=]` when it takes one only attached
// (`-Iseconds`, `--iso-8601=seconds`), `~` when it also takes the next word
// as its value if that word is a count or boot offset (journalctl's `-n`
// and `-b`). The first name is the one the checks below ask for.

const UPTIME: &[&str] = &["p,pretty", "s,since"];
// Not `-s`/`-c`/`--seconds`/`--count`: they repeat the report.
const FREE: &[&str] = &[
    "b,bytes",
    "k,kibi",
    "m,mebi",
    "g,gibi",
    "tebi",
    "pebi",
    "kilo",
    "mega",
    "giga",
    "tera",
    "peta",
    "h,human",
    "si",
    "l,lohi",
    "t,total",
    "v,committed",
    "w,wide",
];
// Not `-F`/`--file`/`-b`/`--boot` or an operand: they set the name.
const HOSTNAME: &[&str] = &["s,short", "f,fqdn,long", "d,domain", "i,ip-address", "I,all-ip-addresses", "A,all-fqdns"];
const UNAME: &[&str] = &[
    "a,all",
    "s,kernel-name",
    "n,nodename",
    "r,kernel-release",
    "v,kernel-version",
    "m,machine",
    "p,processor",
    "i,hardware-platform",
    "o,operating-system",
];
const NPROC: &[&str] = &["all", "ignore="];
// Not `-s`/`--sysroot`: it reads another tree as the system's.
const LSCPU: &[&str] =
    &["a,all", "b,online", "c,offline", "J,json", "x,hex", "y,physical", "B,bytes", "e,extended[=]", "p,parse[=]"];
const LSMEM: &[&str] = &["a,all", "b,bytes", "J,json", "n,noheadings", "r,raw", "P,pairs", "o,output=", "output-all"];
const ID: &[&str] = &["u,user", "g,group", "G,groups", "n,name", "r,real", "z,zero"];
const W: &[&str] = &["h,no-header", "u,no-current", "s,short", "f,from", "o,old-style", "i,ip-addr"];
const WHO: &[&str] = &[
    "a,all",
    "b,boot",
    "d,dead",
    "H,heading",
    "l,login",
    "m",
    "p,process",
    "q,count",
    "r,runlevel",
    "s,short",
    "t,time",
    "T,w,mesg,message,writable",
    "u,users",
];
// Not `-s`/`--set` (sets the clock) or `-f`/`--file` (reads a file and
// echoes the lines it cannot parse).
const DATE: &[&str] = &["u,utc,universal", "R,rfc-email", "I,iso-8601[=]", "rfc-3339=", "d,date="];
const LSBLK: &[&str] = &[
    "a,all",
    "b,bytes",
    "d,nodeps",
    "f,fs",
    "J,json",
    "l,list",
    "m,perms",
    "n,noheadings",
    "o,output=",
    "O,output-all",
    "p,paths",
    "P,pairs",
    "r,raw",
    "S,scsi",
    "t,topology",
];
// Not `-p`/`--poll` (never ends) or `-F`/`--tab-file` (reads a file).
const FINDMNT: &[&str] = &[
    "A,all",
    "a,ascii",
    "b,bytes",
    "D,df",
    "e,evaluate",
    "f,first-only",
    "i,invert",
    "J,json",
    "k,kernel",
    "l,list",
    "m,mtab",
    "n,noheadings",
    "o,output=",
    "output-all",
    "O,options=",
    "P,pairs",
    "r,raw",
    "s,fstab",
    "S,source=",
    "t,types=",
    "T,target=",
    "M,mountpoint=",
    "u,notruncate",
    "U,uniq",
    "v,nofsroot",
];
// Not `--sync`: it flushes every file system first.
const DF: &[&str] = &[
    "a,all",
    "B,block-size=",
    "h,human-readable",
    "H,si",
    "i,inodes",
    "k",
    "l,local",
    "no-sync",
    "P,portability",
    "t,type=",
    "T,print-type",
    "x,exclude-type=",
    "total",
    "output[=]",
];
const VMSTAT: &[&str] = &[
    "a,active",
    "f,forks",
    "m,slabs",
    "n,one-header",
    "s,stats",
    "d,disk",
    "D,disk-sum",
    "p,partition=",
    "S,unit=",
    "t,timestamp",
    "w,wide",
];
// Not `-K`/`--kill` (closes sockets), `-D`/`--diag` (writes a file),
// `-F`/`--filter` (reads one), `-E`/`--events` (never ends) or
// `-N`/`--net` (enters another namespace).
const SS: &[&str] = &[
    "n,numeric",
    "a,all",
    "l,listening",
    "o,options",
    "e,extended",
    "m,memory",
    "p,processes",
    "T,threads",
    "i,info",
    "s,summary",
    "b,bpf",
    "Z,context",
    "z,contexts",
    "t,tcp",
    "u,udp",
    "w,raw",
    "x,unix",
    "d,dccp",
    "S,sctp",
    "M,mptcp",
    "tipc",
    "vsock",
    "xdp",
    "4,ipv4",
    "6,ipv6",
    "0,packet",
    "H,no-header",
    "O,oneline",
    "cgroup",
    "tos",
    "inet-sockopt",
    "f,family=",
    "A,query,socket=",
];
// Not `-c`/`-C`/`--clear`/`--read-clear` (clear the ring buffer), `-n`,
// `-D`, `-E`, `--console-*` (change the console), `-w`/`-W`/`--follow`
// (never end), `-F`/`--file` (reads a file) or `-S`/`--syslog`.
const DMESG: &[&str] = &[
    "T,ctime",
    "t,notime",
    "e,reltime",
    "d,show-delta",
    "l,level=",
    "f,facility=",
    "k,kernel",
    "u,userspace",
    "x,decode",
    "r,raw",
    "P,nopager",
    "J,json",
    "time-format=",
    "since=",
    "until=",
];
// Not `-f`/`--follow` (never ends), the writers (`--rotate`, `--flush`,
// `--sync`, `--vacuum-*`, `--relinquish-var`, `--setup-keys`,
// `--update-catalog`, `--cursor-file`), or another journal or host
// (`-D`, `-i`/`--file`, `--root`, `--image`, `-M`, `--namespace`).
const JOURNALCTL: &[&str] = &[
    "no-pager",
    "e,pager-end",
    "a,all",
    "l,full",
    "no-full",
    "no-tail",
    "truncate-newline",
    "q,quiet",
    "m,merge",
    "k,dmesg",
    "system",
    "x,catalog",
    "r,reverse",
    "utc",
    "W,no-hostname",
    "N,fields",
    "header",
    "show-cursor",
    "list-boots",
    "disk-usage",
    "n,lines~",
    "b,boot~",
    "o,output=",
    "output-fields=",
    "u,unit=",
    "t,identifier=",
    "T,exclude-identifier=",
    "p,priority=",
    "facility=",
    "g,grep=",
    "case-sensitive[=]",
    "S,since=",
    "U,until=",
    "c,cursor=",
    "after-cursor=",
    "F,field=",
];
const SYSTEMCTL: &[&str] = &[
    "no-pager",
    "l,full",
    "a,all",
    "failed",
    "no-legend",
    "plain",
    "q,quiet",
    "value",
    "t,type=",
    "state=",
    "p,property=",
    "P=",
    "n,lines=",
    "o,output=",
];
const CAT: &[&str] = &[
    "A,show-all",
    "b,number-nonblank",
    "e",
    "E,show-ends",
    "n,number",
    "s,squeeze-blank",
    "t",
    "T,show-tabs",
    "u",
    "v,show-nonprinting",
];
// Not `-f`/`-F`/`--follow`/`--retry`/`--pid`/`-s` (follow the file).
const HEAD_TAIL: &[&str] = &["c,bytes=", "n,lines=", "q,quiet,silent", "v,verbose", "z,zero-terminated"];
// Not `-R` (all of /proc or /sys is more than anyone reads).
const LS: &[&str] = &[
    "a,all",
    "A,almost-all",
    "c",
    "d,directory",
    "g",
    "G,no-group",
    "h,human-readable",
    "i,inode",
    "l",
    "L,dereference",
    "n,numeric-uid-gid",
    "o",
    "r,reverse",
    "s,size",
    "S",
    "t",
    "u",
    "U",
    "v",
    "Z,context",
    "1",
    "full-time",
];
// Not `--files0-from`: it reads the names of the files from a file.
const WC: &[&str] = &["c,bytes", "m,chars", "l,lines", "w,words", "L,max-line-length"];
const STAT: &[&str] = &["L,dereference", "f,file-system", "t,terse", "c,format=", "printf="];
// ps's UNIX (`-e`) and GNU (`--sort`) options; its BSD ones are below.
// Not `-u`/`-U`/`-g`/`-G`/`-C` or `-y`: a name that does not resolve, or
// `-y` without `-l`, fails the UNIX reading, and see `ps` for why that
// matters.
const PS: &[&str] = &[
    "A",
    "a",
    "d",
    "e",
    "f",
    "F",
    "H",
    "j",
    "l",
    "L",
    "w",
    "forest",
    "headers",
    "no-headers",
    "o,format=",
    "p,pid=",
    "ppid=",
    "sort=",
    "cols,columns,width=",
];
/// ps's BSD option letters (`aux`): not `e`, which prints every process's
/// environment, secrets included.
const PS_BSD: &str = "auxwfjlrchnvmHS";
// top's own parser reads clusters and values as getopt does. Not `-d`: with
// the default delay, `-n` up to 5 ends within 15 seconds.
const TOP: &[&str] = &["b", "c", "H", "i", "S", "n=", "o=", "u=", "U=", "p=", "E=", "e="];

/// How an option takes its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Takes {
    Nothing,
    /// The rest of the cluster, `=value`, or else the next word.
    Value,
    /// Only the rest of the cluster or `=value`.
    Attached,
    /// The rest of the cluster, `=value`, or else the next word when that
    /// is a count or a boot offset (journalctl's `-n 200`, `-b -1`).
    Count,
}

/// One entry of a program's list.
struct Opt {
    /// The first name, which the checks ask for.
    name: &'static str,
    takes: Takes,
    names: &'static str,
}

impl Opt {
    fn parse(entry: &'static str) -> Opt {
        let (names, takes) = if let Some(names) = entry.strip_suffix("[=]") {
            (names, Takes::Attached)
        } else if let Some(names) = entry.strip_suffix('=') {
            (names, Takes::Value)
        } else if let Some(names) = entry.strip_suffix('~') {
            (names, Takes::Count)
        } else {
            (entry, Takes::Nothing)
        };
        Opt { name: names.split(',').next().unwrap_or(names), takes, names }
    }

    fn short(&self, letter: char) -> bool {
        self.names.split(',').any(|n| n.len() == letter.len_utf8() && n.starts_with(letter))
    }

    fn long(&self, name: &str) -> bool {
        self.names.split(',').any(|n| n.len() > 1 && n == name)
    }
}

/// A command line taken apart as its program's getopt would.
struct Parsed<'a> {
    program: &'a str,
    /// Each option given, by its first name, with its value.
    options: Vec<(&'static str, Option<&'a str>)>,
    operands: Vec<&'a str>,
}

impl<'a> Parsed<'a> {
    fn has(&self, name: &str) -> bool {
        self.options.iter().any(|(n, _)| *n == name)
    }

    /// The value the program uses: the last one given.
    fn value(&self, name: &str) -> Option<&'a str> {
        self.options.iter().rev().find(|(n, _)| *n == name).and_then(|(_, v)| *v)
    }

    fn no_operands(&self) -> Result<(), String> {
        match self.operands.first() {
            Some(operand) => Err(format!("{}: `{operand}`: it takes no operand unasked", self.program)),
            None => Ok(()),
        }
    }

    /// At most `most` operands, each `what` (`fits`).
    fn operands_all(&self, most: usize, what: &str, fits: impl Fn(&str) -> bool) -> Result<(), String> {
        let program = self.program;
        if let Some(operand) = self.operands.iter().find(|o| !fits(o)) {
            return Err(format!("{program}: `{operand}` is not {what}, the only operand it may take unasked"));
        }
        if self.operands.len() > most {
            return Err(format!("{program}: more operands than it takes unasked"));
        }
        Ok(())
    }
}

fn not_listed(program: &str, option: &str, word: &str) -> String {
    if option == word {
        format!("{program}: `{option}` is not one of its options that only read")
    } else {
        format!("{program}: `{option}` (in `{word}`) is not one of its options that only read")
    }
}

/// Takes `args` apart as GNU getopt_long does (options anywhere, `--` ends
/// them, a lone `-` is an operand), refusing any option not in `spec`.
fn getopt<'a>(program: &'a str, spec: &[&'static str], args: &[&'a str]) -> Result<Parsed<'a>, String> {
    let spec: Vec<Opt> = spec.iter().copied().map(Opt::parse).collect();
    let mut parsed = Parsed { program, options: Vec::new(), operands: Vec::new() };
    let mut words = args.iter().copied().peekable();
    let mut only_operands = false;
    let missing = |option: &str| format!("{program}: `{option}` needs a value");
    while let Some(word) = words.next() {
        if only_operands || word == "-" || !word.starts_with('-') {
            parsed.operands.push(word);
            continue;
        }
        if word == "--" {
            only_operands = true;
            continue;
        }
        if let Some(long) = word.strip_prefix("--") {
            let (name, attached) = match long.split_once('=') {
                Some((name, value)) => (name, Some(value)),
                None => (long, None),
            };
            let option = format!("--{name}");
            let opt = spec.iter().find(|o| o.long(name)).ok_or_else(|| not_listed(program, &option, &option))?;
            let value = match (opt.takes, attached) {
                (Takes::Nothing, Some(_)) => return Err(format!("{program}: `{option}` takes no value")),
                (Takes::Value | Takes::Count | Takes::Attached, Some(value)) => Some(value),
                (Takes::Nothing | Takes::Attached, None) => None,
                (Takes::Value, None) => Some(words.next().ok_or_else(|| missing(&option))?),
                (Takes::Count, None) => words.next_if(|w| is_count(w)),
            };
            parsed.options.push((opt.name, value));
            continue;
        }
        let cluster = &word[1..];
        for (at, letter) in cluster.char_indices() {
            let option = format!("-{letter}");
            let opt = spec.iter().find(|o| o.short(letter)).ok_or_else(|| not_listed(program, &option, word))?;
            let rest = &cluster[at + letter.len_utf8()..];
            let value = match opt.takes {
                Takes::Nothing => {
                    parsed.options.push((opt.name, None));
                    continue;
                }
                _ if !rest.is_empty() => Some(rest),
                Takes::Attached => None,
                Takes::Value => Some(words.next().ok_or_else(|| missing(&option))?),
                Takes::Count => words.next_if(|w| is_count(w)),
            };
            parsed.options.push((opt.name, value));
            break;
        }
    }
    Ok(parsed)
}

/// What journalctl's `-n` and `-b` take from the next word: `all`, a
/// number with a sign or not, or a 32-digit boot id with an offset or not.
fn is_count(word: &str) -> bool {
    let number = |s: &str| {
        let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
        !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
    };
    let boot_id = |s: &str| s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit());
    word == "all"
        || number(word)
        || word.get(..32).is_some_and(|id| boot_id(id) && (word.len() == 32 || number(&word[32..])))
}

/// A user name: plain characters, never a path.
fn is_name(word: &str) -> bool {
    !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@'))
}

/// A journal match (`_SYSTEMD_UNIT=nginx.service`), `+` between matches,
/// or the path of an executable or device, which journalctl turns into one.
fn is_journal_match(word: &str) -> bool {
    let field = |f: &str| !f.is_empty() && f.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    word == "+"
        || word.split_once('=').is_some_and(|(f, _)| field(f))
        || (word.starts_with('/') && climbs_nowhere(word))
}

fn climbs_nowhere(path: &str) -> bool {
    !Path::new(path).components().any(|c| matches!(c, Component::ParentDir))
}

/// `vmstat [delay [count]]`: a delay alone repeats for ever, so a delay
/// needs a count, and together they end within two minutes.
fn vmstat(args: &[&str]) -> Result<(), String> {
    let parsed = getopt("vmstat", VMSTAT, args)?;
    let number = |w: &str| w.parse::<u64>().ok().filter(|n| *n > 0);
    match parsed.operands[..] {
        [] => Ok(()),
        [delay, count] => match (number(delay), number(count)) {
            (Some(delay), Some(count)) if delay.saturating_mul(count) <= 120 => Ok(()),
            _ => Err("vmstat: the delay times the count must be a positive number of seconds up to 120".to_owned()),
        },
        _ => Err("vmstat: a delay without a count repeats for ever".to_owned()),
    }
}

/// `top` in batch mode for at most 5 iterations.
fn top(args: &[&str]) -> Result<(), String> {
    let parsed = getopt("top", TOP, args)?;
    parsed.no_operands()?;
    let iterations = parsed.value("n").and_then(|n| n.parse::<u32>().ok());
    if !parsed.has("b") || !iterations.is_some_and(|n| (1..=5).contains(&n)) {
        return Err("top: only in batch mode (-b) for 1 to 5 iterations (-n), or it never ends".to_owned());
    }
    Ok(())
}

/// procps reads a command line its UNIX way first and, when that fails
/// (a pid, format or sort key it cannot parse), reads every option again
/// as BSD ones, where `e` prints each process's environment: `-auxe` is
/// `-a -u xe` until user `xe` is not found, then BSD `auxe`. So a word
/// with a single dash may hold an `e` only when nothing on the line takes
/// a value, and the values are plain lists.
fn ps(args: &[&str]) -> Result<(), String> {
    let parsed = getopt("ps", PS, args)?;
    for word in &parsed.operands {
        if let Some(letter) = word.chars().find(|c| !PS_BSD.contains(*c)) {
            let option = letter.to_string();
            return Err(if letter == 'e' {
                format!("ps: `{word}` prints every process's environment")
            } else {
                not_listed("ps", &option, word)
            });
        }
    }
    let mut values = parsed.options.iter().filter_map(|(name, value)| value.map(|v| (*name, v))).peekable();
    if values.peek().is_some()
        && let Some(word) = args.iter().find(|w| !w.starts_with("--") && w.starts_with('-') && w.contains('e'))
    {
        return Err(format!(
            "ps: `{word}` with an option that takes a value: if ps cannot read the value, it reads `e` as \
             BSD's, which prints every process's environment (-A lists the same processes)"
        ));
    }
    for (name, value) in values {
        let fits = match name {
            "p" | "ppid" => value.bytes().all(|b| b.is_ascii_digit() || b == b','),
            "cols" => is_number(value),
            _ => {
                value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b',' | b'%' | b'_' | b'-' | b'+' | b':'))
            }
        };
        if !fits {
            return Err(format!("ps: `{value}` is not a plain list for its option"));
        }
    }
    Ok(())
}

/// The verbs that only read, and their operands (units, patterns, pids).
fn systemctl(args: &[&str]) -> Result<(), String> {
    let parsed = getopt("systemctl", SYSTEMCTL, args)?;
    match parsed.operands.first() {
        None
        | Some(
            &("status" | "show" | "cat" | "list-units" | "list-unit-files" | "list-timers" | "is-active" | "is-failed"
            | "is-enabled"),
        ) => Ok(()),
        Some(verb) => Err(format!("systemctl: `{verb}` is not one of the verbs that only read")),
    }
}

/// `ip [options] object [show|list [filters]]`. ip reads its own options:
/// each is a word of its own, and ip takes any prefix of a name (`-b` for
/// `-batch`), so only these exact words are accepted.
fn ip(args: &[&str]) -> Result<(), String> {
    const OPTIONS: &[&str] = &[
        "-4",
        "-6",
        "-0",
        "-s",
        "-stats",
        "-statistics",
        "-d",
        "-details",
        "-h",
        "-human",
        "-human-readable",
        "-iec",
        "-o",
        "-oneline",
        "-br",
        "-brief",
        "-j",
        "-json",
        "-p",
        "-pretty",
    ];
    const OBJECTS: &[&str] =
        &["address", "addr", "a", "route", "ro", "r", "link", "l", "neighbour", "neighbor", "neigh", "n"];
    let mut words = args.iter().copied();
    let object = loop {
        match words.next() {
            Some(option) if option.starts_with('-') && !OPTIONS.contains(&option) => {
                return Err(not_listed("ip", option, option));
            }
            Some(option) if option.starts_with('-') => {}
            Some(object) => break object,
            None => return Err("ip: name what to show (addr, route, link, neigh)".to_owned()),
        }
    };
    if !OBJECTS.contains(&object) {
        return Err(format!("ip: `{object}` is not one of addr, route, link and neigh"));
    }
    match words.next() {
        None => Ok(()),
        Some("show" | "list" | "ls" | "lst") => match words.find(|w| w.starts_with('-')) {
            Some(word) => Err(format!("ip: `{word}` after the command")),
            None => Ok(()),
        },
        Some(command) => Err(format!("ip {object}: `{command}` is not show or list")),
    }
}

/// The file readers: their options, and files only where reading reports
/// the system's state.
fn files(program: &str, args: &[&str]) -> Result<(), String> {
    let spec = match program {
        "cat" => CAT,
        "head" | "tail" => HEAD_TAIL,
        "ls" => LS,
        "wc" => WC,
        _ => STAT,
    };
    // `tail -100 file`, the old spelling of `-n 100`, is read only as the
    // first word (and `-100f` follows, so the digits stand alone).
    let args = match args {
        [first, rest @ ..]
            if matches!(program, "head" | "tail")
                && first.len() > 1
                && first.strip_prefix('-').is_some_and(|d| d.bytes().all(|b| b.is_ascii_digit())) =>
        {
            rest
        }
        _ => args,
    };
    let parsed = getopt(program, spec, args)?;
    if parsed.operands.is_empty() {
        return Err(format!("{program}: name the files (without, it reads its input or the current directory)"));
    }
    match parsed.operands.iter().find(|path| !reports_state(path)) {
        Some(path) => Err(format!("{program}: {path} is not a file that only reports the system's state")),
        None => Ok(()),
    }
}

/// /proc, /sys and /var/log, never climbing out, and in them only what
/// reports the system's state: not what holds a process's secrets or
/// reaches into its files (`environ`, `mem`, `root`, `cwd`, `fd`, …), not
/// the kernel's memory (`/proc/kcore`), and nothing whose reading blocks or
/// takes messages from other readers (`/proc/kmsg`, tracing pipes).
fn reports_state(path: &str) -> bool {
    let mut parts = Vec::new();
    for component in Path::new(path).components() {
        match component {
            Component::RootDir => {}
            Component::Normal(part) => parts.push(part.to_str().unwrap_or("")),
            Component::Prefix(_) | Component::CurDir | Component::ParentDir => return false,
        }
    }
    if !path.starts_with('/') {
        return false;
    }
    match parts[..] {
        ["proc", ref rest @ ..] => proc_path(rest),
        ["sys"] => true,
        ["sys", "kernel", "debug" | "tracing" | "security", ..] => false,
        ["sys", top, ..] => matches!(top, "block" | "bus" | "class" | "dev" | "devices" | "fs" | "kernel" | "module"),
        ["var", "log", ..] => true,
        _ => false,
    }
}

fn proc_path(parts: &[&str]) -> bool {
    const SYSTEM: &[&str] = &[
        "buddyinfo",
        "cgroups",
        "cmdline",
        "consoles",
        "cpuinfo",
        "crypto",
        "devices",
        "diskstats",
        "dma",
        "driver",
        "execdomains",
        "filesystems",
        "fs",
        "interrupts",
        "iomem",
        "ioports",
        "irq",
        "loadavg",
        "locks",
        "mdstat",
        "meminfo",
        "misc",
        "modules",
        "mounts",
        "net",
        "pagetypeinfo",
        "partitions",
        "pressure",
        "schedstat",
        "slabinfo",
        "softirqs",
        "stat",
        "swaps",
        "sys",
        "sysvipc",
        "timer_list",
        "tty",
        "uptime",
        "version",
        "vmallocinfo",
        "vmstat",
        "zoneinfo",
    ];
    match parts {
        [] => true,
        [process, rest @ ..] if matches!(*process, "self" | "thread-self") || is_number(process) => {
            process_path(rest, true)
        }
        [top, ..] => SYSTEM.contains(top),
    }
}

/// Inside `/proc/<pid>` (or one of its tasks).
fn process_path(parts: &[&str], tasks: bool) -> bool {
    const PROCESS: &[&str] = &[
        "cgroup",
        "cmdline",
        "comm",
        "cpuset",
        "io",
        "limits",
        "loginuid",
        "maps",
        "mountinfo",
        "mounts",
        "mountstats",
        "oom_adj",
        "oom_score",
        "oom_score_adj",
        "personality",
        "sched",
        "schedstat",
        "sessionid",
        "smaps",
        "smaps_rollup",
        "stack",
        "stat",
        "statm",
        "status",
        "timerslack_ns",
        "wchan",
    ];
    match parts {
        [] => true,
        ["task"] => tasks,
        ["task", task, rest @ ..] => tasks && is_number(task) && process_path(rest, false),
        ["net", ..] => true,
        [file] => PROCESS.contains(file),
        _ => false,
    }
}

fn is_number(word: &str) -> bool {
    !word.is_empty() && word.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_taken_as_getopt_takes_them() {
        // The rest of a cluster, or the next word whatever it looks like:
        // journalctl reads `-tf` as the identifier `f` and `-u -f` as the
        // unit `-f`, so neither follows the journal.
        assert!(read_only(&["journalctl", "-tf"]).is_ok());
        assert!(read_only(&["journalctl", "-u", "-f"]).is_ok());
        assert!(read_only(&["journalctl", "-u"]).is_err(), "a value is missing");
        // `-n` and `-b` take the next word only when it is a count.
        assert!(read_only(&["journalctl", "-b", "-1", "-n", "all"]).is_ok());
        assert!(read_only(&["journalctl", "-b", "--flush"]).is_err());
        assert!(read_only(&["journalctl", "-n", "-f"]).is_err());
        // An option that takes no value refuses one.
        assert_eq!(read_only(&["dmesg", "--ctime=x"]), Err("dmesg: `--ctime` takes no value".to_owned()));
        // After `--` every word is a file, and a file is checked as one.
        assert!(read_only(&["cat", "--", "/proc/meminfo"]).is_ok());
        assert!(read_only(&["cat", "--", "-n"]).is_err());
    }

    #[test]
    fn a_long_option_is_only_its_full_name() {
        for word in ["--numb", "--number=x", "---number", "--"] {
            let verdict = read_only(&["cat", word, "/proc/meminfo"]);
            assert_eq!(verdict.is_ok(), word == "--", "{word}: {verdict:?}");
        }
        assert!(read_only(&["cat", "--number", "/proc/meminfo"]).is_ok());
    }

    #[test]
    fn proc_is_read_for_the_system_and_a_process_state_not_its_secrets() {
        for path in ["/proc", "/proc/1", "/proc/1/task", "/proc/1/task/2/status", "/proc/self/net/tcp", "/proc/irq/1"] {
            assert!(reports_state(path), "{path}");
        }
        for path in
            ["/proc/1/task/2/task/3/status", "/proc/1/attr/current", "/proc/1/auxv", "/proc/kpagecount", "/proc/x"]
        {
            assert!(!reports_state(path), "{path}");
        }
    }
}
