// The console in Debian's Chromium, driven by playwright-core, against the
// real binary (target/debug/breakglass) with the fake agent CLI and the real
// forced-command script behind a local ssh stand-in. Phone viewport 390×844.
//
// Run by scripts/test after `cargo test` has built the binary:
//   node --test tests/browser/
//
// The tests are one operator's journey through a single page, in order:
// each builds on the session the earlier ones left.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { createInterface } from "node:readline";
import net from "node:net";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, "../..");
const shots = path.join(repo, "target/browser-screenshots");
const DEADLINE = 30_000;

let server;
let base;
let loginUrl;
let browser;
let context;
let page;
let qmDir;
let proxy;
// The port of the second target's recovery check: nothing listens on it
// until the test says the machine is back.
let checkPort;

/** A TCP proxy in front of the server whose connections the test can cut. */
function startProxy(target) {
  const sockets = new Set();
  const server = net.createServer((client) => {
    const upstream = net.connect(target.port, target.hostname);
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on("close", () => sockets.delete(s));
      s.on("error", () => {});
    }
    client.pipe(upstream);
    upstream.pipe(client);
  });
  return new Promise((resolve) => {
    server.listen(0, "127.0.0.1", () => {
      resolve({
        base: `http://127.0.0.1:${server.address().port}`,
        cut() {
          for (const s of sockets) s.destroy();
        },
        close() {
          this.cut();
          server.close();
        },
      });
    });
  });
}

/** A loopback port nothing listens on (yet). */
function freePort() {
  return new Promise((resolve, reject) => {
    const probe = net.createServer();
    probe.once("error", reject);
    probe.listen(0, "127.0.0.1", () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}

async function startServer() {
  const dir = mkdtempSync(path.join(tmpdir(), "breakglass-browser-"));
  checkPort = await freePort();
  // Two targets through the same host script: the default one, and a
  // second whose recovery is proven by a TCP check.
  const targets = path.join(dir, "targets.toml");
  writeFileSync(
    targets,
    `[[target]]\nname = "vm"\nbackend = "ssh"\nhost = "192.0.2.10"\n\n` +
      `[[target]]\nname = "devvm2"\nbackend = "ssh"\nhost = "192.0.2.11"\ncheck = "tcp:127.0.0.1:${checkPort}"\nrecover_timeout_seconds = 25\n`,
  );
  qmDir = path.join(dir, "qm");
  mkdirSync(qmDir);
  const conf = path.join(dir, "pve.conf");
  writeFileSync(
    conf,
    `VMID=101\nFORENSICS_DIR=${dir}/forensics\nSTOP_TIMEOUT=10\nGUEST_PING_TIMEOUT=1\nPOLL_INTERVAL=0.05\nLOCK_FILE=${dir}/lock\n`,
  );
  const child = spawn(path.join(repo, "target/debug/breakglass"), ["serve", "--listen", "127.0.0.1:0", "--data-dir", path.join(dir, "data")], {
    env: {
      PATH: `${path.join(repo, "tests/fake-bin")}:${process.env.PATH}`,
      HOME: dir,
      RUST_LOG: "info",
      BREAKGLASS_TARGETS_FILE: targets,
      BREAKGLASS_SSH_BIN: path.join(here, "fake-ssh"),
      BREAKGLASS_PVE_CONF: conf,
      FAKE_QM_DIR: qmDir,
      BREAKGLASS_SSE_KEEPALIVE_SECONDS: "2",
    },
    stdio: ["ignore", "pipe", "inherit"],
  });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("breakglass did not start")), DEADLINE);
    const lines = createInterface({ input: child.stdout });
    lines.on("line", (line) => {
      const listening = line.match(/^breakglass listening on (\S+)/);
      if (listening) base = listening[1];
      const login = line.match(/^login: open (\S+)/);
      if (login) {
        loginUrl = login[1];
        clearTimeout(timer);
        resolve(child);
      }
    });
    child.on("exit", (code) => reject(new Error(`breakglass exited ${code}`)));
  });
}

