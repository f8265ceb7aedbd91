// The console: attaches to the session's event stream, renders the
// transcript, sends prompts, and drives the VM controls. The transcript fold
// itself lives in transcript.js, the approval card's words in approval.js
// (both pure, unit-tested).
import { emptyTranscript, apply, applyDelta, lastId, turnRunning, pendingApprovals, preview, toolSummary, resultFacts } from "./transcript.js";
import { cardView, extentText, revealHidden, serverOffsetMs } from "./approval.js";

const $ = (id) => document.getElementById(id);
const SESSION_KEY = "breakglass.session";

const state = {
  session: localStorage.getItem(SESSION_KEY),
  transcript: emptyTranscript(),
  source: null,
  caughtUp: false,
  linkDown: false,
  keepaliveMs: 15000,
  lastSignal: Date.now(),
  sending: false,
  signedOut: false,
  // How far the server's clock is ahead of this device's: the auto-deny
  // countdown runs on the server's clock (its deadline_ms).
  clockOffsetMs: 0,
  // This page's own attempt to decide each approval, by its message: a
  // tool_use_id asked again is a card of its own (README "Approvals").
  cardUi: new Map(),
  // Approvals already scrolled to and announced, by session and event id.
  announced: new Set(),
};

const serverNow = () => Date.now() + state.clockOffsetMs;

// ---- API -----------------------------------------------------------------

async function api(method, path, body) {
  const init = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    // No network at all: the caller sees a failure, never an exception.
    state.linkDown = true;
    lamp();
    return { status: 0, ok: false, data: { detail: "no connection to the server" } };
  }
  if (response.status === 401 && path !== "/api/whoami") signedOut(true);
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  return { status: response.status, ok: response.ok, data, date: response.headers.get("Date") };
}

// ---- The lamp and the banner ---------------------------------------------

function signedOut(yes) {
  state.signedOut = yes;
  lamp();
}

function lamp() {
  const waiting = pendingApprovals(state.transcript).length;
  // A background tab says it too.
  const title = waiting ? `(${waiting}) waiting for you · breakglass` : "breakglass";
  if (document.title !== title) document.title = title;
  let mode = "connecting";
  if (state.signedOut) mode = "signed-out";
  else if (state.linkDown) mode = "down";
  else if (state.caughtUp) mode = waiting ? "waiting" : turnRunning(state.transcript) ? "working" : "attached";
  const text = {
    connecting: "connecting",
    attached: "attached",
    waiting: "waiting for you",
    working: "agent working",
    down: "link down",
    "signed-out": "signed out",
  }[mode];
  if ($("lamp").dataset.state !== mode) {
    $("lamp").dataset.state = mode;
    $("lamp-text").textContent = text;
  }
  $("banner").hidden = !state.linkDown || state.signedOut;
  $("signed-out").hidden = !state.signedOut;
  const running = turnRunning(state.transcript);
  const busy = running || state.sending;
  // While a turn runs, Stop takes Send's place (one big target on a phone).
  $("send").disabled = busy;
  $("send").hidden = running;
  $("prompt").disabled = busy;
  $("stop").hidden = !running;
  for (const b of $("presets").querySelectorAll("button")) b.disabled = busy;
}

// ---- Attach --------------------------------------------------------------

