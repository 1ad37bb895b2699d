// The demo chat: a demo token from POST /auth/demo (renewed before it expires), a model picker from the
// live pool (GET /v1/models), answers streamed token by token (POST /v1/chat/completions, stream: true),
// Stop aborts the fetch (the gateway then cancels the generation on the provider), and thumbs up/down
// rate an answer (POST /v1/feedback). Model output is text: it never becomes markup.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const notice = $("demo-notice"), picker = $("demo-model"), log = $("demo-log");
  const form = $("demo-form"), prompt = $("demo-prompt"), send = $("demo-send"), stop = $("demo-stop");
  let token = null, renewTimer = null, controller = null, renewed = false;
  const history = [];

  // What a buyer should read for each error code the demo can meet.
  const MESSAGES = {
    quota_exhausted: "This demo token has used up its quota. Sign up with GitHub for an API key with a bigger one.",
    coordinator_unavailable: "No provider is serving this model right now: the pool is people's Macs, and they come " +
      "and go. Try again in a minute or pick another model.",
    rate_limited: "Too many demo tokens were asked for from your address. Try again later, or sign up with GitHub.",
    invalid_demo_token: "Your demo token expired. A new one was fetched: send your message again.",
    provider_error: "The provider failed while answering. Try again.",
    request_timeout: "The answer took too long and was stopped.",
  };

  function say(text, isError) {
    notice.textContent = text;
    notice.className = isError ? "notice error" : "notice";
  }

  async function errorOf(response) {
    try {
      const body = await response.json();
      if (body && body.error) return { code: body.error.code, message: body.error.message, status: response.status };
    } catch (e) { /* not JSON */ }
    return { code: null, message: `HTTP ${response.status}`, status: response.status };
  }

  function explain(err) {
    return MESSAGES[err.code] || err.message || "Something went wrong.";
  }

  async function getToken() {
    // Sent with the token it holds, a renewal keeps the same quotas and costs no new-token allowance.
    const headers = token ? { Authorization: "Bearer " + token } : {};
    const r = await fetch("/auth/demo", { method: "POST", credentials: "omit", cache: "no-store", headers });
    if (!r.ok) {
      const err = await errorOf(r);
      token = null;
      say(explain(err), true);
      return false;
    }
    const body = await r.json();
    token = body.token;
    clearTimeout(renewTimer);
    // Renewed at four fifths of its life, so a conversation never meets an expired token.
    renewTimer = setTimeout(getToken, Math.max(1, body.expires_in * 800));
    return true;
  }

  function authed(init) {
    return { ...init, credentials: "omit", cache: "no-store",
      headers: { ...(init && init.headers), Authorization: "Bearer " + token } };
  }

  async function loadModels() {
    if (!token) return;
    const r = await fetch("/v1/models", authed({}));
    if (!r.ok) { say(explain(await errorOf(r)), true); return; }
    const ids = (await r.json()).data.map((m) => m.id);
    const chosen = picker.value;
    picker.replaceChildren();
    for (const id of ids) {
      const o = document.createElement("option");
      o.value = id; o.textContent = id;
      picker.appendChild(o);
    }
    if (ids.includes(chosen)) picker.value = chosen;
    picker.disabled = ids.length === 0;
    send.disabled = ids.length === 0 || controller !== null;
    if (!ids.length) {
      const o = document.createElement("option");
      o.value = ""; o.textContent = "no model is served right now";
      picker.appendChild(o);
      say(MESSAGES.coordinator_unavailable, true);
    } else if (!notice.classList.contains("error")) {
      say("Ready. Your demo token is renewed automatically.", false);
    }
  }

  function entry(role, text) {
    const li = document.createElement("li");
    li.className = role;
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    li.appendChild(body);
    log.appendChild(li);
    return li;
  }

  function meta(li, text) {
    let m = li.querySelector(".meta");
    if (!m) { m = document.createElement("span"); m.className = "meta"; li.appendChild(m); }
    m.textContent = text;
  }

  function rating(li, requestId) {
    const box = document.createElement("div");
    box.className = "rate";
    const status = document.createElement("span");
    status.className = "rate-status";
    status.setAttribute("role", "status");
    // Thumbs up is a 5, thumbs down a 1 (feedback's scale); words, not emoji, which not every system can draw.
    for (const [label, value] of [["Good answer", 5], ["Bad answer", 1]]) {
      const b = document.createElement("button");
      b.type = "button"; b.className = "secondary"; b.textContent = label;
      b.setAttribute("aria-pressed", "false");
      b.dataset.rating = String(value);
      b.addEventListener("click", async () => {
        const r = await fetch("/v1/feedback", authed({ method: "POST",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ request_id: requestId, rating: value }) }));
        if (r.ok) {
          box.querySelectorAll("button").forEach((x) => x.setAttribute("aria-pressed", String(x === b)));
          status.textContent = "Thanks: your rating was recorded.";
        } else {
          status.textContent = explain(await errorOf(r));
        }
      });
      box.appendChild(b);
    }
    box.appendChild(status);
    li.appendChild(box);
  }

  // Reads a server-sent-event body; calls onEvent with each `data:` payload (a string).
  async function readEvents(response, onEvent) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (line.startsWith("data: ")) onEvent(line.slice(6));
        }
      }
    }
  }

  async function ask(retried) {
    const model = picker.value;
    const r = await fetch("/v1/chat/completions", authed({
      method: "POST", signal: controller.signal,
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model, messages: history, stream: true, max_tokens: 512 }),
    }));
    if (r.status === 401 && !retried) {
      const err = await errorOf(r);
      // Expired (a laptop that slept through the renewal): a new token, and the same question again.
      if (err.code === "invalid_demo_token" && await getToken()) {
        const again = await ask(true);
        say("Your demo token had expired: a new one was fetched and your message sent again.", false);
        renewed = true;
        return again;
      }
      throw err;
    }
    if (!r.ok) throw await errorOf(r);
    return r;
  }

  async function chat(text) {
    history.push({ role: "user", content: text });
    entry("user", text);
    const li = entry("assistant", "");
    li.dataset.state = "streaming";
    const body = li.querySelector(".text");
    let requestId = null, answer = "", tokens = 0, failed = null;
    controller = new AbortController();
    renewed = false;
    send.disabled = true; stop.disabled = false;
    say("Answering…", false);
    try {
      const r = await ask(false);
      requestId = r.headers.get("x-request-id");
      await readEvents(r, (data) => {
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) { failed = chunk.error; return; }
        if (chunk.id) requestId = chunk.id;
        for (const choice of chunk.choices || []) {
          const piece = choice.delta && choice.delta.content;
          if (piece) {
            answer += piece; tokens += 1;
            body.appendChild(document.createTextNode(piece));
            li.dataset.chunks = String(tokens);
          }
        }
      });
      if (failed) throw failed;
      li.dataset.state = "done";
      meta(li, `${tokens} chunks`);
      if (!renewed) say("Done.", false);
    } catch (e) {
      if (e && e.name === "AbortError") {
        li.dataset.state = "stopped";
        meta(li, `Stopped after ${tokens} chunks: the provider was told to stop generating.`);
        if (!renewed) say("Stopped.", false);
      } else {
        li.dataset.state = "failed";
        const message = e && e.code !== undefined ? explain(e) : "The connection failed: " + (e && e.message);
        meta(li, message);
        say(message, true);
        if (e && e.code === "coordinator_unavailable") loadModels();
      }
    } finally {
      controller = null;
      stop.disabled = true;
      send.disabled = picker.disabled;
    }
    if (answer) history.push({ role: "assistant", content: answer });
    if (requestId && (answer || li.dataset.state === "stopped")) {
      li.dataset.requestId = requestId;
      rating(li, requestId);
    }
  }

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = prompt.value.trim();
    if (!text || controller || !token) return;
    prompt.value = "";
    chat(text);
  });
  // Enter sends, Shift+Enter is a new line.
  prompt.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); form.requestSubmit(); }
  });
  stop.addEventListener("click", () => { if (controller) controller.abort(); });

  (async () => {
    if (await getToken()) await loadModels();
    setInterval(loadModels, 10000);
  })();
})();