before(async () => {
  mkdirSync(shots, { recursive: true });
  server = await startServer();
  // The browser reaches the server through the proxy, so a test can cut the link.
  proxy = await startProxy(new URL(base));
  loginUrl = loginUrl.replace(base, proxy.base);
  base = proxy.base;
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  context = await browser.newContext({ viewport: { width: 390, height: 844 }, hasTouch: true, isMobile: true, deviceScaleFactor: 2 });
  page = await context.newPage();
});

after(async () => {
  await browser?.close();
  proxy?.close();
  server?.kill("SIGTERM");
});

/** Messages of one role whose text contains `text`. */
const count = (role, text) => page.locator(`.msg.${role}`, { hasText: text }).count();

async function sendPrompt(text) {
  await page.fill("#prompt", text);
  await page.press("#prompt", "Enter");
}

test("the first-run login link signs the browser in and leaves the address bar clean", async () => {
  await page.goto(loginUrl);
  await page.waitForURL(`${base}/`);
  assert.ok(!page.url().includes("token"), page.url());
  const cookies = await context.cookies();
  const cookie = cookies.find((c) => c.name === "breakglass");
  assert.ok(cookie && cookie.httpOnly && cookie.sameSite === "Strict", JSON.stringify(cookies));
  await page.waitForSelector("#lamp[data-state=attached]", { timeout: DEADLINE });
  assert.match(await page.textContent("#who"), /signed in as console/);
});

test("the composer is on screen, 16px, and the page at rest", async () => {
  const box = await page.locator("#prompt").boundingBox();
  assert.ok(box.y >= 0 && box.y + box.height <= 844, JSON.stringify(box));
  assert.equal(await page.$eval("#prompt", (e) => getComputedStyle(e).fontSize), "16px");
  assert.equal(await page.locator("#presets button").count(), 5);
  await page.screenshot({ path: path.join(shots, "1-at-rest.png") });
  // With the on-screen keyboard open (the page resizes to what is left),
  // the composer and Send stay in view.
  await page.setViewportSize({ width: 390, height: 450 });
  await page.focus("#prompt");
  for (const id of ["#prompt", "#send"]) {
    const b = await page.locator(id).boundingBox();
    assert.ok(b.y >= 0 && b.y + b.height <= 450 && b.x + b.width <= 390, `${id} with the keyboard open: ${JSON.stringify(b)}`);
  }
  await page.setViewportSize({ width: 390, height: 844 });
});

test("a preset starts a turn whose text and tool calls stream in", async () => {
  // A double tap sends once.
  await page.dblclick("#presets button:has-text('Triage')");
  // The fake agent replays the `basic` transcript for a prompt that is not a directive.
  await page.waitForSelector(".msg.tool:has-text('ssh devvm')", { timeout: DEADLINE });
  await page.waitForSelector(".msg.result", { timeout: DEADLINE });
  assert.equal(await count("user", "Triage devvm"), 1);
  assert.equal(await count("agent", "Checking load and memory"), 1);
  assert.equal(await page.locator(".msg.error").count(), 0, "no 'a turn is already running'");
  await page.click(".msg.tool summary");
  assert.match(await page.textContent(".msg.tool pre"), /load average/);
});

test("a reload in the middle of a turn shows each message once and keeps streaming", async () => {
  await sendPrompt("say first of three\nsleep 2\nsay second of three\nsleep 1\nsay third of three\nresult");
  await page.waitForSelector(".msg.agent:has-text('first of three')", { timeout: DEADLINE });
  await page.waitForSelector("#lamp[data-state=working]");
  await page.screenshot({ path: path.join(shots, "2-mid-turn.png") });
  // Regression: long tool output widened the page and pushed Send off screen.
  const widths = await page.evaluate(() => [document.documentElement.scrollWidth, window.innerWidth]);
  assert.ok(widths[0] <= widths[1], `no sideways scrolling: ${widths}`);
  await page.reload();
  await page.waitForSelector(".msg.agent:has-text('third of three')", { timeout: DEADLINE });
  for (const n of ["first", "second", "third"]) assert.equal(await count("agent", `${n} of three`), 1, n);
  assert.equal(await count("user", "say first of three"), 1);
});

