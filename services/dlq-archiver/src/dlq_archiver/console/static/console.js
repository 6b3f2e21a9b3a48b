// The dead-letter console: views over the archiver's JSON API, in the URL's fragment.
//
// Safe by construction: every value from the API is put in the page as text (textContent),
// never as HTML, so a dead letter's body or reason cannot run script here. The admin token
// lives in this tab's sessionStorage and travels only as an Authorization header.
"use strict";

(() => {
  const TOKEN_KEY = "courier-dlq-admin-token";
  const GROUPS_REFRESH_MS = 5000;
  const JOB_REFRESH_MS = 1000;
  const view = document.getElementById("view");
  const message = document.getElementById("message");
  let timer = null; // the current view's refresh, cleared on every route change
  let route = 0; // bumped on every route change: a late answer of an old view is dropped

  // --- DOM helpers --------------------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else if (name === "text") el.textContent = value;
      else el.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  function show(...nodes) {
    view.replaceChildren(...nodes.filter((node) => node !== null && node !== undefined));
  }

  // A JSON body is shown indented; anything else as it is.
  function pretty(text) {
    try {
      return JSON.stringify(JSON.parse(text), null, 2);
    } catch (_) {
      return text;
    }
  }

  function when(iso) {
    if (!iso) return "—";
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return String(iso);
    return date.toISOString().replace("T", " ").slice(0, 19) + " UTC";
  }

  function table(headers, rows, empty) {
    if (!rows.length) return h("p", { class: "muted", text: empty });
    return h(
      "table",
      {},
      h("thead", {}, h("tr", {}, headers.map((name) => h("th", { text: name })))),
      h("tbody", {}, rows),
    );
  }

  function field(label, value) {
    return [h("dt", { text: label }), h("dd", {}, value === null || value === undefined ? "—" : value)];
  }

  function link(hash, text) {
    return h("a", { href: hash, text });
  }

  function query(params) {
    const out = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== "") out.set(k, v);
    return out.toString();
  }

  // --- token and API ------------------------------------------------------------------------

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function renderToken() {
    const has = Boolean(token());
    document.getElementById("token-state").textContent = has ? "Admin token set for this tab" : "No admin token";
    document.getElementById("token-state").className = has ? "token-state ok" : "token-state";
    document.getElementById("token-input").hidden = has;
    document.getElementById("token-use").hidden = has;
    document.getElementById("token-forget").hidden = !has;
  }

  function say(text, kind) {
    message.textContent = text;
    message.className = "message " + (kind || "error");
    message.hidden = !text;
  }

  class ApiError extends Error {
    constructor(status, problem) {
      const title = (problem && problem.title) || "Request failed";
      const detail = problem && problem.detail ? ": " + problem.detail : "";
      super(status + " " + title + detail);
      this.status = status;
    }
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (token()) headers.Authorization = "Bearer " + token();
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit",
      cache: "no-store",
    });
    let data = null;
    if (response.status !== 204) {
      try {
        data = await response.json();
      } catch (_) {
        data = null;
      }
    }
    if (!response.ok) throw new ApiError(response.status, data);
    return data;
  }

  // Run an action; its refusal (401 without the token, 403 with a wrong one) is shown.
  async function act(run) {
    try {
      say("");
      return await run();
    } catch (error) {
      say(error.message);
      return undefined;
    }
  }

  // --- views --------------------------------------------------------------------------------

  async function groupsView(current) {
    const [groups, jobs] = await Promise.all([
      api("GET", "/v1/dead-letters/groups"),
      api("GET", "/v1/replays?limit=5"),
    ]);
    if (current !== route) return;
    const rows = groups.map((g) =>
      h(
        "tr",
        { "data-fingerprint": g.fingerprint },
        h("td", {}, link("#/dead-letters?" + query({ fingerprint: g.fingerprint }), g.fingerprint)),
        h("td", { class: "nowrap", text: g.source_queue || "—" }),
        h("td", { class: "nowrap", text: g.event_type || "—" }),
        h("td", { class: "num", text: g.count }),
        h("td", { class: "nowrap", text: when(g.first_seen) }),
        h("td", { class: "nowrap", text: when(g.last_seen) }),
        h("td", { class: "reason", title: g.exception, text: (g.exception ? g.exception.split(".").pop() + ": " : "") + (g.reason || "") }),
        h("td", {}, link("#/replay?" + query({ fingerprint: g.fingerprint, count: g.count }), "Replay…")),
      ),
    );
    show(
      h("h1", { text: "Failure groups" }),
      h("p", { class: "muted", text: "Most recent failure first · refreshes every 5 s · updated " + when(new Date().toISOString()) }),
      table(
        ["Fingerprint", "Source queue", "Event type", "Count", "First seen", "Last seen", "Sample reason", ""],
        rows,
        "No dead letters: nothing has failed for good.",
      ),
      h("h2", { text: "Latest replay jobs" }),
      jobsTable(jobs),
    );
    timer = setTimeout(() => render(), GROUPS_REFRESH_MS);
  }

  function jobsTable(jobs) {
    return table(
      ["Job", "Status", "Filter", "Replayed", "Failed again", "New failures", "Started"],
      jobs.map((j) =>
        h(
          "tr",
          {},
          h("td", {}, link("#/job/" + j.id, j.id)),
          h("td", {}, badge(j.status)),
          h("td", { text: filterText(j.filter) }),
          h("td", { class: "num", text: j.replayed + " / " + j.total }),
          h("td", { class: "num", text: j.failed_again }),
          h("td", { class: j.new_failures ? "num warn-text" : "num", text: j.new_failures }),
          h("td", { class: "nowrap", text: when(j.created_at) }),
        ),
      ),
      "No replay jobs yet.",
    );
  }

  function filterText(filter) {
    const parts = Object.entries(filter || {}).filter(([k]) => k !== "status");
    return parts.map(([k, v]) => k + "=" + v).join(" ") || "—";
  }

  function badge(status) {
    return h("span", { class: "badge " + status, text: status });
  }

  const FILTERS = [
    ["queue", "Source queue"],
    ["event_type", "Event type"],
    ["fingerprint", "Fingerprint"],
    ["since", "Since (ISO 8601)"],
    ["until", "Until (ISO 8601)"],
  ];

  async function listView(current, params) {
    const filters = {};
    for (const [name] of FILTERS) filters[name] = params.get(name) || "";
    filters.status = params.get("status") || "";
    const limit = params.get("limit") || "50";
    const page = await api("GET", "/v1/dead-letters?" + query({ ...filters, cursor: params.get("cursor"), limit }));
    if (current !== route) return;
    const form = h(
      "form",
      { class: "filters", onsubmit: (e) => { e.preventDefault(); location.hash = "#/dead-letters?" + query(Object.fromEntries(new FormData(form))); } },
      FILTERS.map(([name, label]) => h("label", {}, label, h("input", { name, value: filters[name] }))),
      h(
        "label",
        {},
        "Status",
        h(
          "select",
          { name: "status" },
          ["", "dead", "replayed", "replay-failed"].map((s) => h("option", { value: s, selected: s === filters.status, text: s || "any" })),
        ),
      ),
      h("button", { type: "submit", text: "Filter" }),
    );
    const rows = page.items.map((r) =>
      h(
        "tr",
        {},
        h("td", {}, link("#/dead-letter/" + r.id, r.id)),
        h("td", { class: "nowrap", text: when(r.archived_at) }),
        h("td", {}, badge(r.status)),
        h("td", { class: "nowrap", text: r.source_queue }),
        h("td", { class: "nowrap", text: r.event_type || "—" }),
        h("td", { class: "num", text: r.attempts }),
        h("td", { class: "reason", text: r.reason }),
      ),
    );
    const active = query(filters);
    show(
      h("h1", { text: "Dead letters" }),
      form,
      h(
        "p",
        { class: "actions" },
        params.get("cursor") ? link("#/dead-letters?" + query({ ...filters, limit: params.get("limit") }), "« First page") : null,
        page.next_cursor ? link("#/dead-letters?" + query({ ...filters, cursor: page.next_cursor, limit: params.get("limit") }), "Next page »") : null,
        active ? link("#/replay?" + query({ ...filters, status: null }), "Replay these as a job…") : null,
        active ? link("#/purge?" + active, "Purge these…") : null,
      ),
      table(["Id", "Archived", "Status", "Source queue", "Event type", "Attempts", "Reason (masked)"], rows, "No dead letter matches."),
    );
  }

  function renderRecord(record, revealed) {
    const replays = (record.replays || []).map((r) =>
      h("tr", {}, h("td", { text: r.replay_id }), h("td", { text: when(r.at) }), h("td", {}, r.job_id ? link("#/job/" + r.job_id, r.job_id) : "single")),
    );
    const failures = (record.replay_failures || []).map((id) => h("li", {}, link("#/dead-letter/" + id, id)));
    const body = record.body !== null && record.body !== undefined ? pretty(record.body) : "(binary, " + record.body_size + " bytes, base64) " + record.body_b64;
    return [
      h("h1", { text: "Dead letter " + record.id }),
      revealed
        ? h("p", { class: "message warn", text: "Revealed: personal data in clear. This view was written to the audit log." })
        : h("p", { class: "muted", text: "Emails and phone numbers are masked. Reveal shows them and is audited." }),
      h(
        "div",
        { class: "actions" },
        h("button", { id: "replay-one", onclick: () => replayOne(record) }, "Replay"),
        revealed ? h("button", { class: "quiet", onclick: () => render() }, "Mask again") : h("button", { id: "reveal", class: "quiet", onclick: () => reveal(record.id) }, "Reveal…"),
        h("button", { id: "delete-one", class: "danger", onclick: () => deleteOne(record.id) }, "Delete…"),
      ),
      h(
        "section",
        { class: "cards" },
        h("div", { class: "card" }, h("h2", { text: "Diagnosis" }), h("dl", {}, field("Status", badge(record.status)), field("Class", record.reason_class), field("Reason", record.reason), field("Exception", record.exception), field("Attempts", String(record.attempts)), field("First failed", when(record.first_failed_at)), field("Last failed", when(record.last_failed_at)))),
        h("div", { class: "card" }, h("h2", { text: "Route" }), h("dl", {}, field("Source queue", record.source_queue), field("Original exchange", record.original_exchange), field("Routing key", record.original_routing_key), field("Event type", record.event_type), field("Message id", record.message_id), field("Trace id", record.trace_id), field("Fingerprint", link("#/dead-letters?" + query({ fingerprint: record.fingerprint }), record.fingerprint)), field("Replay of", record.replay_of ? link("#/dead-letter/" + record.replay_of, record.replay_of) : null))),
      ),
      h("h2", { text: "Replays" }),
      table(["Replay id", "At", "Job"], replays, "Never replayed."),
      failures.length ? h("div", {}, h("h3", { text: "Replays that died again" }), h("ul", {}, failures)) : null,
      h("h2", { text: "Body" }),
      h("pre", { class: "body", text: body }),
      h("h2", { text: "Headers" }),
      h("pre", { class: "body", text: JSON.stringify(record.headers, null, 2) }),
    ];
  }

  async function detailView(current, id) {
    const record = await api("GET", "/v1/dead-letters/" + encodeURIComponent(id));
    if (current !== route) return;
    show(...renderRecord(record, false));
  }

  async function reveal(id) {
    if (!window.confirm("Reveal this dead letter's personal data? The reveal is written to the audit log.")) return;
    const record = await act(() => api("GET", "/v1/dead-letters/" + encodeURIComponent(id) + "?reveal=true"));
    if (record) show(...renderRecord(record, true));
  }

  async function replayOne(record) {
    if (!window.confirm("Replay this dead letter to " + record.source_queue + "?")) return;
    const result = await act(() => api("POST", "/v1/dead-letters/" + encodeURIComponent(record.id) + "/replay"));
    if (result) {
      await render();
      say("Replayed as " + result.replay_id + ".", "ok");
    }
  }

  async function deleteOne(id) {
    if (!window.confirm("Delete this dead letter for good?")) return;
    const done = await act(() => api("DELETE", "/v1/dead-letters/" + encodeURIComponent(id)).then(() => true));
    if (done) {
      location.hash = "#/dead-letters";
      say("Deleted " + id + ".", "ok");
    }
  }

  function numberOrNull(value) {
    return value === "" ? null : Number(value);
  }

  function replayView(params) {
    const filters = {};
    for (const [name] of FILTERS) if (params.get(name)) filters[name] = params.get(name);
    const count = params.get("count");
    const input = (name, label, attrs) => h("label", {}, label, h("input", { name, ...attrs }));
    const form = h(
      "form",
      { class: "replay", id: "replay-form", onsubmit: (e) => { e.preventDefault(); startJob(filters, new FormData(form)); } },
      input("canary", "Canary (replayed and watched first)", { type: "number", min: 0, value: 0 }),
      input("ramp", "Ramp: batch sizes after the canary, each watched before the next", { value: "1,2,5,20", pattern: "\\s*(\\d+\\s*(,\\s*\\d+\\s*)*)?" }),
      input("canary_wait_seconds", "Watch each batch for (seconds; empty: the archiver's default)", { type: "number", min: 0, step: "any" }),
      input("rate_per_second", "Rate (replays per second; empty: the default)", { type: "number", min: 0.01, step: "any" }),
      input("max_failure_rate", "Halt when this share of replays dies again", { type: "number", min: 0, max: 1, step: "any", value: 0.1 }),
      h("button", { type: "submit", id: "start-job", text: "Start replay job" }),
    );
    show(
      h("h1", { text: "Replay as a job" }),
      h("p", {}, "Dead letters with status dead matching ", h("code", { text: filterText(filters) }), count ? " (" + count + " in the group)" : "", ". Batches go one after another; after each but the last the job waits, and goes on only if the replays so far stayed clean."),
      form,
    );
  }

  async function startJob(filters, data) {
    const ramp = String(data.get("ramp") || "").split(",").map((s) => s.trim()).filter(Boolean).map(Number);
    const body = { ...filters, canary: Number(data.get("canary") || 0), ramp, max_failure_rate: Number(data.get("max_failure_rate")) };
    for (const name of ["canary_wait_seconds", "rate_per_second"]) {
      const value = numberOrNull(String(data.get(name) || ""));
      if (value !== null) body[name] = value;
    }
    const job = await act(() => api("POST", "/v1/dead-letters/replay", body));
    if (job) location.hash = "#/job/" + job.id;
  }

  function batchStates(job) {
    let first = 1;
    return job.batches.map((size, index) => {
      const number = index + 1;
      const range = size === 1 ? "#" + first : "#" + first + "–" + (first + size - 1);
      first += size;
      let state;
      if (job.status === "completed" || number < job.batch) state = "done";
      else if (number > job.batch) state = job.status === "running" ? "pending" : "not run";
      else if (job.status === "running") state = job.phase;
      else state = job.phase === "watching" ? job.status + " during its watch" : job.status + " part-way";
      return { number, size, range, state };
    });
  }

  async function jobView(current, id) {
    const job = await api("GET", "/v1/replays/" + encodeURIComponent(id));
    if (current !== route) return;
    const running = job.status === "running";
    const batches = batchStates(job).map((b) =>
      h("li", { class: "batch " + b.state.split(" ")[0], "data-state": b.state }, h("strong", { text: "Batch " + b.number }), " · " + b.size + " (" + b.range + ") · ", h("span", { class: "state", text: b.state })),
    );
    const since = job.created_at;
    show(
      h("h1", {}, "Replay job ", h("code", { text: job.id })),
      job.new_failures
        ? h("p", { class: "message warn", id: "new-failures", role: "alert" }, "⚠ New failures: " + job.new_failures + " new dead letter" + (job.new_failures === 1 ? " has" : "s have") + " joined this job's filter since it started. The cause may not be fixed. ", link("#/dead-letters?" + query({ ...job.filter, status: null, since }), "See them"))
        : null,
      h(
        "section",
        { class: "cards" },
        h(
          "div",
          { class: "card" },
          h("h2", {}, "Status ", badge(job.status), job.cancel_requested && running ? h("span", { class: "muted", text: " (cancelling…)" }) : null),
          h("progress", { max: Math.max(job.total, 1), value: job.replayed, id: "progress" }),
          h("p", { id: "counts", text: job.replayed + " of " + job.total + " replayed · " + job.failed_again + " failed again · " + job.refused + " refused" }),
          job.reason ? h("p", { class: "reason", text: job.reason }) : null,
          running ? h("button", { id: "cancel-job", class: "danger", onclick: () => cancelJob(job.id) }, "Cancel job") : null,
        ),
        h("div", { class: "card" }, h("h2", { text: "Plan" }), h("dl", {}, field("Filter", filterText(job.filter)), field("Rate", job.rate_per_second + " / s"), field("Watch after each batch", (job.canary_wait_seconds ?? "—") + " s"), field("Halts past", Math.round(job.max_failure_rate * 100) + "% failed again"), field("Started", when(job.created_at)), job.group_at_start ? field("Group at start", job.group_at_start.count + " dead letters, the last at " + when(job.group_at_start.last_seen)) : null, field("Finished", when(job.finished_at)))),
      ),
      h("h2", { text: "Batches" }),
      h("ol", { class: "batches", id: "batches" }, batches),
    );
    if (running) timer = setTimeout(() => render(), JOB_REFRESH_MS);
  }

  async function cancelJob(id) {
    if (!window.confirm("Cancel this job? What it replayed stays replayed; the rest stays untouched.")) return;
    const job = await act(() => api("POST", "/v1/replays/" + encodeURIComponent(id) + "/cancel"));
    if (job) {
      say("Cancel requested: the job stops before its next replay.", "ok");
      render();
    }
  }

  async function jobsView(current) {
    const jobs = await api("GET", "/v1/replays?limit=50");
    if (current !== route) return;
    show(h("h1", { text: "Replay jobs" }), jobsTable(jobs));
  }

  function purgeView(params) {
    const filters = Object.fromEntries(params);
    delete filters.cursor;
    const phrase = "purge";
    const typed = h("input", { id: "purge-confirm", autocomplete: "off", "aria-label": "Type purge to confirm" });
    const button = h("button", { id: "purge", class: "danger", type: "submit", disabled: true, text: "Purge for good" });
    typed.addEventListener("input", () => { button.disabled = typed.value.trim() !== phrase; });
    const form = h(
      "form",
      {
        class: "replay",
        onsubmit: async (e) => {
          e.preventDefault();
          if (typed.value.trim() !== phrase) return;
          const result = await act(() => api("DELETE", "/v1/dead-letters?" + query(filters)));
          if (result) {
            show(h("h1", { text: "Purged" }), h("p", { id: "purged", text: result.purged + (result.purged === 1 ? " dead letter" : " dead letters") + " deleted (audited)." }), link("#/groups", "Back to the groups"));
          }
        },
      },
      h("label", {}, "Type “" + phrase + "” to delete every dead letter matching this filter:", typed),
      button,
    );
    show(h("h1", { text: "Purge dead letters" }), h("p", {}, "Filter: ", h("code", { text: filterText(filters) || "none" }), ". This cannot be undone."), form);
  }

  async function auditView(current) {
    const entries = await api("GET", "/v1/audit?limit=200");
    if (current !== route) return;
    show(
      h("h1", { text: "Audit log" }),
      table(
        ["At", "Action", "What", "Count"],
        entries.map((e) => h("tr", {}, h("td", { class: "nowrap", text: when(e.at) }), h("td", { text: e.action }), h("td", {}, h("code", { text: e.what })), h("td", { class: "num", text: e.count }))),
        "Nothing audited yet.",
      ),
    );
  }

  // --- routing ------------------------------------------------------------------------------

  async function render() {
    clearTimeout(timer);
    route += 1;
    const current = route;
    const [path, search] = (location.hash.replace(/^#/, "") || "/groups").split("?");
    const params = new URLSearchParams(search || "");
    const parts = path.split("/").filter(Boolean);
    for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.nav === parts[0]);
    try {
      switch (parts[0]) {
        case "dead-letters": return await listView(current, params);
        case "dead-letter": return await detailView(current, parts[1]);
        case "replay": return replayView(params);
        case "job": return await jobView(current, parts[1]);
        case "jobs": return await jobsView(current);
        case "purge": return purgeView(params);
        case "audit": return await auditView(current);
        default: return await groupsView(current);
      }
    } catch (error) {
      if (current !== route) return;
      show(h("h1", { text: "Cannot show this" }), h("p", { class: "message error", id: "view-error", text: error.message }));
      if (error.status === undefined || error.status >= 500) timer = setTimeout(() => render(), GROUPS_REFRESH_MS);
    }
  }

  document.getElementById("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const input = document.getElementById("token-input");
    if (input.value.trim()) sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    input.value = "";
    renderToken();
    say("");
    render();
  });
  document.getElementById("token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    renderToken();
    render();
  });
  window.addEventListener("hashchange", () => { say(""); render(); });
  renderToken();
  render();
})();