function attach() {
  if (state.source) state.source.close();
  state.caughtUp = false;
  lamp();
  if (!state.session) return;
  // A new EventSource does not send Last-Event-ID on its own: say it in the URL.
  const last = lastId(state.transcript);
  const query = last === null ? "" : `?lastEventId=${last}`;
  const source = new EventSource(`/api/session/${state.session}/stream${query}`);
  state.source = source;
  // Comments (": keepalive") never reach the page; the server's keepalive
  // frame also carries this named event, so the page knows the link lives.
  source.addEventListener("keepalive", () => {
    state.lastSignal = Date.now();
  });
  source.onopen = () => {
    state.linkDown = false;
    state.lastSignal = Date.now();
    lamp();
  };
  source.onmessage = (message) => {
    state.lastSignal = Date.now();
    let event;
    try {
      event = JSON.parse(message.data);
    } catch {
      return;
    }
    apply(state.transcript, event);
    scheduleRender();
  };
  // Live text: a named event without an id, so the stream's last event id
  // (what a reconnect resumes from) stays that of the last logged event.
  source.addEventListener("delta", (message) => {
    state.lastSignal = Date.now();
    let delta;
    try {
      delta = JSON.parse(message.data);
    } catch {
      return;
    }
    applyDelta(state.transcript, delta);
    scheduleRender();
  });
  source.addEventListener("caught-up", () => {
    state.caughtUp = true;
    state.linkDown = false;
    state.lastSignal = Date.now();
    // The replay is in: an approval still waiting is now known to be.
    scheduleRender();
    lamp();
  });
  source.onerror = async () => {
    state.linkDown = true;
    lamp();
    if (source.readyState === EventSource.CLOSED) {
      // The browser gave up: the session may be gone (404), or we are signed out.
      const probe = await api("GET", `/api/session/${state.session}`);
      if (source !== state.source) return; // the operator moved on meanwhile
      if (probe.status === 404) await newSession();
      else if (probe.status !== 401) setTimeout(() => source === state.source && attach(), 2000);
    }
  };
}

// Phones freeze background tabs; a stream that has been silent for longer
// than two keepalive periods is re-attached (from the last id we have).
function watchdog() {
  if (document.visibilityState === "visible" && state.source && Date.now() - state.lastSignal > 2 * state.keepaliveMs) {
    state.lastSignal = Date.now();
    attach();
  }
}

let opening = null;

/** Opens a new session and switches to it; concurrent callers share one. */
function newSession() {
  opening ??= (async () => {
    const opened = await api("POST", "/api/session");
    if (!opened.ok) {
      state.linkDown = opened.status === 0 || state.linkDown;
      lamp();
      return false;
    }
    switchTo(opened.data.session_id);
    return true;
  })().finally(() => {
    opening = null;
  });
  return opening;
}

function switchTo(id) {
  state.session = id;
  localStorage.setItem(SESSION_KEY, id);
  state.transcript = emptyTranscript();
  state.cardUi.clear();
  rendered.clear();
  $("transcript").replaceChildren();
  attach();
}

// ---- Rendering -----------------------------------------------------------

const rendered = new Map(); // message object -> element
let renderQueued = false;

/** Renders at most once a frame, however many events arrive (a replay). */
function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    render();
  });
}

function render() {
  const list = $("transcript");
  const kept = new Set();
  waitingIds = new Set(pendingApprovals(state.transcript).map((m) => m.toolUseId));
  const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  let previous = null;
  for (const message of state.transcript.messages) {
    let element = rendered.get(message);
    if (!element || element.dataset.version !== version(message)) {
      const fresh = draw(message);
      fresh.dataset.version = version(message);
      if (element) element.replaceWith(fresh);
      element = fresh;
      rendered.set(message, element);
    }
    // Keep DOM order equal to transcript order (out-of-order ids land in place).
    const expected = previous ? previous.nextSibling : list.firstChild;
    if (expected !== element) list.insertBefore(element, expected);
    previous = element;
    kept.add(message);
  }
  // Text that was still growing when its turn ended is gone from the fold.
  for (const [message, element] of rendered) {
    if (!kept.has(message)) {
      element.remove();
      rendered.delete(message);
    }
  }
  if (nearBottom) list.scrollTop = list.scrollHeight;
  for (const [message, element] of rendered) {
    if (message.role === "approval") paintCard(element, message);
  }
  lamp();
}

/** tool_use_ids of the approvals now waiting, as of the last render. */
let waitingIds = new Set();