test("a cut network link resumes with nothing missing or doubled", async () => {
  await sendPrompt("say before the cut\nsleep 2\nsay during the cut\nsleep 2\nsay after the cut\nresult");
  await page.waitForSelector(".msg.agent:has-text('before the cut')", { timeout: DEADLINE });
  proxy.cut(); // every open connection, the attach stream among them
  await page.waitForSelector("#lamp[data-state=down]", { timeout: DEADLINE });
  assert.equal(await page.isVisible("#banner-vm"), true, "the banner points to the VM controls");
  // EventSource reconnects by itself with Last-Event-ID.
  await page.waitForSelector(".msg.agent:has-text('after the cut')", { timeout: DEADLINE });
  for (const what of ["before", "during", "after"]) assert.equal(await count("agent", `${what} the cut`), 1, what);
  await page.waitForSelector("#banner", { state: "hidden" });
});

test("a prompt to a session that has gone is sent to a fresh one, as typed", async () => {
  await page.waitForSelector("#send:not([disabled])");
  const old = await page.evaluate(() => localStorage.getItem("breakglass.session"));
  // The server answers 404 for this one prompt, as if the session had vanished.
  await page.route(`**/api/session/${old}/prompt`, (route) =>
    route.fulfill({ status: 404, contentType: "application/json", body: '{"detail":"session not found"}' }),
  );
  await sendPrompt("say typed before the session vanished\nresult");
  await page.waitForSelector(".msg.agent:has-text('typed before the session vanished')", { timeout: DEADLINE });
  await page.unroute(`**/api/session/${old}/prompt`);
  assert.notEqual(await page.evaluate(() => localStorage.getItem("breakglass.session")), old);
  assert.equal(await page.inputValue("#prompt"), "", "cleared once it was accepted");
  // Back to the session the later tests expect.
  await page.evaluate((id) => localStorage.setItem("breakglass.session", id), old);
  await page.reload();
  await page.waitForSelector(".msg.agent:has-text('after the cut')", { timeout: DEADLINE });
});

test("live text grows delta by delta, then settles into one message that a reload shows once", async () => {
  await page.waitForSelector("#send:not([disabled])");
  const words = "Live text arrives word by word while the model is still writing this very sentence".split(" ");
  const sentence = words.join(" ");
  // How many messages hold the sentence's start, at most, at any moment: a
  // duplicate, even for one frame, shows here.
  await page.evaluate(() => {
    window.mostShown = 0;
    new MutationObserver(() => {
      const n = [...document.querySelectorAll(".msg.agent")].filter((e) => e.textContent.includes("Live text arrives")).length;
      window.mostShown = Math.max(window.mostShown, n);
    }).observe(document.querySelector("#transcript"), { childList: true, subtree: true, characterData: true });
  });
  await sendPrompt(`stream 0.3 ${sentence}\nresult`);
  const growing = page.locator(".msg.agent.live", { hasText: "Live text arrives" });
  await growing.waitFor({ timeout: DEADLINE });
  const early = (await growing.textContent()).length;
  await page.waitForFunction(
    (n) => [...document.querySelectorAll(".msg.agent.live")].some((e) => e.textContent.length > n + 8),
    early,
    { timeout: DEADLINE },
  );
  assert.equal(await growing.getAttribute("aria-busy"), "true");
  await growing.scrollIntoViewIfNeeded();
  await page.screenshot({ path: path.join(shots, "2b-live-text.png") });
  const partial = await growing.textContent();
  assert.ok(!partial.includes(sentence), `caught mid-growth: ${partial}`);
  await page.waitForSelector(`.msg.agent:not(.live):has-text("${sentence}")`, { timeout: DEADLINE });
  await page.waitForSelector(".msg.result:has-text('done')", { timeout: DEADLINE });
  assert.equal(await count("agent", "Live text arrives"), 1);
  assert.equal(await page.locator(".msg.agent.live").count(), 0);
  assert.equal(await page.evaluate(() => window.mostShown), 1, "never two copies, not even for a frame");
  await page.reload();
  await page.waitForSelector(`.msg.agent:has-text("${sentence}")`, { timeout: DEADLINE });
  assert.equal(await count("agent", "Live text arrives"), 1);
  assert.ok(await page.locator(".msg.agent", { hasText: sentence }).getAttribute("data-id"), "the durable, logged message");
});

