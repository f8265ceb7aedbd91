// node --test web/test/: the approval card's pure parts (README "The web
// console": a risky tool call waits for the operator).
import { test } from "node:test";
import assert from "node:assert/strict";
import { emptyTranscript, apply, applyAll, pendingApprovals, turnRunning } from "../transcript.js";
import { cardView, commandText, countdown, decisionText, serverOffsetMs } from "../approval.js";

// Clock times below are read in UTC.
process.env.TZ = "UTC";

const DEADLINE = Date.UTC(2025, 10, 29, 3, 22, 0);
const MIN = 60_000;

const ask = (id, tool_use_id = "toolu_1", extra = {}) => ({
  id,
  kind: "approval",
  tool_use_id,
  tool: "Bash",
  input: { command: "ssh pve reset", description: "Hard reset the VM" },
  reason: "a power verb on the hypervisor",
  effect: "hard reset of the VM: unsaved guest state is lost",
  deadline_ms: DEADLINE,
  ...extra,
});
const decide = (id, decision, by, extra = {}) => ({
  id,
  kind: "approval_decision",
  tool_use_id: "toolu_1",
  decision,
  by,
  at_ms: Date.UTC(2025, 10, 29, 3, 12, 30),
  ...extra,
});
const turn = [
  { id: 0, kind: "user", text: "reset the VM", by: "alice" },
  { id: 1, kind: "tool", name: "Bash", input: { command: "ssh pve reset" }, tool_use_id: "toolu_1" },
];
const approvalOf = (t) => t.messages.find((m) => m.role === "approval");

test("an approval is a message of its own, pending until its decision", () => {
  const t = applyAll(emptyTranscript(), [...turn, ask(2)]);
  assert.deepEqual(t.messages.map((m) => m.role), ["user", "tool", "approval"]);
  const m = approvalOf(t);
  assert.equal(m.decision, null);
  assert.deepEqual(pendingApprovals(t), [m]);
  const view = cardView(m, {}, DEADLINE - 9 * MIN - 41_000);
  assert.equal(view.phase, "pending");
  assert.equal(view.command, "ssh pve reset");
  assert.equal(view.explain, "hard reset of the VM: unsaved guest state is lost");
  assert.equal(view.countdown, "auto-deny in 9:41");
  assert.equal(view.buttons, "enabled");
});

test("the decision resolves the card, whoever made it, and takes its buttons away", () => {
  const t = applyAll(emptyTranscript(), [...turn, ask(2), decide(3, "allow", "alice")]);
  const m = approvalOf(t);
  assert.deepEqual(pendingApprovals(t), []);
  const view = cardView(m, { sending: "deny" }, DEADLINE - MIN);
  assert.equal(view.phase, "resolved");
  assert.equal(view.outcome, "allow");
  assert.equal(view.text, "Allowed by alice at 03:12");
  assert.equal(view.buttons, "none");
  assert.equal(view.countdown, "");
});

test("each way a call is denied reads in plain words", () => {
  const cases = [
    [decide(3, "deny", "timeout"), "Denied by timeout at 03:12"],
    [decide(3, "deny", "turn-ended"), "Denied: the turn ended"],
    [decide(3, "deny", "restart"), "Denied: the server restarted"],
    [decide(3, "deny", "bob", { message: "not during office hours" }), "Denied by bob at 03:12: “not during office hours”"],
  ];
  for (const [event, text] of cases) {
    const t = applyAll(emptyTranscript(), [...turn, ask(2), event]);
    assert.equal(cardView(approvalOf(t), {}, DEADLINE).text, text, event.by);
    assert.equal(decisionText(approvalOf(t).decision, DEADLINE), text);
  }
});

test("a decision from another day says the day", () => {
  const d = { decision: "allow", by: "alice", atMs: Date.UTC(2025, 10, 27, 23, 5, 0), message: "" };
  assert.equal(decisionText(d, DEADLINE), "Allowed by alice at 27 Nov 23:05");
});

test("a reload replays the log: decided stays decided, undecided stays pending", () => {
  const log = [...turn, ask(2), decide(3, "deny", "timeout"), ask(4, "toolu_2", { deadline_ms: DEADLINE + 10 * MIN })];
  const t = applyAll(emptyTranscript(), log);
  const [first, second] = t.messages.filter((m) => m.role === "approval");
  assert.equal(cardView(first, {}, DEADLINE).phase, "resolved");
  assert.equal(cardView(second, {}, DEADLINE).phase, "pending");
  assert.equal(cardView(second, {}, DEADLINE).countdown, "auto-deny in 10:00");
  assert.deepEqual(pendingApprovals(t), [second]);
  // The same log again (a reconnect) changes nothing.
  const before = JSON.stringify(t.messages);
  applyAll(t, log);
  assert.equal(JSON.stringify(t.messages), before);
});

test("a decision that arrives before its approval still resolves it", () => {
  const t = applyAll(emptyTranscript(), [...turn, decide(3, "allow", "alice"), ask(2)]);
  assert.equal(approvalOf(t).decision.decision, "allow");
  assert.deepEqual(pendingApprovals(t), []);
  assert.deepEqual(t.messages.map((m) => m.role), ["user", "tool", "approval"], "the decision is not a message of its own");
});