function version(message) {
  if (message.live) return `live ${message.text.length}`;
  // An approval card is drawn once and painted in place (paintCard), so
  // what the operator types into it survives every event and tick.
  if (message.role === "approval") return "card";
  if (message.role !== "tool") return "1";
  if (message.result) return "answered";
  return waitingIds.has(message.toolUseId) ? "waiting" : "asked";
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function draw(m) {
  const item = el("li", `msg ${m.role}`);
  if (m.id !== null) item.dataset.id = String(m.id);
  switch (m.role) {
    case "user":
      item.append(el("span", "meta", m.by ? `you (${m.by})` : "you"), document.createTextNode(m.text));
      break;
    case "agent":
      item.append(el("span", "meta", "agent"), document.createTextNode(m.text));
      // Still being written: assistive technology waits for the whole text.
      if (m.live) {
        item.classList.add("live");
        item.setAttribute("aria-busy", "true");
      }
      break;
    case "tool": {
      const details = el("details");
      const summary = el("summary");
      const code = el("code");
      code.append(...revealed(toolSummary(m)));
      summary.append(el("span", "", `${m.name}:`), code);
      details.append(summary);
      if (m.result) details.append(output(m.result.content, m.result.isError));
      else details.append(el("p", "meta", waitingIds.has(m.toolUseId) ? "waiting for your decision…" : "running…"));
      item.append(details);
      break;
    }
    case "result": {
      if (m.isError) item.classList.add("failed");
      item.append(el("span", "meta", `${m.isError ? "failed" : "done"} · ${resultFacts(m)}`), document.createTextNode(m.text));
      break;
    }
    case "error":
      item.append(el("span", "meta is-error", "error"), document.createTextNode(m.text));
      break;
    case "approval":
      drawCard(item, m);
      break;
    case "output":
      item.append(el("span", "meta", "tool output"), output(m.content, m.isError));
      break;
    default:
      item.textContent = m.text ?? "";
  }
  return item;
}

/** Tool output, capped, with "show all" for the rest. */
function output(text, isError) {
  const wrap = el("div");
  const cut = preview(text);
  const pre = el("pre", isError ? "is-error" : "", cut.text);
  wrap.append(pre);
  if (cut.more) {
    const more = el("button", "", `Show all (${text.length} characters)`);
    more.type = "button";
    more.addEventListener("click", () => {
      pre.textContent = text;
      more.remove();
    });
    wrap.append(more);
  }
  return wrap;
}

/** Nodes for text cut by revealHidden (approval.js): each invisible character a highlighted escape. */
function partNodes(parts) {
  return parts.map((part) => (part.hidden ? el("mark", "hidden-char", part.text) : document.createTextNode(part.text)));
}

const revealed = (text) => partNodes(revealHidden(text).parts);

// ---- Approval cards --------------------------------------------------------
//
// A risky tool call waits for the operator (README "The web console"). The
// card is drawn once; paintCard brings it up to date in place, on every
// render, every second (the countdown) and as this page's own decision goes
// out and comes back.

let cardSeq = 0;

function drawCard(item, m) {
  const n = ++cardSeq;
  item.setAttribute("aria-labelledby", `card-${n}-title`);
  const title = el("h2", "card-title"); // painted
  title.id = `card-${n}-title`;
  // Both painted: said before the command, so it is read before it.
  const warning = el("p", "command-warning");
  const extent = el("p", "command-extent");
  const command = el("pre", "command");
  command.tabIndex = 0; // a long input scrolls: the keyboard must reach it
  command.setAttribute("aria-label", "The command");
  command.append(el("code", "", "")); // painted
  const explain = el("p", "explain");
  // Ticks every second: not read out each time (the card itself is announced).
  const clock = el("p", "countdown");
  clock.setAttribute("aria-live", "off");
  const status = el("p", "card-status");
  status.setAttribute("role", "status");
  const decide = el("div", "decide-area");
  const label = el("label", "", "Message with a deny (optional)");
  label.htmlFor = `card-${n}-message`;
  const message = el("input", "deny-message");
  message.id = label.htmlFor;
  message.type = "text";
  message.maxLength = 500;
  message.autocomplete = "off";
  message.enterKeyHint = "done";
  const row = el("div", "decide");
  // Far apart, Deny under the left thumb and Allow under the right: no mis-tap.
  const deny = el("button", "deny", "✕ Deny");
  const allow = el("button", "allow", "✓ Allow");
  for (const [button, decision] of [[deny, "deny"], [allow, "allow"]]) {
    button.type = "button";
    button.dataset.decision = decision;
    button.addEventListener("click", () => decideCard(m, decision, item));
    row.append(button);
  }
  decide.append(label, message, row);
  item.append(title, warning, extent, command, explain, clock, decide, status);
}

function paintCard(item, m) {
  const view = cardView(m, state.cardUi.get(m) ?? {}, serverNow());
  item.dataset.phase = view.phase;
  item.classList.toggle("waiting", view.phase !== "resolved");
  if (view.outcome) item.dataset.outcome = view.outcome;
  const title = `The agent ${view.phase === "resolved" ? "asked" : "asks"} to run ${m.tool || "a tool"}`;
  const heading = item.querySelector(".card-title");
  if (heading.textContent !== title) heading.textContent = title;
  const code = item.querySelector(".command code");
  if (code.textContent !== view.command) code.replaceChildren(...partNodes(view.commandParts));
  const warning = item.querySelector(".command-warning");
  if (warning.textContent !== view.warning) warning.textContent = view.warning;
  warning.hidden = !view.warning;
  // Whether the box is shorter than the command is known only once drawn.
  const box = item.querySelector(".command");
  const size = extentText(view.lines, box.scrollHeight > box.clientHeight + 1);
  const extent = item.querySelector(".command-extent");
  if (extent.textContent !== size) extent.textContent = size;
  extent.hidden = !size;
  const explain = item.querySelector(".explain");
  const said = view.explain ? `${view.explainIsEffect ? "Effect" : "Why it asks"}: ${view.explain}` : "";
  if (explain.textContent !== said) explain.textContent = said;
  explain.hidden = !said;
  const clock = item.querySelector(".countdown");
  if (clock.textContent !== view.countdown) clock.textContent = view.countdown;
  clock.hidden = !view.countdown;
  const status = item.querySelector(".card-status");
  if (status.textContent !== view.text) status.textContent = view.text;
  status.hidden = !view.text;
  const decide = item.querySelector(".decide-area");
  if (decide && view.buttons === "none") {
    // Decided: no buttons left to tap. A keyboard that was on them stays on the card.
    const hadFocus = decide.contains(document.activeElement);
    decide.remove();
    if (hadFocus) {
      item.tabIndex = -1;
      item.focus({ preventScroll: true });
    }
  } else if (decide) {
    for (const control of decide.querySelectorAll("button, input")) control.disabled = view.buttons !== "enabled";
  }
  const heard = `${state.session} ${m.id}`;
  if (view.phase === "pending" && state.caughtUp && !state.announced.has(heard)) {
    // It has just arrived (or the page has just opened on it): bring it to
    // the operator's eyes and ears.
    state.announced.add(heard);
    item.scrollIntoView({ block: "nearest" });
    $("alert").textContent = [
      view.warning,
      `The agent waits for your decision: ${view.command}.`,
      view.lines > 1 && `${view.lines} lines.`,
      view.countdown && `${view.countdown}.`,
    ]
      .filter(Boolean)
      .join(" ");
  }
}

async function decideCard(m, decision, item) {
  const ui = state.cardUi.get(m) ?? {};
  if (m.decision || ui.sending || ui.sent || ui.already) return; // a double tap sends once
  const text = decision === "deny" ? (item.querySelector(".deny-message")?.value.trim() ?? "") : "";
  const session = state.session;
  state.cardUi.set(m, { sending: decision });
  paintCard(item, m);
  const body = text ? { decision, message: text } : { decision };
  const got = await api("POST", `/api/session/${session}/approvals/${encodeURIComponent(m.toolUseId)}`, body);
  let next;
  if (got.ok) next = { sent: decision };
  else if (got.status === 409) next = { already: true };
  else next = { error: got.data?.detail ?? `the server answered ${got.status}` };
  if (session !== state.session) return; // the operator moved on meanwhile
  state.cardUi.set(m, next);
  paintCard(item, m);
}

/** The countdowns, once a second. */
function tickCards() {
  for (const [message, element] of rendered) {
    if (message.role === "approval" && message.decision === null) paintCard(element, message);
  }
}

// ---- Prompts -------------------------------------------------------------

async function send(text) {
  const prompt = text.trim();
  if (!prompt || state.sending) return;
  state.sending = true; // a double tap sends once
  lamp();
  try {
    if (!state.session && !(await newSession())) return;
    let sent = await api("POST", `/api/session/${state.session}/prompt`, { prompt });
    if (sent.status === 404) {
      // The session is gone (another server, a wiped database): start afresh,
      // keeping what the operator typed.
      if (!(await newSession())) return;
      sent = await api("POST", `/api/session/${state.session}/prompt`, { prompt });
    }
    if (sent.ok) {
      if ($("prompt").value.trim() === prompt) $("prompt").value = "";
      autosize();
    } else {
      flash(sent.data?.detail ?? `could not send (${sent.status})`);
    }
  } finally {
    state.sending = false;
    lamp();
  }
}

function flash(text) {
  apply(state.transcript, { kind: "error", error: text });
  render();
}

function autosize() {
  const area = $("prompt");
  area.style.height = "auto";
  area.style.height = `${Math.min(area.scrollHeight, window.innerHeight * 0.4)}px`;
}

// ---- Presets -------------------------------------------------------------

async function loadPresets() {
  const got = await api("GET", "/api/presets");
  const box = $("presets");
  box.replaceChildren();
  for (const preset of got.data?.presets ?? []) {
    const button = el("button", "", preset.label);
    button.type = "button";
    button.title = preset.prompt;
    button.addEventListener("click", () => send(preset.prompt));
    box.append(button);
  }
  lamp();
}

// ---- VM controls ---------------------------------------------------------

const HINTS = {
  cycle: "Cycle: stop, then start again. The fix for a wedged VM (I/O stalled, no SSH, no guest agent); also applies staged config.",
  reset: "Reset only for a guest hang while the hypervisor itself is healthy.",
};
const TARGET_KEY = "breakglass.target";

// The targets and the operation this page watches: an operation runs on the
// server to its end whatever the page does (README "Power targets").
const power = { targets: [], source: null, running: false };

const currentTarget = () => power.targets.find((t) => t.name === $("target").value) ?? power.targets[0];

async function loadVerbs() {
  const got = await api("GET", "/api/targets");
  const box = $("verbs");
  if (!got.ok || !got.data?.targets?.length) {
    box.replaceChildren(el("p", "hint", got.data?.detail ?? "the targets could not be loaded"));
    return;
  }
  power.targets = got.data.targets;
  const select = $("target");
  const chosen = select.value || localStorage.getItem(TARGET_KEY);
  select.replaceChildren(...power.targets.map((t) => el("option", "", t.name)));
  select.value = power.targets.some((t) => t.name === chosen) ? chosen : power.targets[0].name;
  // One target needs no picker, but its name still says what the verbs reach.
  $("target-row").hidden = false;
  select.disabled = power.targets.length < 2;
  showVerbs();
}

function showVerbs() {
  const target = currentTarget();
  const box = $("verbs");
  box.replaceChildren();
  $("confirm").hidden = true;
  if (!target) return;
  const mutating = new Set(target.mutating);
  const readOnly = target.verbs.filter((v) => !mutating.has(v));
  const order = [...readOnly, ...target.mutating.filter((v) => v === "cycle"), ...target.mutating.filter((v) => v !== "cycle")];
  for (const verb of order) {
    const button = el("button", mutating.has(verb) ? "danger" : "", verb);
    button.type = "button";
    button.dataset.verb = verb;
    button.disabled = power.running;
    if (verb === "cycle") button.classList.add("headline");
    button.addEventListener("click", () => (mutating.has(verb) ? confirmVerb(verb) : runVerb(verb)));
    box.append(button);
    if (HINTS[verb]) box.append(el("p", "hint", HINTS[verb]));
  }
}

function confirmVerb(verb) {
  const target = currentTarget();
  $("confirm-text").textContent = `Run ${verb} on ${target.name}? Forensics are taken first.`;
  $("confirm-run").textContent = `Run ${verb}`;
  $("confirm-run").dataset.verb = verb;
  $("confirm").hidden = false;
  $("confirm-cancel").focus();
}

function setRunning(running) {
  power.running = running;
  for (const b of $("verbs").querySelectorAll("button")) b.disabled = running;
  $("target").disabled = running || power.targets.length < 2;
}

// Starts the verb as an operation and follows its steps live until its end.
async function runVerb(verb) {
  $("confirm").hidden = true;
  const target = currentTarget();
  const out = $("verb-output");
  out.hidden = false;
  out.textContent = `${verb} on ${target.name}: starting…`;
  setRunning(true);
  const body = state.session ? { session: state.session } : {};
  const got = await api("POST", `/api/targets/${encodeURIComponent(target.name)}/verbs/${encodeURIComponent(verb)}`, body);
  if (!got.ok || !got.data?.operation_id) {
    out.textContent = `${verb} on ${target.name}: ${got.data?.detail ?? `not started (${got.status})`}`;
    setRunning(false);
    return;
  }
  watchOperation(got.data.operation_id, `${verb} on ${target.name}`);
}

function watchOperation(id, title) {
  power.source?.close();
  const out = $("verb-output");
  out.textContent = `${title}:`;
  out.dataset.state = "running";
  // EventSource reconnects by itself, with the Last-Event-ID of the last
  // step seen: a bad link loses no step and repeats none.
  const source = new EventSource(`/api/operations/${encodeURIComponent(id)}/stream`);
  power.source = source;
  source.onmessage = (message) => {
    let event;
    try {
      event = JSON.parse(message.data);
    } catch {
      return;
    }
    if (event.kind === "step") {
      out.textContent += `\n· ${event.text}`;
    } else if (event.kind === "done") {
      const back = event.recovered_after_s != null ? ` · back after ${Math.round(event.recovered_after_s)} s` : "";
      out.textContent += `\n${event.state === "succeeded" ? "✓ succeeded" : "✗ failed"}${back}${event.error ? `: ${event.error}` : ""}`;
      out.dataset.state = event.state;
      source.close();
      if (power.source === source) power.source = null;
      setRunning(false);
    }
    out.scrollTop = out.scrollHeight;
  };
}

// ---- Sheets --------------------------------------------------------------

function openSheet(id) {
  $(id).hidden = false;
  $(id).querySelector("button")?.focus();
}

function closeSheet(id) {
  $(id).hidden = true;
}

async function loadSessions() {
  const list = $("session-list");
  list.replaceChildren(el("li", "note", "loading…"));
  const got = await api("GET", "/api/sessions?limit=50");
  list.replaceChildren();
  for (const s of got.data?.sessions ?? []) {
    const item = el("li");
    const open = el("button", "open", `${s.title ?? "(no prompt yet)"} · ${s.created.slice(0, 16).replace("T", " ")}${s.running ? " · running" : ""}`);
    open.type = "button";
    if (s.pending_approvals > 0) open.append(el("span", "badge", `${s.pending_approvals} waiting for you`));
    open.addEventListener("click", () => {
      closeSheet("sessions-sheet");
      switchTo(s.id);
    });
    const md = el("a", "", "export");
    md.href = `/api/session/${s.id}/export?format=md`;
    md.setAttribute("download", "");
    md.setAttribute("aria-label", `Export ${s.title ?? "session"} as Markdown`);
    item.append(open, md);
    list.append(item);
  }
  if (!list.childElementCount) list.append(el("li", "note", got.ok ? "no sessions yet" : got.data?.detail ?? "unavailable"));
}

// ---- Notifications (README "Notifications") ------------------------------

const pushSupported = window.isSecureContext && "serviceWorker" in navigator && "PushManager" in window && "Notification" in window;

function base64urlBytes(text) {
  const b64 = text.replace(/-/g, "+").replace(/_/g, "/");
  const raw = atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4));
  return Uint8Array.from(raw, (c) => c.charCodeAt(0));
}

