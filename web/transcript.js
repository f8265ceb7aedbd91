// The transcript: a pure fold of a session's events (README "API") into the
// messages the console shows. No DOM, no network: the same events in any
// order, any number of times, give the same messages.
//
// - Events are identified by `id`; one seen before is ignored, so a replay
//   or a reconnect never renders anything twice.
// - Messages are kept in id order, whatever order events arrive in.
// - Events without an id (notices the server could not log) are never
//   dropped; they follow the events that had arrived before them.
// - A `tool_result` is folded under the `tool` call it answers, even when it
//   arrives first.
// - Deltas (README, "API": live text, never logged) grow a message keyed by
//   `message_id`; the `text` event with that `message_id` turns the same
//   message object into the durable one, so nothing is drawn twice. A delta
//   of a message whose text is in, or whose turn has ended, is ignored, so a
//   replay (which has no deltas) gives the same messages.
// - An `approval_decision` is folded into the `approval` it decides (README,
//   "The web console": the approval card), even when it arrives first, so a
//   replayed card shows its decision and one without a decision is pending.
//   A `tool_use_id` may be asked again once decided (the agent re-asks after
//   a deny), so a decision goes to the most recent approval of its id logged
//   before it that no earlier decision took, never merely the first card.

/** A fresh, empty transcript. */
export function emptyTranscript() {
  // `decisions`: every approval_decision seen, by tool_use_id (see pairDecisions).
  return { messages: [], seen: new Set(), orphans: new Map(), noticeSeq: 0, maxId: -1, growing: new Map(), finished: new Set(), decisions: new Map() };
}

/** Output shown before "show more" (characters). */
export const OUTPUT_PREVIEW = 2000;

/**
 * Folds one event into the transcript (in place) and returns it.
 * @param {ReturnType<typeof emptyTranscript>} t
 * @param {object} event as received on the attach stream
 */
export function apply(t, event) {
  if (!event || typeof event !== "object") return t;
  const hasId = Number.isInteger(event.id) && event.id >= 0;
  if (hasId) {
    if (t.seen.has(event.id)) return t;
    t.seen.add(event.id);
    t.maxId = Math.max(t.maxId, event.id);
  }
  // Where the message sorts: [its id, 0]; a notice sorts after every event
  // that had arrived before it and before any later id: [highest id, n].
  const order = hasId ? [event.id, 0] : [t.maxId, ++t.noticeSeq];
  const message = toMessage(event, order);
  if (message === null) return t;
  if (message.role === "tool_result") {
    // A call asked again under its id (after a deny) is a second `tool`:
    // its result belongs to the latest one still without a result.
    const calls = t.messages.filter((m) => m.role === "tool" && m.toolUseId === message.toolUseId);
    const tool = calls.findLast((m) => !m.result) ?? calls.at(-1);
    if (tool) tool.result = message;
    else t.orphans.set(message.toolUseId, message);
    return t;
  }
  if (message.role === "approval_decision") {
    if (!message.toolUseId) return t; // decides nothing that could be shown
    const known = t.decisions.get(message.toolUseId) ?? [];
    known.push(message);
    t.decisions.set(message.toolUseId, known);
    pairDecisions(t, message.toolUseId);
    return t;
  }
  if (message.role === "agent" && message.messageId) {
    t.finished.add(message.messageId);
    const growing = t.growing.get(message.messageId);
    if (growing) {
      // The same object becomes the durable message, moved to its id's place.
      t.growing.delete(message.messageId);
      t.messages.splice(t.messages.indexOf(growing), 1);
      Object.assign(growing, message, { live: false });
      insertSorted(t.messages, growing);
      return t;
    }
  }
  // A turn's end: output whose call never came is shown on its own, and
  // text still growing is dropped (the log never got it).
  if (message.role === "turn_end") {
    for (const [messageId, growing] of t.growing) {
      t.messages.splice(t.messages.indexOf(growing), 1);
      t.finished.add(messageId);
    }
    t.growing.clear();
    for (const orphan of t.orphans.values()) insertSorted(t.messages, { ...orphan, role: "output" });
    t.orphans.clear();
  }
  if (message.role === "tool" && t.orphans.has(message.toolUseId)) {
    message.result = t.orphans.get(message.toolUseId);
    t.orphans.delete(message.toolUseId);
  }
  insertSorted(t.messages, message);
  if (message.role === "approval") pairDecisions(t, message.toolUseId);
  return t;
}

/**
 * Gives each approval of one tool_use_id its decision, afresh from every
 * approval and decision of that id seen so far, in log order: a decision
 * decides the most recent approval before it that is still undecided (the
 * server logs a call's decision before the same id can wait again, README
 * "Approvals"). Redone on each arrival, so events in any order end in the
 * same pairs.
 */
function pairDecisions(t, toolUseId) {
  const approvals = t.messages.filter((m) => m.role === "approval" && m.toolUseId === toolUseId);
  const decisions = [...(t.decisions.get(toolUseId) ?? [])].sort((a, b) => (after(a.order, b.order) ? 1 : -1));
  for (const approval of approvals) approval.decision = null;
  for (const decision of decisions) {
    let target = null;
    for (const approval of approvals) {
      if (!after(decision.order, approval.order)) break;
      if (approval.decision === null) target = approval;
    }
    if (target) target.decision = decision;
  }
}

