// The approval card's words (README "The web console"): what a risky tool
// call will run, what it will do, how long until it is denied on its own,
// and who decided it. Pure: no DOM, no network, the clock passed in.

/** The exact thing the operator approves: a Bash command as given, or the tool's input, one `key: value` a line. */
export function commandText(m) {
  const input = m.input;
  if (m.tool === "Bash" && input && typeof input.command === "string") return input.command;
  if (input === null || input === undefined) return "";
  if (typeof input === "object" && !Array.isArray(input)) {
    return Object.entries(input)
      .map(([key, value]) => `${key}: ${typeof value === "string" ? value : JSON.stringify(value)}`)
      .join("\n");
  }
  return JSON.stringify(input);
}

// Characters that draw nothing, or move the ones around them: C0 and C1
// controls (but the tab and the newline), format characters (the bidi
// embeddings, overrides and isolates U+202A–U+202E and U+2066–U+2069, the
// zero-width U+200B–U+200F, U+2060, U+FEFF, the soft hyphen, the tags
// U+E0000–U+E007F), the line and paragraph separators, private-use and lone
// surrogate code units, and the blank fillers and variation selectors. Shown
// raw, a reversed or hidden part could make `rm -rf /` read as something
// harmless (README "The web console": the approval card).
const HIDDEN = /[\p{Cc}\p{Cf}\p{Zl}\p{Zp}\p{Co}\p{Cs}\u034F\u115F\u1160\u3164\uFFA0\uFE00-\uFE0F\u{E0100}-\u{E01EF}]/u;
const SHOWN_AS_IS = new Set(["\t", "\n"]);

/** "⟨U+202E⟩": a character that cannot be seen, named by its code point. */
const escapeOf = (ch) => `⟨U+${ch.codePointAt(0).toString(16).toUpperCase().padStart(4, "0")}⟩`;

/**
 * Text cut into runs to show as they are and escapes to show highlighted in
 * place of each invisible character, with how many there were.
 * @returns {{parts: {text: string, hidden?: true}[], hidden: number}}
 */
export function revealHidden(text) {
  const parts = [];
  let hidden = 0;
  let run = "";
  for (const ch of typeof text === "string" ? text : "") {
    if (SHOWN_AS_IS.has(ch) || !HIDDEN.test(ch)) {
      run += ch;
      continue;
    }
    if (run) parts.push({ text: run });
    run = "";
    parts.push({ text: escapeOf(ch), hidden: true });
    hidden += 1;
  }
  if (run) parts.push({ text: run });
  return { parts, hidden };
}

/** Lines of a command as shown: a final newline ends the last line rather than starting one. */
function lineCount(text) {
  if (!text) return 0;
  const n = text.split("\n").length;
  return text.endsWith("\n") ? n - 1 : n;
}

/**
 * What the card says about a command's size, so nothing can hide below the
 * fold of its box: "41 lines", and when the box scrolls, that it does.
 * @param {number} lines
 * @param {boolean} overflows whether the box is shorter than the command
 */
export function extentText(lines, overflows) {
  const scroll = "scroll the command to read all of it";
  if (lines > 1) return overflows ? `${lines} lines: ${scroll}` : `${lines} lines`;
  return overflows ? `Longer than the box: ${scroll}` : "";
}

/** "auto-deny in 9:41" until the deadline (a started second counts), then "auto-deny due now". */
export function countdown(deadlineMs, nowMs) {
  if (typeof deadlineMs !== "number" || !Number.isFinite(deadlineMs)) return "";
  const left = deadlineMs - nowMs;
  if (left <= 0) return "auto-deny due now";
  const total = Math.ceil(left / 1000);
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = String(total % 60).padStart(2, "0");
  return `auto-deny in ${h > 0 ? `${h}:${String(m).padStart(2, "0")}` : m}:${s}`;
}

const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
const two = (n) => String(n).padStart(2, "0");

/** "03:12" in local time, with the day in front when it is not today's. */
function clock(ms, nowMs) {
  const at = new Date(ms);
  const time = `${two(at.getHours())}:${two(at.getMinutes())}`;
  return at.toDateString() === new Date(nowMs).toDateString() ? time : `${at.getDate()} ${MONTHS[at.getMonth()]} ${time}`;
}

const VERB = { allow: "Allowed", deny: "Denied" };

/** "Allowed by alice at 03:12", "Denied by timeout at 03:22", "Denied: the turn ended", … */
export function decisionText(d, nowMs) {
  const word = VERB[d.decision] ?? `Decided (${d.decision || "unknown"})`;
  const at = d.atMs === null ? "" : ` at ${clock(d.atMs, nowMs)}`;
  let text;
  if (d.by === "turn-ended") text = `${word}: the turn ended`;
  else if (d.by === "restart") text = `${word}: the server restarted`;
  else text = `${word} by ${d.by || "someone"}${at}`;
  return d.message ? `${text}: “${d.message}”` : text;
}

/**
 * What the card shows now.
 * @param {object} m an `approval` message of the transcript
 * @param {{sending?: string, sent?: string, error?: string, already?: boolean}} ui this page's own attempt to decide it
 * @param {number} nowMs the server's time, as best known
 * @returns {{phase: "pending"|"sending"|"sent"|"already"|"resolved", buttons: "enabled"|"disabled"|"none", text: string, countdown: string, command: string, commandParts: {text: string, hidden?: true}[], warning: string, lines: number, explain: string, explainIsEffect: boolean, outcome?: string}}
 */
export function cardView(m, ui, nowMs) {
  const raw = commandText(m);
  const shown = revealHidden(raw);
  const base = {
    tool: m.tool,
    // Never the raw text: every invisible character is an escape here.
    command: shown.parts.map((p) => p.text).join(""),
    commandParts: shown.parts,
    warning: shown.hidden ? `This command contains invisible characters (${shown.hidden}), shown as ⟨U+…⟩.` : "",
    lines: lineCount(raw),
    explain: m.effect || m.reason,
    explainIsEffect: Boolean(m.effect),
  };
  if (m.decision) {
    return { ...base, phase: "resolved", outcome: m.decision.decision, buttons: "none", text: decisionText(m.decision, nowMs), countdown: "" };
  }
  // Without a tool_use_id there is nothing the server could be told.
  if (!m.toolUseId) return { ...base, phase: "pending", buttons: "none", text: "", countdown: "" };
  const clock = countdown(m.deadlineMs, nowMs);
  if (ui.already) return { ...base, phase: "already", buttons: "none", text: "Already decided (on another device, or by the timeout).", countdown: "" };
  if (ui.sending) return { ...base, phase: "sending", buttons: "disabled", text: `Sending ${ui.sending}…`, countdown: clock };
  if (ui.sent) {
    const word = ui.sent.charAt(0).toUpperCase() + ui.sent.slice(1);
    return { ...base, phase: "sent", buttons: "disabled", text: `${word} accepted; waiting for it to be logged…`, countdown: clock };
  }
  const text = ui.error ? `Not sent: ${ui.error.replace(/\.$/, "")}. Try again.` : "";
  return { ...base, phase: "pending", buttons: "enabled", text, countdown: clock };
}

/**
 * How far the server's clock is ahead of this device's, from an HTTP `Date`
 * header: the countdown runs on the server's clock. Zero within the header's
 * one-second resolution (and a bit), or when there is no usable header.
 */
export function serverOffsetMs(dateHeader, localNowMs) {
  const server = typeof dateHeader === "string" ? Date.parse(dateHeader) : NaN;
  if (!Number.isFinite(server)) return 0;
  const offset = server - localNowMs;
  return Math.abs(offset) <= 2000 ? 0 : offset;
}