test("Stop ends a turn", async () => {
  await page.waitForSelector("#send:not([disabled])");
  await sendPrompt("say a long job\nsleep 60");
  await page.waitForSelector("#stop:not([hidden])", { timeout: DEADLINE });
  assert.equal(await page.isDisabled("#prompt"), true, "no second prompt while a turn runs");
  await page.click("#stop");
  await page.waitForSelector(".msg.cancelled", { timeout: DEADLINE });
  await page.waitForSelector("#stop", { state: "hidden" });
  await page.waitForSelector("#send:not([disabled])");
});

/** The session's log, as the server has it (JSON Lines export). */
async function logOf(session) {
  const got = await page.request.get(`${base}/api/session/${session}/export?format=jsonl`);
  assert.equal(got.status(), 200);
  return (await got.text()).split("\n").filter(Boolean).map((line) => JSON.parse(line));
}

/** The pending approval card whose command is `command`. */
const pendingCard = (command) => page.locator(".msg.approval[data-phase=pending]", { has: page.locator(".command", { hasText: command }) });

test("a risky tool call waits for a tap on its card: one allowed, one denied with a message, both logged", async () => {
  await page.waitForSelector("#send:not([disabled])");
  const session = await page.evaluate(() => localStorage.getItem("breakglass.session"));
  const results = await page.locator(".msg.result").count();
  await sendPrompt("hook Bash ssh pve reset\nhook Bash ssh pve stop\nresult");
  const reset = pendingCard("ssh pve reset");
  await reset.waitFor({ timeout: DEADLINE });
  await page.waitForSelector("#lamp[data-state=waiting]");
  assert.equal((await page.textContent("#lamp-text")).trim(), "waiting for you");
  assert.match(await page.title(), /^\(1\) waiting for you/);
  // The card is on screen and said out loud.
  const card = await reset.boundingBox();
  assert.ok(card.y >= 0 && card.y + card.height <= 844, `the card is in view: ${JSON.stringify(card)}`);
  assert.match(await page.textContent("#alert"), /waits for your decision: ssh pve reset/);
  assert.equal(await reset.locator(".command").textContent(), "ssh pve reset", "the exact command");
  assert.equal(await reset.locator(".command").evaluate((e) => getComputedStyle(e).fontFamily.includes("monospace")), true);
  assert.equal(await reset.locator(".explain").textContent(), "Effect: hard reset of the VM: unsaved guest state is lost");
  // The countdown runs.
  const first = await reset.locator(".countdown").textContent();
  assert.match(first, /^auto-deny in \d+:\d\d$/);
  await page.waitForFunction(
    (was) => document.querySelector(".msg.approval[data-phase=pending] .countdown")?.textContent !== was,
    first,
    { timeout: 5000 },
  );
  // Two big targets, far apart, that do not look alike.
  const deny = await reset.locator("button.deny").boundingBox();
  const allow = await reset.locator("button.allow").boundingBox();
  assert.ok(deny.height >= 48 && allow.height >= 48, `48 px tall: ${deny.height}, ${allow.height}`);
  assert.ok(allow.x - (deny.x + deny.width) >= 48, `far apart: ${JSON.stringify([deny, allow])}`);
  const colours = async (button) => reset.locator(button).evaluate((e) => getComputedStyle(e).backgroundColor);
  assert.notEqual(await colours("button.deny"), await colours("button.allow"));
  assert.deepEqual(await axeViolations(), [], "a pending approval card");
  await page.screenshot({ path: path.join(shots, "4-approval.png") });
  // The session list counts the calls that wait.
  await page.click("#open-sessions");
  await page.waitForSelector("#session-list .open");
  assert.deepEqual(await page.locator("#session-list .badge").allTextContents(), ["1 waiting for you"]);
  await page.click("[data-close=sessions-sheet]");

  // A reload replays the card from the log: still pending, still counting.
  await page.reload();
  await reset.waitFor({ timeout: DEADLINE });
  assert.match(await reset.locator(".countdown").textContent(), /^auto-deny in \d+:\d\d$/);
  await page.waitForSelector("#lamp[data-state=waiting]");

  await reset.locator("button.allow").tap();
  const allowed = page.locator(".msg.approval[data-phase=resolved]", { has: page.locator(".command", { hasText: "ssh pve reset" }) });
  await allowed.waitFor({ timeout: DEADLINE });
  assert.match(await allowed.locator(".card-status").textContent(), /^Allowed by console at \d\d:\d\d$/);
  assert.equal(await allowed.locator("button").count(), 0, "no buttons once decided");

  const stop = pendingCard("ssh pve stop");
  await stop.waitFor({ timeout: DEADLINE });
  await stop.locator(".deny-message").fill("not during office hours");
  await stop.locator("button.deny").tap();
  const denied = page.locator(".msg.approval[data-phase=resolved]", { has: page.locator(".command", { hasText: "ssh pve stop" }) });
  await denied.waitFor({ timeout: DEADLINE });
  assert.match(await denied.locator(".card-status").textContent(), /^Denied by console at \d\d:\d\d: “not during office hours”$/);
  // The turn goes on to its end.
  await page.waitForFunction((n) => document.querySelectorAll(".msg.result").length > n, results, { timeout: DEADLINE });
  await page.waitForSelector("#lamp[data-state=attached]");
  assert.equal(await page.title(), "breakglass");

  // The server got both decisions, from this operator.
  const log = await logOf(session);
  const asked = (command) => log.find((e) => e.kind === "approval" && e.input?.command === command);
  const decided = (command) => log.filter((e) => e.kind === "approval_decision" && e.tool_use_id === asked(command).tool_use_id);
  assert.deepEqual(
    decided("ssh pve reset").map(({ decision, by }) => ({ decision, by })),
    [{ decision: "allow", by: "console" }],
  );
  assert.deepEqual(
    decided("ssh pve stop").map(({ decision, by, message }) => ({ decision, by, message })),
    [{ decision: "deny", by: "console", message: "not during office hours" }],
  );

  // After a reload both cards show their decisions, and nothing waits.
  await page.reload();
  await page.waitForSelector("#lamp[data-state=attached]", { timeout: DEADLINE });
  await page.waitForFunction(() => document.querySelectorAll(".msg.approval[data-phase=resolved]").length === 2, null, { timeout: DEADLINE });
  assert.equal(await page.locator(".msg.approval button").count(), 0);
  await page.waitForSelector("#lamp[data-state=attached]");
});

