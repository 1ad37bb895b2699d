// Keeps the pool summary (#pool) up to date from GET /v1/status, without a reload.
// Every value comes from providers (model ids are theirs): it goes in as text, never as markup.
"use strict";
(function () {
  const root = document.getElementById("pool");
  if (!root) return;
  const url = root.dataset.statusUrl || "/v1/status";
  const every = Number(root.dataset.pollMs || 2000);
  const $ = (id) => document.getElementById(id);

  function text(parent, tag, value) {
    const el = document.createElement(tag);
    el.textContent = String(value);
    parent.appendChild(el);
    return el;
  }

  function render(s) {
    const state = $("pool-state");
    state.textContent = s.status;
    state.className = "badge " + (s.status === "available" ? "available" : "unavailable");
    const c = s.capacity;
    $("pool-summary").textContent =
      `${c.providers} provider${c.providers === 1 ? "" : "s"} · ${c.slots_free}/${c.slots} slots free · ` +
      `${c.decode_tokens_per_s} tokens/s`;
    const names = $("pool-model-names");
    if (names) {
      names.replaceChildren();
      s.models.forEach((m, i) => {
        if (i) names.append(", ");
        text(names, "code", m.id);
      });
      if (!s.models.length) names.textContent = "none right now";
    }
    const table = document.querySelector("#pool-models tbody");
    if (table) {
      table.replaceChildren();
      for (const m of s.models) {
        const tr = document.createElement("tr");
        text(text(tr, "td", ""), "code", m.id);
        text(tr, "td", m.providers);
        text(tr, "td", `${m.slots_free}/${m.slots}`);
        text(tr, "td", m.queue_depth);
        table.appendChild(tr);
      }
      if (!s.models.length) {
        const td = text(document.createElement("tr"), "td", "No model is served right now: no provider is connected.");
        td.colSpan = 4;
        table.appendChild(td.parentNode);
      }
    }
    $("pool-updated").textContent = "Live: updated " + new Date().toLocaleTimeString() + ".";
  }

  async function poll() {
    // A tab in the background asks nothing; it catches up when shown again.
    if (document.hidden) {
      document.addEventListener("visibilitychange", poll, { once: true });
      return;
    }
    try {
      const r = await fetch(url, { cache: "no-store", credentials: "omit" });
      if (r.ok) render(await r.json());
      else $("pool-updated").textContent = `Status unavailable (HTTP ${r.status}); retrying.`;
    } catch (e) {
      $("pool-updated").textContent = "Status unreachable; retrying.";
    }
    setTimeout(poll, every);
  }
  setTimeout(poll, every);
})();
