//! The agent definition, from the Markdown file an operator writes (front
//! matter, then the prompt) to the JSON the CLI takes with `--agents`.
//!
//! The definition reaches the CLI on its command line rather than as
//! `<workspace>/.claude/agents/<name>.md`: the CLI reads agent files only
//! from its setting sources, and a turn loads none, since every file there
//! is one the agent user can write (README "Approvals").

use serde_json::{Map, Value, json};

/// The recovery agent written into each workspace unless `BREAKGLASS_AGENT_FILE` names another.
pub const DEFAULT: &str = include_str!("breakglass.md");

/// What is wrong with a definition, said at start-up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DefinitionError {
    #[error("it does not start with front matter between two '---' lines")]
    NoFrontMatter,
    #[error("front matter line {0:?} is not 'key: value'")]
    BadLine(String),
    #[error("front matter key {0:?} is not one of name, description, tools, disallowedTools, model")]
    UnknownKey(String),
    #[error("its name {0:?} is not the agent's name {1:?} (BREAKGLASS_AGENT)")]
    OtherName(String, String),
    #[error("it has no description")]
    NoDescription,
    #[error("it has no prompt after the front matter")]
    NoPrompt,
    #[error("it is {0} bytes; at most {MAX_DEFINITION} fit on the agent's command line")]
    TooLong(usize),
}

/// Linux refuses one argument of 128 KiB or more; the definition stays
/// well below.
pub const MAX_DEFINITION: usize = 64 * 1024;

/// A power target as the agent is told of it (README "Targets").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetNote {
    pub name: String,
    pub backend: String,
    /// Its verbs, sorted.
    pub verbs: Vec<String>,
}

/// The `--agents` JSON for one agent named `name`: `{"<name>":
/// {"description", "prompt", "tools"?, "disallowedTools"?, "model"?}}`.
/// The front matter is the simple `key: value` form of the CLI's agent
/// files; lists (`tools`) are comma-separated. The power targets, when
/// there are any, are named at the end of the prompt.
pub fn agents_json(name: &str, markdown: &str, targets: &[TargetNote]) -> Result<String, DefinitionError> {
    if markdown.len() > MAX_DEFINITION {
        return Err(DefinitionError::TooLong(markdown.len()));
    }
    let rest = markdown.strip_prefix("---\n").ok_or(DefinitionError::NoFrontMatter)?;
    let (front, prompt) = match rest.find("\n---\n") {
        Some(end) => (&rest[..end], &rest[end + 5..]),
        None => (rest.strip_suffix("\n---").ok_or(DefinitionError::NoFrontMatter)?, ""),
    };
    let mut agent = Map::new();
    for line in front.lines().filter(|l| !l.trim().is_empty()) {
        let (key, value) = line.split_once(':').ok_or_else(|| DefinitionError::BadLine(line.to_owned()))?;
        let (key, value) = (key.trim(), value.trim());
        match key {
            "name" if value != name => return Err(DefinitionError::OtherName(value.to_owned(), name.to_owned())),
            "name" => {}
            "description" | "model" => {
                agent.insert(key.to_owned(), json!(value));
            }
            "tools" | "disallowedTools" => {
                let list: Vec<&str> = value.split(',').map(str::trim).filter(|t| !t.is_empty()).collect();
                agent.insert(key.to_owned(), json!(list));
            }
            other => return Err(DefinitionError::UnknownKey(other.to_owned())),
        }
    }
    if !agent.contains_key("description") {
        return Err(DefinitionError::NoDescription);
    }
    let prompt = prompt.trim();
    if prompt.is_empty() {
        return Err(DefinitionError::NoPrompt);
    }
    let prompt = format!("{prompt}{}", targets_section(targets));
    if prompt.len() > MAX_DEFINITION {
        return Err(DefinitionError::TooLong(prompt.len()));
    }
    agent.insert("prompt".to_owned(), json!(prompt));
    Ok(json!({ name: Value::Object(agent) }).to_string())
}