test("a command with invisible characters or many lines says so on its card and shows nothing of it raw", async () => {
  await page.waitForSelector("#send:not([disabled])");
  // JSON escapes in the prompt: the fake agent's tool input holds the real
  // characters (U+202E reverses what follows it, U+200B is not drawn).
  const steps = Array.from({ length: 30 }, (_, i) => `echo step ${i}`).join("\\n");
  await sendPrompt(`hook Bash {"command": "${steps}\\necho safe \\u202e/ fr- mr\\u200b", "description": "x"}\nresult`);
  const card = pendingCard("echo step 0");
  await card.waitFor({ timeout: DEADLINE });
  const raw = /[\u202a-\u202e\u2066-\u2069\u200b-\u200f\u2060\ufeff]/;
  const shown = await card.locator(".command").textContent();
  assert.ok(!raw.test(shown), `nothing raw on the card: ${JSON.stringify(shown.slice(-40))}`);
  assert.ok(shown.endsWith("echo safe ⟨U+202E⟩/ fr- mr⟨U+200B⟩"), shown.slice(-40));
  assert.deepEqual(await card.locator(".command mark.hidden-char").allTextContents(), ["⟨U+202E⟩", "⟨U+200B⟩"]);
  assert.equal(await card.locator(".command-warning").textContent(), "This command contains invisible characters (2), shown as ⟨U+…⟩.");
  // The command is taller than its box: the card says so above it, and the box scrolls.
  assert.equal(await card.locator(".command-extent").textContent(), "31 lines: scroll the command to read all of it");
  assert.ok(await card.locator(".command").evaluate((e) => e.scrollHeight > e.clientHeight), "the box scrolls");
  // The call above the card hides nothing either, and the alert warns first.
  const call = page.locator(".msg.tool", { hasText: "echo step 0" }).last();
  assert.ok(!raw.test(await call.locator("summary code").textContent()));
  assert.equal(await call.locator("summary mark.hidden-char").count(), 2);
  assert.match(await page.textContent("#alert"), /^This command contains invisible characters \(2\), shown as ⟨U\+…⟩\. The agent waits for your decision: echo step 0[^]*31 lines\./);
  assert.deepEqual(await axeViolations(), [], "a card with invisible characters and a long command");
  await card.scrollIntoViewIfNeeded();
  await page.screenshot({ path: path.join(shots, "4b-approval-hidden-characters.png") });
  await card.locator("button.deny").tap();
  await page.waitForSelector(".msg.approval[data-phase=resolved] .command-warning:not([hidden])", { timeout: DEADLINE });
  await page.waitForSelector("#send:not([disabled])", { timeout: DEADLINE });
});

