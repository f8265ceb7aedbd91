// node --test web/test/: the approval card's pure parts (README "The web
// console": a risky tool call waits for the operator).
import { test } from "node:test";
import assert from "node:assert/strict";
import { emptyTranscript, apply, applyAll, pendingApprovals, turnRunning } from "../transcript.js";
import { cardView, commandText, countdown, decisionText, extentText, revealHidden, serverOffsetMs } from "../approval.js";

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

test("a second approval of the same tool_use_id gets its own card and its own decision", () => {
  // The agent re-asks after a deny: the server logs a new approval with the
  // same id once the first is decided (README "Approvals").
  const log = [...turn, ask(2), decide(3, "deny", "alice"), ask(4), decide(5, "allow", "bob")];
  const cards = (t) => t.messages.filter((m) => m.role === "approval");
  const t = applyAll(emptyTranscript(), log.slice(0, 5));
  const [first, second] = cards(t);
  assert.equal(first.decision.by, "alice");
  assert.equal(second.decision, null, "the re-asked call waits");
  assert.deepEqual(pendingApprovals(t), [second]);
  apply(t, log[5]);
  assert.equal(cardView(first, {}, DEADLINE).text, "Denied by alice at 03:12", "the first card keeps its own decision");
  assert.equal(cardView(second, {}, DEADLINE).text, "Allowed by bob at 03:12");
  assert.deepEqual(pendingApprovals(t), []);
});

test("re-asked approvals pair with their decisions in whatever order the events arrive", () => {
  const log = [...turn, ask(2), decide(3, "deny", "alice"), ask(4), decide(5, "allow", "bob"), ask(6), decide(7, "deny", "timeout")];
  const expected = [
    [2, "deny alice"],
    [4, "allow bob"],
    [6, "deny timeout"],
  ];
  const orders = [log, [...log].reverse(), [log[0], log[1], log[7], log[5], log[3], log[2], log[6], log[4]]];
  for (const order of orders) {
    const t = applyAll(emptyTranscript(), order);
    const got = t.messages.filter((m) => m.role === "approval").map((m) => [m.id, m.decision && `${m.decision.decision} ${m.decision.by}`]);
    assert.deepEqual(got, expected, order.map((e) => e.id).join(","));
  }
  // Only the last ask still waits when its decision has not arrived.
  const t = applyAll(emptyTranscript(), log.slice(0, 6).concat(log[6]));
  assert.deepEqual(pendingApprovals(t).map((m) => m.id), [6]);
});

const RLO = "\u202E";

test("bidi controls and zero-width characters are shown as escapes, never raw, with a warning", () => {
  // Reversed by U+202E, "rm -rf /" would read as something harmless.
  const command = `echo safe ${RLO}/ fr- mr\u200B; ls\uFEFF`;
  const t = applyAll(emptyTranscript(), [...turn, ask(2, "toolu_1", { input: { command } })]);
  const view = cardView(approvalOf(t), {}, DEADLINE);
  assert.equal(view.command, "echo safe ⟨U+202E⟩/ fr- mr⟨U+200B⟩; ls⟨U+FEFF⟩");
  assert.deepEqual(
    view.commandParts.filter((p) => p.hidden).map((p) => p.text),
    ["⟨U+202E⟩", "⟨U+200B⟩", "⟨U+FEFF⟩"],
  );
  assert.equal(view.commandParts.map((p) => p.text).join(""), view.command);
  assert.equal(view.warning, "This command contains invisible characters (3), shown as ⟨U+…⟩.");
  assert.ok(!/[\u202A-\u202E\u2066-\u2069\u200B-\u200F\u2060\uFEFF]/.test(view.command), "nothing raw is left");
});

test("every bidi control, zero-width and control character is revealed; tabs, newlines and plain text are not", () => {
  const hidden = [
    ..."\u202A\u202B\u202C\u202D\u202E\u2066\u2067\u2068\u2069",
    ..."\u200B\u200C\u200D\u200E\u200F\u2060\uFEFF",
    ..."\u0000\u0007\u001B\r\u007F\u0085\u00AD\u061C\u180E\u2028\u2029\u3164\uFE0F",
    "\u{E0041}", // a tag character: ASCII smuggled out of sight
  ];
  for (const ch of hidden) {
    const got = revealHidden(`a${ch}b`);
    const hex = ch.codePointAt(0).toString(16).toUpperCase().padStart(4, "0");
    assert.equal(got.hidden, 1, `U+${hex}`);
    assert.deepEqual(got.parts, [{ text: "a" }, { text: `⟨U+${hex}⟩`, hidden: true }, { text: "b" }], `U+${hex}`);
  }
  const plain = "ssh pve 'qm  reset 101'\n\tdf -h é 日本 — ✓";
  assert.deepEqual(revealHidden(plain), { parts: [{ text: plain }], hidden: 0 });
  assert.deepEqual(revealHidden(""), { parts: [], hidden: 0 });
  assert.equal(cardView({ tool: "Bash", input: { command: "ls" }, toolUseId: "t" }, {}, DEADLINE).warning, "");
});

test("a multi-line command says how many lines it has, so nothing hides below the fold", () => {
  const command = "echo checking\n".repeat(40) + "rm -rf /";
  const t = applyAll(emptyTranscript(), [...turn, ask(2, "toolu_1", { input: { command } })]);
  const view = cardView(approvalOf(t), {}, DEADLINE);
  assert.equal(view.lines, 41);
  assert.equal(extentText(view.lines, false), "41 lines");
  assert.equal(extentText(view.lines, true), "41 lines: scroll the command to read all of it");
  assert.equal(extentText(1, true), "Longer than the box: scroll the command to read all of it");
  assert.equal(extentText(1, false), "", "one line that fits needs no note");
  assert.equal(cardView({ tool: "Bash", input: { command: "ls -l\n" }, toolUseId: "t" }, {}, DEADLINE).lines, 1, "a final newline ends a line");
  assert.equal(cardView({ tool: "Bash", input: { command: "ls\n\nrm x" }, toolUseId: "t" }, {}, DEADLINE).lines, 3);
});