/** Shows whether this browser gets the server's push notes. */
async function showPush() {
  const button = $("push-toggle");
  if (!pushSupported) return;
  const registration = await navigator.serviceWorker.getRegistration().catch(() => null);
  if (!registration) return;
  button.hidden = false;
  const subscription = await registration.pushManager.getSubscription().catch(() => null);
  const on = Boolean(subscription) && Notification.permission === "granted";
  button.setAttribute("aria-pressed", String(on));
  button.textContent = `Notifications on this device: ${on ? "on" : "off"}`;
}

async function togglePush() {
  const button = $("push-toggle");
  button.disabled = true;
  $("push-note").textContent = "";
  try {
    const registration = await navigator.serviceWorker.getRegistration();
    const existing = await registration.pushManager.getSubscription();
    if (existing) {
      await api("DELETE", "/api/push/subscriptions", { endpoint: existing.endpoint });
      await existing.unsubscribe();
      return;
    }
    if ((await Notification.requestPermission()) !== "granted") {
      $("push-note").textContent = "notifications are blocked for this site";
      return;
    }
    const key = await api("GET", "/api/push/key");
    if (!key.ok) {
      $("push-note").textContent = key.data?.detail ?? "the server has no push key";
      return;
    }
    const subscription = await registration.pushManager.subscribe({
      userVisibleOnly: true,
      applicationServerKey: base64urlBytes(key.data.public_key),
    });
    const saved = await api("POST", "/api/push/subscriptions", subscription.toJSON());
    if (!saved.ok) {
      await subscription.unsubscribe();
      $("push-note").textContent = saved.data?.detail ?? "the server refused the subscription";
    }
  } catch (err) {
    $("push-note").textContent = `could not change notifications (${err.message ?? err})`;
  } finally {
    button.disabled = false;
    showPush();
  }
}

