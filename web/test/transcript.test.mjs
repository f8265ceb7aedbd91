// node --test web/test/: the transcript fold.
import { test } from "node:test";
import assert from "node:assert/strict";
import { emptyTranscript, apply, applyAll, applyDelta, lastId, turnRunning, preview, toolSummary, resultFacts } from "../transcript.js";

const turn = [
  { id: 0, kind: "user", text: "Is devvm up?", by: "alice", at: "T0" },
  { id: 1, kind: "session", session_id: "s" },
  { id: 2, kind: "text", text: "Checking." },
  { id: 3, kind: "tool", name: "Bash", input: { command: "ssh devvm uptime" }, tool_use_id: "t1" },
  { id: 4, kind: "tool_result", tool_use_id: "t1", is_error: false, content: "up 3 days" },
  { id: 5, kind: "status", text: "API retry 1 of 10: overloaded_error" },
  { id: 6, kind: "result", is_error: false, result: "It is up.", subtype: "success", duration_ms: 8123, num_turns: 2, total_cost_usd: 0.0213 },
  { id: 7, kind: "turn_end" },
];

const roles = (t) => t.messages.map((m) => m.role);

test("every kind becomes the right message", () => {
  const t = applyAll(emptyTranscript(), turn);
  assert.deepEqual(roles(t), ["user", "agent", "tool", "status", "result", "turn_end"]);
  const tool = t.messages[2];
  assert.equal(tool.result.content, "up 3 days", "the result is folded under its call");
  assert.equal(toolSummary(tool), "ssh devvm uptime");
  assert.equal(resultFacts(t.messages[4]), "8.1 s · 2 turns · $0.0213");
  assert.equal(t.messages[0].by, "alice");
  assert.equal(lastId(t), 7);
  assert.equal(turnRunning(t), false);
});

test("a replay renders nothing twice", () => {
  const t = applyAll(emptyTranscript(), turn);
  const before = JSON.stringify(t.messages);
  applyAll(t, turn);
  applyAll(t, turn.slice(3));
  assert.equal(JSON.stringify(t.messages), before);
});

test("a reconnect after Last-Event-ID continues seamlessly", () => {
  const t = applyAll(emptyTranscript(), turn.slice(0, 4));
  assert.equal(turnRunning(t), true);
  assert.equal(lastId(t), 3);
  applyAll(t, turn.slice(4));
  assert.deepEqual(roles(t), roles(applyAll(emptyTranscript(), turn)));
});

test("out-of-order ids land in order, and a result may come before its call", () => {
  const shuffled = [turn[7], turn[4], turn[0], turn[6], turn[2], turn[3], turn[5], turn[1]];
  const t = applyAll(emptyTranscript(), shuffled);
  assert.deepEqual(roles(t), ["user", "agent", "tool", "status", "result", "turn_end"]);
  assert.equal(t.messages[2].result.content, "up 3 days");
  assert.deepEqual(t.messages.map((m) => m.id), [0, 2, 3, 5, 6, 7]);
});

test("events without ids are never dropped", () => {
  const t = applyAll(emptyTranscript(), turn.slice(0, 3));
  apply(t, { kind: "error", error: "the end of this turn could not be logged: storage is full" });
  apply(t, { kind: "turn_end" });
  assert.deepEqual(roles(t), ["user", "agent", "error", "turn_end"]);
  assert.equal(turnRunning(t), false);
  // A second identical notice is a second notice, not a duplicate.
  apply(t, { kind: "error", error: "again" });
  assert.equal(t.messages.filter((m) => m.role === "error").length, 2);
});

test("cancel, errors and unknown kinds are shown", () => {
  const t = applyAll(emptyTranscript(), [
    { id: 0, kind: "user", text: "x" },
    { id: 1, kind: "cancelled" },
    { id: 2, kind: "turn_end" },
    { id: 3, kind: "user", text: "y" },
    { id: 4, kind: "error", error: "turn timed out after 1800s" },
    { id: 5, kind: "turn_end" },
    { id: 6, kind: "something_new", detail: 1 },
  ]);
  assert.deepEqual(roles(t), ["user", "cancelled", "turn_end", "user", "error", "turn_end", "status"]);
  assert.equal(t.messages[4].text, "turn timed out after 1800s");
  assert.equal(t.messages[6].text, "(something_new event)");
});

test("hostile or malformed events do not throw", () => {
  const t = emptyTranscript();
  for (const e of [null, 5, "x", [], {}, { id: -1, kind: "text" }, { id: 1.5, kind: "text", text: 3 }, { id: 9, kind: "tool", input: undefined }]) {
    apply(t, e);
  }
  assert.ok(t.messages.every((m) => typeof m.role === "string"));
  assert.equal(toolSummary(t.messages.find((m) => m.role === "tool")), "");
});

test("long output is previewed with a way to see more", () => {
  assert.deepEqual(preview("short"), { text: "short", more: false });
  const long = preview("x".repeat(5000), 100);
  assert.equal(long.text.length, 100);
  assert.equal(long.more, true);
});

test("many notices in a row stay between the ids around them", () => {
  const t = applyAll(emptyTranscript(), [{ id: 0, kind: "user", text: "x" }, { id: 1, kind: "text", text: "a" }]);
  for (let i = 0; i < 6; i++) apply(t, { kind: "status", text: `notice ${i}` });
  apply(t, { kind: "turn_end" });
  apply(t, { id: 2, kind: "user", text: "next" });
  apply(t, { id: 3, kind: "text", text: "b" });
  assert.deepEqual(
    t.messages.map((m) => m.text ?? m.role),
    ["x", "a", "notice 0", "notice 1", "notice 2", "notice 3", "notice 4", "notice 5", "turn_end", "next", "b"],
  );
  assert.equal(turnRunning(t), true, "the new turn runs");
});