/**
 * Folds one delta (new characters of a text block, sent without an id) into
 * the transcript (in place) and returns it.
 * @param {ReturnType<typeof emptyTranscript>} t
 * @param {{message_id: string, index: number, text: string}} delta
 */
export function applyDelta(t, delta) {
  if (!delta || typeof delta !== "object") return t;
  const { message_id: messageId, index, text } = delta;
  if (typeof messageId !== "string" || !messageId || !Number.isInteger(index) || index < 0) return t;
  if (typeof text !== "string" || !text || t.finished.has(messageId)) return t;
  let growing = t.growing.get(messageId);
  if (!growing) {
    // Sorts after every event that had arrived before it, like a notice.
    growing = { id: null, order: [t.maxId, ++t.noticeSeq], at: "", role: "agent", text: "", messageId, live: true };
    t.growing.set(messageId, growing);
    insertSorted(t.messages, growing);
  }
  growing.text += text;
  return t;
}

/** Folds many events. */
export function applyAll(t, events) {
  for (const e of events) apply(t, e);
  return t;
}

/** The highest id seen, or null: what Last-Event-ID would say. */
export function lastId(t) {
  let max = null;
  for (const id of t.seen) if (max === null || id > max) max = id;
  return max;
}

/** True while the last prompt's turn has not ended. */
export function turnRunning(t) {
  for (let i = t.messages.length - 1; i >= 0; i--) {
    const role = t.messages[i].role;
    if (role === "turn_end") return false;
    if (role === "user") return true;
  }
  return false;
}

/** The approvals still waiting for a decision, in log order. */
export function pendingApprovals(t) {
  return t.messages.filter((m) => m.role === "approval" && m.decision === null);
}

/** Tool output cut for display, and whether there is more. */
export function preview(text, limit = OUTPUT_PREVIEW) {
  const s = typeof text === "string" ? text : "";
  return s.length <= limit ? { text: s, more: false } : { text: s.slice(0, limit), more: true };
}

const after = (a, b) => a[0] > b[0] || (a[0] === b[0] && a[1] > b[1]);

function insertSorted(list, message) {
  let i = list.length;
  while (i > 0 && after(list[i - 1].order, message.order)) i--;
  list.splice(i, 0, message);
}

const str = (v) => (typeof v === "string" ? v : "");
const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);

function toMessage(e, order) {
  const base = { id: Number.isInteger(e.id) ? e.id : null, order, at: str(e.at) };
  switch (e.kind) {
    case "user":
      return { ...base, role: "user", text: str(e.text), by: str(e.by) };
    case "text":
      return { ...base, role: "agent", text: str(e.text), messageId: str(e.message_id) };
    case "tool":
      return { ...base, role: "tool", name: str(e.name), input: e.input ?? null, toolUseId: str(e.tool_use_id), result: null };
    case "tool_result":
      return { ...base, role: "tool_result", toolUseId: str(e.tool_use_id), isError: e.is_error === true, content: str(e.content) };
    case "status":
      return { ...base, role: "status", text: str(e.text) };
    case "result":
      return {
        ...base,
        role: "result",
        isError: e.is_error === true,
        text: str(e.result),
        subtype: str(e.subtype),
        durationMs: num(e.duration_ms),
        numTurns: num(e.num_turns),
        costUsd: num(e.total_cost_usd),
      };
    case "error":
      return { ...base, role: "error", text: str(e.error) };
    case "cancelled":
      return { ...base, role: "cancelled", text: "Stopped by the operator" };
    case "turn_end":
      return { ...base, role: "turn_end" };
    case "approval":
      return {
        ...base,
        role: "approval",
        toolUseId: str(e.tool_use_id),
        tool: str(e.tool),
        input: e.input ?? null,
        reason: str(e.reason),
        effect: str(e.effect),
        deadlineMs: num(e.deadline_ms),
        decision: null,
      };
    case "approval_decision":
      return { ...base, role: "approval_decision", toolUseId: str(e.tool_use_id), decision: str(e.decision), by: str(e.by), atMs: num(e.at_ms), message: str(e.message) };
    case "session":
      return null;
    default:
      // A kind this console does not know yet: say so rather than hide it.
      return { ...base, role: "status", text: `(${str(e.kind) || "unknown"} event)` };
  }
}

/** A one-line summary of a tool call's input: the command, the path, or JSON. */
export function toolSummary(message) {
  const input = message.input;
  if (input && typeof input === "object") {
    for (const key of ["command", "file_path", "path", "pattern"]) {
      if (typeof input[key] === "string") return input[key];
    }
  }
  return input === null || input === undefined ? "" : JSON.stringify(input);
}

/** "8.1 s · 2 turns · $0.0213" for a result. */
export function resultFacts(m) {
  const facts = [];
  if (m.durationMs !== null) facts.push(`${(m.durationMs / 1000).toFixed(1)} s`);
  if (m.numTurns !== null) facts.push(`${m.numTurns} turn${m.numTurns === 1 ? "" : "s"}`);
  if (m.costUsd !== null) facts.push(`$${m.costUsd.toFixed(4)}`);
  return facts.join(" · ");
}