test("a call asked again under its tool_use_id gets a card of its own, decided on its own", async () => {
  await page.waitForSelector("#send:not([disabled])");
  const session = await page.evaluate(() => localStorage.getItem("breakglass.session"));
  await sendPrompt("hook Bash ssh devvm systemctl restart nginx\nhook-again Bash ssh devvm systemctl restart nginx\nresult");
  const cards = page.locator(".msg.approval", { has: page.locator(".command", { hasText: "systemctl restart nginx" }) });
  await pendingCard("systemctl restart nginx").waitFor({ timeout: DEADLINE });
  await pendingCard("systemctl restart nginx").locator("button.deny").tap();
  // The second ask waits with its buttons live, whatever this page did with the first.
  await page.waitForFunction(() => document.querySelectorAll(".msg.approval[data-phase=pending]").length === 1 && document.querySelectorAll(".msg.approval").length >= 2, null, { timeout: DEADLINE });
  assert.equal(await cards.count(), 2);
  const again = cards.nth(1);
  assert.equal(await again.getAttribute("data-phase"), "pending");
  assert.equal(await again.locator("button.allow").isEnabled(), true);
  await again.locator("button.allow").tap();
  await page.waitForFunction(() => document.querySelectorAll(".msg.approval:not([data-phase=resolved])").length === 0, null, { timeout: DEADLINE });
  const statuses = async () => Promise.all([0, 1].map((i) => cards.nth(i).locator(".card-status").textContent()));
  const check = (got) => {
    assert.match(got[0], /^Denied by console at \d\d:\d\d$/, "the first card keeps its deny");
    assert.match(got[1], /^Allowed by console at \d\d:\d\d$/);
  };
  check(await statuses());
  const log = await logOf(session);
  const ids = log.filter((e) => e.kind === "approval" && e.input?.command === "ssh devvm systemctl restart nginx").map((e) => e.tool_use_id);
  assert.equal(ids.length, 2);
  assert.equal(ids[0], ids[1], "one tool_use_id, asked twice");
  // A reload replays both pairs the same way.
  await page.waitForSelector("#send:not([disabled])", { timeout: DEADLINE });
  await page.reload();
  await page.waitForFunction(() => document.querySelectorAll(".msg.approval[data-phase=resolved]").length >= 5, null, { timeout: DEADLINE });
  check(await statuses());
});