test("output whose call never came is shown when the turn ends", () => {
  const t = applyAll(emptyTranscript(), [
    { id: 0, kind: "user", text: "x" },
    { id: 1, kind: "tool_result", tool_use_id: "lost", content: "orphaned output" },
  ]);
  assert.equal(t.messages.some((m) => m.content === "orphaned output"), false, "held while its call may still come");
  apply(t, { id: 2, kind: "turn_end" });
  const shown = t.messages.find((m) => m.content === "orphaned output");
  assert.equal(shown.role, "output");
});

// Live text (README, "API"): deltas grow a message until its text replaces it.
const delta = (text, message_id = "msg_1", index = 0) => ({ message_id, index, text });
const agentTexts = (t) => t.messages.filter((m) => m.role === "agent").map((m) => m.text);

test("deltas grow a message, and its text replaces it in place", () => {
  const t = applyAll(emptyTranscript(), turn.slice(0, 2));
  applyDelta(t, delta("Checking "));
  const growing = t.messages.at(-1);
  assert.equal(growing.live, true);
  applyDelta(t, delta("devvm."));
  assert.deepEqual(agentTexts(t), ["Checking devvm."]);
  assert.equal(lastId(t), 1, "deltas have no id");
  apply(t, { id: 2, kind: "text", text: "Checking devvm.", message_id: "msg_1", index: 0 });
  assert.deepEqual(agentTexts(t), ["Checking devvm."], "one message, not two");
  assert.equal(t.messages.at(-1), growing, "the same message, so the page redraws it where it is");
  assert.equal(growing.live, false);
  assert.equal(growing.id, 2);
  apply(t, { id: 3, kind: "tool", name: "Bash", input: {}, tool_use_id: "t9" });
  assert.deepEqual(roles(t), ["user", "agent", "tool"]);
});

test("a delta that comes after its message's text is ignored", () => {
  const t = applyAll(emptyTranscript(), turn.slice(0, 2));
  applyDelta(t, delta("Check"));
  apply(t, { id: 2, kind: "text", text: "Checking devvm.", message_id: "msg_1", index: 0 });
  applyDelta(t, delta("ing devvm."));
  applyDelta(t, delta("late", "msg_1", 2));
  assert.deepEqual(agentTexts(t), ["Checking devvm."]);
  // Even when the text came first of all (attached mid-message).
  const u = applyAll(emptyTranscript(), turn.slice(0, 2));
  apply(u, { id: 2, kind: "text", text: "Checking devvm.", message_id: "msg_1", index: 0 });
  applyDelta(u, delta("devvm."));
  assert.deepEqual(agentTexts(u), ["Checking devvm."]);
});

test("a reload replays the log without deltas and shows each message once", () => {
  const live = applyAll(emptyTranscript(), turn.slice(0, 2));
  for (const piece of ["Check", "ing."]) applyDelta(live, delta(piece));
  apply(live, { id: 2, kind: "text", text: "Checking.", message_id: "msg_1", index: 0 });
  applyAll(live, turn.slice(3));
  const log = [...turn.slice(0, 2), { id: 2, kind: "text", text: "Checking.", message_id: "msg_1", index: 0 }, ...turn.slice(3)];
  const reloaded = applyAll(emptyTranscript(), log);
  const strip = (t) => t.messages.map(({ role, id, text }) => ({ role, id, text }));
  assert.deepEqual(strip(reloaded), strip(live));
  assert.deepEqual(agentTexts(reloaded), ["Checking."]);
});

test("a message cut short by the turn's end is not left growing", () => {
  const t = applyAll(emptyTranscript(), turn.slice(0, 2));
  applyDelta(t, delta("half a sent"));
  apply(t, { id: 2, kind: "cancelled" });
  apply(t, { id: 3, kind: "turn_end" });
  assert.deepEqual(roles(t), ["user", "cancelled", "turn_end"], "the log never had it: a reload would not show it");
  applyDelta(t, delta("ence"));
  assert.deepEqual(roles(t), ["user", "cancelled", "turn_end"]);
});

test("malformed deltas are ignored", () => {
  const t = applyAll(emptyTranscript(), turn.slice(0, 2));
  for (const bad of [null, "x", {}, { message_id: "m", index: 0 }, { message_id: 3, index: 0, text: "a" }, { message_id: "m", index: -1, text: "a" }]) {
    applyDelta(t, bad);
  }
  assert.deepEqual(roles(t), ["user"]);
});

test("a call asked again under its id gets its own result, and the first keeps its own", () => {
  const t = applyAll(emptyTranscript(), [
    { id: 1, kind: "tool", name: "Bash", input: { command: "ssh pve reset" }, tool_use_id: "t9" },
    { id: 2, kind: "tool_result", tool_use_id: "t9", is_error: true, content: "denied" },
    { id: 3, kind: "tool", name: "Bash", input: { command: "ssh pve reset" }, tool_use_id: "t9" },
    { id: 4, kind: "tool_result", tool_use_id: "t9", is_error: false, content: "reset done" },
  ]);
  const calls = t.messages.filter((m) => m.role === "tool");
  assert.equal(calls.length, 2);
  assert.equal(calls[0].result.content, "denied");
  assert.equal(calls[1].result.content, "reset done");
});