// ---- Start ---------------------------------------------------------------

async function whoami() {
  const me = await api("GET", "/api/whoami");
  if (me.ok) {
    state.clockOffsetMs = serverOffsetMs(me.date, Date.now());
    signedOut(false);
    $("who").textContent = `signed in as ${me.data.identity}${me.data.power_configured ? "" : " · no hypervisor configured"}`;
    state.keepaliveMs = (me.data.keepalive_seconds || 15) * 1000;
  } else if (me.status === 401) {
    signedOut(true);
    $("who").textContent = "signed out";
  }
}

async function start() {
  // A notification's link names its session (`/?session=<id>`): open it, then
  // drop it from the address bar so a reload keeps whatever is open then.
  const linked = new URLSearchParams(location.search).get("session");
  if (linked !== null) {
    if (/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(linked)) {
      state.session = linked.toLowerCase();
      localStorage.setItem(SESSION_KEY, state.session);
    }
    history.replaceState(null, "", "/");
  }
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send($("prompt").value);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send($("prompt").value);
    }
  });
  $("prompt").addEventListener("input", autosize);
  $("stop").addEventListener("click", () => api("POST", `/api/session/${state.session}/cancel`));
  $("new-session").addEventListener("click", newSession);
  $("open-vm").addEventListener("click", () => {
    openSheet("vm-sheet");
    loadVerbs();
  });
  $("banner").addEventListener("click", (e) => {
    if (e.target.id === "banner-vm") {
      openSheet("vm-sheet");
      loadVerbs();
    }
  });
  $("open-sessions").addEventListener("click", () => {
    openSheet("sessions-sheet");
    loadSessions();
    showPush();
  });
  $("push-toggle").addEventListener("click", togglePush);
  for (const close of document.querySelectorAll("[data-close]")) {
    close.addEventListener("click", () => closeSheet(close.dataset.close));
  }
  $("confirm-cancel").addEventListener("click", () => ($("confirm").hidden = true));
  $("confirm-run").addEventListener("click", () => runVerb($("confirm-run").dataset.verb));
  $("target").addEventListener("change", () => {
    localStorage.setItem(TARGET_KEY, $("target").value);
    showVerbs();
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") {
      $("confirm").hidden = true;
      for (const id of ["vm-sheet", "sessions-sheet"]) closeSheet(id);
    }
  });
  // Back from the background, or back online: catch up on everything.
  const refresh = () => {
    whoami();
    loadPresets();
    loadVerbs();
    if (state.session) attach();
    else newSession();
  };
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") refresh();
  });
  window.addEventListener("online", refresh);
  setInterval(watchdog, 5000);
  setInterval(tickCards, 1000);

  // Nothing waits on anything else: the VM controls must come up even when
  // the chat cannot.
  loadVerbs();
  loadPresets();
  whoami();
  if (state.session) attach();
  else newSession();
  if ("serviceWorker" in navigator) navigator.serviceWorker.register("/sw.js").catch(() => {});
}

start();