test("a mutating verb needs its confirm and shows its steps", async () => {
  await page.click("#open-vm");
  await page.waitForSelector("#vm-sheet:not([hidden])");
  await page.waitForFunction(() => document.querySelectorAll("#target option").length === 2, null, { timeout: DEADLINE });
  assert.equal(await page.inputValue("#target"), "vm", "the first target is the default");
  const labels = await page.locator("#verbs button").allTextContents();
  assert.deepEqual(labels.slice(0, 3), ["forensics", "status", "cycle"], "read-only verbs first, then cycle");
  await page.click("#verbs button[data-verb=cycle]");
  await page.waitForSelector("#confirm:not([hidden])");
  assert.match(await page.textContent("#confirm-text"), /Run cycle on vm\?/);
  assert.equal(readFileSync(path.join(qmDir, "calls"), { encoding: "utf8", flag: "a+" }).includes("qm stop"), false, "nothing ran before the confirm");
  await page.screenshot({ path: path.join(shots, "3-vm-sheet.png") });
  await page.click("#confirm-run");
  await page.waitForSelector("#verb-output[data-state=succeeded]", { timeout: DEADLINE });
  const steps = await page.textContent("#verb-output");
  assert.match(steps, /cycle on vm:/);
  assert.match(steps, /forensics saved/);
  assert.match(steps, /running/);
  assert.match(steps, /✓ succeeded · back after \d+ s/);
  const calls = readFileSync(path.join(qmDir, "calls"), "utf8");
  assert.ok(calls.indexOf("qm config 101") < calls.indexOf("qm stop 101"), "forensics before the stop");
  const box = await page.locator("#verb-output").boundingBox();
  assert.ok(box.height <= 844 * 0.46 + 1, `output capped in height: ${box.height}`);
});

test("a cycle on a second target is watched step by step until it is reachable again", async () => {
  await page.waitForSelector("#vm-sheet:not([hidden])");
  await page.selectOption("#target", "devvm2");
  await page.click("#verbs button[data-verb=cycle]");
  assert.match(await page.textContent("#confirm-text"), /Run cycle on devvm2\?/);
  await page.click("#confirm-run");
  // The machine is running but its check does not pass yet: the steps say
  // what is awaited, and the verbs stay locked while it runs.
  await page.waitForSelector(`#verb-output:has-text('waiting for')`, { timeout: DEADLINE });
  assert.equal(await page.getAttribute("#verb-output", "data-state"), "running");
  assert.equal(await page.locator("#verbs button[data-verb=cycle]").isDisabled(), true, "no second verb while one runs");
  const listener = net.createServer((socket) => socket.end());
  await new Promise((resolve) => listener.listen(checkPort, "127.0.0.1", resolve));
  try {
    await page.waitForSelector("#verb-output[data-state=succeeded]", { timeout: DEADLINE });
  } finally {
    listener.close();
  }
  const steps = await page.textContent("#verb-output");
  assert.match(steps, /cycle on devvm2:/);
  assert.match(steps, /reachable again after [\d.]+ s/);
  assert.match(steps, /✓ succeeded · back after \d+ s/);
  await page.screenshot({ path: path.join(shots, "4-operation.png") });
  // The choice is remembered on this device.
  await page.reload();
  await page.click("#open-vm");
  await page.waitForFunction(() => document.querySelectorAll("#target option").length === 2, null, { timeout: DEADLINE });
  assert.equal(await page.inputValue("#target"), "devvm2");
});

/** Runs every axe rule, the experimental ones too, and returns the serious or critical violations. */
async function axeViolations() {
  await page.evaluate(readFileSync(path.join(here, "node_modules/axe-core/axe.min.js"), "utf8"));
  // Evaluated through the DevTools protocol, so the page's CSP need not allow it.
  const { ran, violations } = await page.evaluate(async () => {
    const rules = Object.fromEntries(globalThis.axe.getRules().map((r) => [r.ruleId, { enabled: true }]));
    const r = await globalThis.axe.run(document, { rules });
    const ran = [...r.passes, ...r.violations, ...r.incomplete, ...r.inapplicable].map((v) => v.id);
    const violations = r.violations.map((v) => ({ id: v.id, impact: v.impact, nodes: v.nodes.map((n) => n.target.join(" ")) }));
    return { ran, violations };
  });
  assert.ok(ran.includes("scrollable-region-focusable") && ran.length > 90, `the full rule set ran: ${ran.length}`);
  return violations.filter((v) => v.impact === "serious" || v.impact === "critical");
}