test("the effect is shown when the policy knows it, else the reason", () => {
  const t = applyAll(emptyTranscript(), [...turn, ask(2, "toolu_1", { effect: undefined })]);
  assert.equal(cardView(approvalOf(t), {}, DEADLINE).explain, "a power verb on the hypervisor");
  assert.equal(cardView(approvalOf(t), {}, DEADLINE).explainIsEffect, false);
});

test("a Bash call shows its command exactly; other tools a compact rendering of their input", () => {
  assert.equal(commandText({ tool: "Bash", input: { command: "ssh pve 'qm  reset 101'\n", description: "x" } }), "ssh pve 'qm  reset 101'\n");
  assert.equal(
    commandText({ tool: "Write", input: { file_path: "/etc/fstab", content: "UUID=… / ext4\n" } }),
    "file_path: /etc/fstab\ncontent: UUID=… / ext4\n",
  );
  assert.equal(commandText({ tool: "mcp__pve__reset", input: { vmid: 101, force: true } }), "vmid: 101\nforce: true");
  assert.equal(commandText({ tool: "Bash", input: { not_command: 1 } }), "not_command: 1");
  assert.equal(commandText({ tool: "Odd", input: null }), "");
  assert.equal(commandText({ tool: "Odd", input: [1, 2] }), "[1,2]");
});

test("the countdown ticks in minutes and seconds, and says when it is due", () => {
  assert.equal(countdown(DEADLINE, DEADLINE - 600_000), "auto-deny in 10:00");
  assert.equal(countdown(DEADLINE, DEADLINE - 59_001), "auto-deny in 1:00", "a started second counts");
  assert.equal(countdown(DEADLINE, DEADLINE - 5_000), "auto-deny in 0:05");
  assert.equal(countdown(DEADLINE, DEADLINE - 2 * 3600_000 - 61_000), "auto-deny in 2:01:01");
  assert.equal(countdown(DEADLINE, DEADLINE), "auto-deny due now");
  assert.equal(countdown(DEADLINE, DEADLINE + 30_000), "auto-deny due now");
  assert.equal(countdown(null, DEADLINE), "");
});

test("while a decision is in flight the buttons are disabled; an error lets the operator retry", () => {
  const t = applyAll(emptyTranscript(), [...turn, ask(2)]);
  const m = approvalOf(t);
  const sending = cardView(m, { sending: "allow" }, DEADLINE - MIN);
  assert.equal(sending.phase, "sending");
  assert.equal(sending.buttons, "disabled");
  assert.equal(sending.text, "Sending allow…");
  assert.equal(sending.countdown, "auto-deny in 1:00", "the clock keeps running");
  const failed = cardView(m, { error: "no connection to the server" }, DEADLINE - MIN);
  assert.equal(failed.phase, "pending");
  assert.equal(failed.buttons, "enabled");
  assert.equal(failed.text, "Not sent: no connection to the server. Try again.");
  const sent = cardView(m, { sent: "deny" }, DEADLINE - MIN);
  assert.equal(sent.buttons, "disabled");
  assert.equal(sent.text, "Deny accepted; waiting for it to be logged…");
});

test("a call decided elsewhere (409) says so until its decision arrives", () => {
  const t = applyAll(emptyTranscript(), [...turn, ask(2)]);
  const already = cardView(approvalOf(t), { already: true }, DEADLINE - MIN);
  assert.equal(already.phase, "already");
  assert.equal(already.buttons, "none");
  assert.equal(already.text, "Already decided (on another device, or by the timeout).");
  apply(t, decide(3, "deny", "timeout"));
  assert.equal(cardView(approvalOf(t), { already: true }, DEADLINE).text, "Denied by timeout at 03:12");
});

test("a pending approval keeps the turn running and a turn's end does not hide it", () => {
  const t = applyAll(emptyTranscript(), [...turn, ask(2)]);
  assert.equal(turnRunning(t), true);
  apply(t, decide(3, "deny", "turn-ended"));
  apply(t, { id: 4, kind: "turn_end" });
  assert.equal(turnRunning(t), false);
  assert.equal(cardView(approvalOf(t), {}, DEADLINE).text, "Denied: the turn ended");
});

test("malformed approvals do not throw and never offer buttons without a call to decide", () => {
  const t = emptyTranscript();
  for (const e of [
    { id: 1, kind: "approval" },
    { id: 2, kind: "approval", tool_use_id: 5, input: "x", deadline_ms: "soon" },
    { id: 3, kind: "approval_decision" },
    { id: 4, kind: "approval_decision", tool_use_id: "nope", decision: "maybe" },
  ]) {
    apply(t, e);
  }
  for (const m of t.messages.filter((m) => m.role === "approval")) {
    const view = cardView(m, {}, DEADLINE);
    assert.equal(view.countdown, "");
    assert.equal(view.buttons, "none", JSON.stringify(m));
  }
});

test("the server's clock corrects a phone's that is off by more than the Date header's second", () => {
  const server = "Sat, 29 Nov 2025 03:12:00 GMT";
  const at = Date.parse(server);
  assert.equal(serverOffsetMs(server, at + 400), 0, "within the header's resolution");
  assert.equal(serverOffsetMs(server, at - 5 * MIN), 5 * MIN);
  assert.equal(serverOffsetMs(null, at), 0);
  assert.equal(serverOffsetMs("garbage", at), 0);
});