/// The targets, for the agent: their names (so that it can speak of them
/// as the operator's console does) and that their power verbs are the
/// operator's to run there. The agent holds no key or token of its own for
/// them; its `ssh pve` path stays as its prompt describes.
fn targets_section(targets: &[TargetNote]) -> String {
    if targets.is_empty() {
        return String::new();
    }
    let mut section = String::from(
        "\n\n## Power targets\n\nThe operator's console reaches the power of these machines through the \
         breakglass server (the first is the default):\n\n",
    );
    for target in targets {
        section.push_str(&format!("- `{}` ({}): {}\n", target.name, target.backend, target.verbs.join(", ")));
    }
    section.push_str(
        "\nTheir power verbs go through the operator's console, not through you: when one is warranted, \
         name the target and the verb and ask the operator to run it there (every mutating verb asks the \
         operator to confirm, and the console shows when the machine is reachable again). Your own \
         `ssh pve <verb>` path to the hypervisor stays as described above.",
    );
    section
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_agent_becomes_one_agent_with_its_tools_and_prompt() {
        let json: Value = serde_json::from_str(&agents_json("breakglass", DEFAULT, &[]).unwrap()).unwrap();
        let agent = &json["breakglass"];
        assert_eq!(json.as_object().unwrap().len(), 1);
        assert_eq!(agent["tools"], json!(["Bash", "Read", "Grep", "Glob"]));
        assert!(agent["description"].as_str().unwrap().starts_with("Emergency recovery"));
        assert!(agent["prompt"].as_str().unwrap().starts_with("You are the breakglass recovery agent."));
    }

    #[test]
    fn a_definition_the_cli_would_read_otherwise_is_refused() {
        let check = |md: &str| agents_json("a", md, &[]).unwrap_err();
        assert_eq!(check("no front matter"), DefinitionError::NoFrontMatter);
        assert_eq!(check("---\ndescription: d\n---\n\n"), DefinitionError::NoPrompt);
        assert_eq!(check("---\nname: a\n---\nhi"), DefinitionError::NoDescription);
        assert_eq!(check("---\nname: b\ndescription: d\n---\nhi"), DefinitionError::OtherName("b".into(), "a".into()));
        assert_eq!(check("---\ndescription: d\nhooks: x\n---\nhi"), DefinitionError::UnknownKey("hooks".into()));
        assert_eq!(check("---\ndescription d\n---\nhi"), DefinitionError::BadLine("description d".into()));
        assert!(matches!(
            check(&format!("---\ndescription: d\n---\n{}", "x".repeat(MAX_DEFINITION))),
            DefinitionError::TooLong(_)
        ));
    }

    #[test]
    fn model_and_disallowed_tools_pass_through() {
        let json = agents_json(
            "a",
            "---\nname: a\ndescription: d: e\nmodel: opus\ndisallowedTools: Write, Edit\n---\nhi\n",
            &[],
        )
        .unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&json).unwrap(),
            json!({"a": {"description": "d: e", "model": "opus", "disallowedTools": ["Write", "Edit"], "prompt": "hi"}})
        );
    }

    #[test]
    fn the_prompt_names_the_targets_and_sends_their_power_verbs_through_the_console() {
        let targets = [
            TargetNote { name: "vm".into(), backend: "ssh".into(), verbs: vec!["cycle".into(), "status".into()] },
            TargetNote { name: "hypervisor".into(), backend: "redfish".into(), verbs: vec!["nmi".into()] },
        ];
        let json: Value = serde_json::from_str(&agents_json("breakglass", DEFAULT, &targets).unwrap()).unwrap();
        let prompt = json["breakglass"]["prompt"].as_str().unwrap();
        assert!(prompt.starts_with("You are the breakglass recovery agent."));
        assert!(prompt.contains("ssh pve <verb>"), "the agent's own ssh path stays");
        assert!(prompt.contains("\n- `vm` (ssh): cycle, status\n- `hypervisor` (redfish): nmi\n"), "{prompt}");
        assert!(prompt.contains("go through the operator's console"), "{prompt}");
        let without: Value = serde_json::from_str(&agents_json("breakglass", DEFAULT, &[]).unwrap()).unwrap();
        assert!(!without["breakglass"]["prompt"].as_str().unwrap().contains("## Power targets"));
    }
}