test("axe's full rule set finds no serious or critical accessibility violations", async () => {
  const incident = await page.evaluate(() => localStorage.getItem("breakglass.session"));
  for (const state of ["vm sheet open", "at rest", "sessions open"]) {
    if (state === "at rest") await page.click("[data-close=vm-sheet]");
    if (state === "sessions open") {
      await page.click("#open-sessions");
      await page.waitForSelector("#session-list .open");
    }
    assert.deepEqual(await axeViolations(), [], `${state}: the incident's transcript`);
  }
  await page.click("[data-close=sessions-sheet]");
  // A transcript of words alone (nothing in it to focus) that scrolls: it
  // must still be reachable by keyboard.
  await page.click("#new-session");
  await page.waitForFunction((old) => localStorage.getItem("breakglass.session") !== old, incident);
  await page.waitForSelector("#lamp[data-state=attached]");
  const lines = Array.from({ length: 30 }, (_, i) => `say line ${i} of a long answer with nothing to click in it`);
  await sendPrompt(`${lines.join("\n")}\nresult`);
  await page.waitForSelector(".msg.result", { timeout: DEADLINE });
  await page.waitForSelector("#send:not([disabled])");
  const scrolls = await page.$eval("#transcript", (e) => e.scrollHeight > e.clientHeight);
  assert.ok(scrolls, "the transcript overflows");
  assert.deepEqual(await axeViolations(), [], "at rest, words only");
  await page.click("#open-vm");
  await page.waitForSelector("#vm-sheet:not([hidden])");
  assert.deepEqual(await axeViolations(), [], "vm sheet open, words only");
  await page.click("[data-close=vm-sheet]");
  // The keyboard reaches the transcript and scrolls it.
  await page.focus("#transcript");
  const top = await page.$eval("#transcript", (e) => e.scrollTop);
  await page.keyboard.press("Home");
  await page.waitForFunction((t) => document.querySelector("#transcript").scrollTop < t, top);
  // Back to the incident the later tests expect.
  await page.evaluate((id) => localStorage.setItem("breakglass.session", id), incident);
  await page.reload();
  await page.waitForSelector(".msg.agent:has-text('after the cut')", { timeout: DEADLINE });
});

test("New starts a fresh session and the list reopens an earlier incident", async () => {
  const before = await page.evaluate(() => localStorage.getItem("breakglass.session"));
  await page.click("#new-session");
  await page.waitForFunction((old) => localStorage.getItem("breakglass.session") !== old, before);
  await page.waitForSelector("#lamp[data-state=attached]");
  assert.equal(await page.locator(".msg").count(), 0, "a fresh transcript");
  await page.click("#open-sessions");
  const earlier = page.locator("#session-list .open", { hasText: "Triage devvm" });
  await earlier.waitFor({ timeout: DEADLINE });
  const exportLink = page.locator("#session-list li", { hasText: "Triage devvm" }).locator("a");
  assert.equal(await exportLink.getAttribute("href"), `/api/session/${before}/export?format=md`);
  await earlier.click();
  await page.waitForSelector(".msg.agent:has-text('third of three')", { timeout: DEADLINE });
  assert.equal(await page.evaluate(() => localStorage.getItem("breakglass.session")), before);
  assert.equal(await count("agent", "first of three"), 1);
});

test("a session that is gone is replaced by a fresh one", async () => {
  await page.evaluate(() => localStorage.setItem("breakglass.session", "00000000-0000-0000-0000-000000000000"));
  await page.reload();
  await page.waitForFunction(() => localStorage.getItem("breakglass.session") !== "00000000-0000-0000-0000-000000000000", null, { timeout: DEADLINE });
  await page.waitForSelector("#lamp[data-state=attached]", { timeout: DEADLINE });
  await sendPrompt("say still working after the reset");
  await page.waitForSelector(".msg.agent:has-text('still working after the reset')", { timeout: DEADLINE });
});
