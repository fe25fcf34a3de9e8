// mlbridge dashboard: live state from /dashboard/events (Server-Sent Events read with fetch, so
// a bearer token from the URL fragment can be sent), polling /dashboard/state when streaming
// fails. Plain DOM and canvas; no libraries, nothing loaded from elsewhere.
"use strict";

(function () {
  const token = new URLSearchParams(location.hash.replace(/^#/, "")).get("token");
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const $ = (sel) => document.querySelector(sel);
  const statusEl = $("#status");

  function setStatus(kind, text) {
    statusEl.className = "status " + kind;
    statusEl.textContent = text;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }

  function mb(bytes) { return (bytes / 1048576).toFixed(1) + " MB"; }
  function dur(s) {
    if (s < 60) return s.toFixed(0) + " s";
    if (s < 3600) return (s / 60).toFixed(1) + " min";
    return (s / 3600).toFixed(1) + " h";
  }
  function clock(t) { return new Date(t * 1000).toLocaleTimeString(); }

  function renderPools(state) {
    const box = $("#pools");
    box.replaceChildren();
    if (!state.pools.length) box.append(el("p", { class: "empty" }, "no bridges configured"));
    for (const p of state.pools) {
      const rows = p.workers.map((w) => el("tr", { "data-worker": w.id },
        el("td", {}, w.id), el("td", { class: "num pid" }, w.pid ?? "-"),
        el("td", { class: "wstate" }, w.state + (w.overflow ? " (overflow)" : "")),
        el("td", { class: "num" }, mb(w.rss_bytes)), el("td", { class: "num" }, w.requests),
        el("td", { class: "num" }, w.errors), el("td", { class: "num" }, dur(w.uptime))));
      const card = el("div", { class: "pool", "data-pool": p.name },
        el("h3", {}, p.name, el("span", { class: "state " + p.state }, p.state),
          el("span", { class: "facts" },
            "workers ", el("b", { class: "worker-count" }, p.workers.length),
            " of " + p.pool_size + (p.overflow ? "+" + p.overflow : "") +
            " \u00b7 idle " + p.idle_workers + " \u00b7 starting " + p.starting_workers +
            " \u00b7 queue " + p.waiting_callers +
            " \u00b7 requests " + p.requests + " \u00b7 errors " + p.errors +
            " \u00b7 restarts ", el("b", { class: "restarts" }, p.restarts),
            " \u00b7 " + p.backend)));
      if (p.boot_error) card.append(el("div", { class: "boot-error" }, p.boot_error));
      if (rows.length) {
        card.append(el("table", { class: "workers" },
          el("thead", {}, el("tr", {}, ...["worker", "pid", "state", "RSS", "requests", "errors", "uptime"]
            .map((h) => el("th", {}, h)))),
          el("tbody", {}, ...rows)));
      }
      box.append(card);
    }
  }

  function renderBroken(state) {
    const section = $("#broken");
    section.hidden = state.broken.length === 0;
    $("#broken-list").replaceChildren(...state.broken.map((b) =>
      el("li", { "data-broken": b.name }, el("b", {}, b.name), ": " + (b.boot_error || "broken"))));
  }

  function renderTable(sel, items, cells) {
    const body = $(sel + " tbody");
    body.replaceChildren(...items.map((it) => el("tr", {}, ...cells(it).map((c) =>
      c instanceof Node ? el("td", {}, c) : el("td", {}, c)))));
  }

  function drawChart(canvas, points) {
    const ctx = canvas.getContext("2d");
    const w = canvas.width, h = canvas.height, pad = 36;
    ctx.clearRect(0, 0, w, h);
    ctx.strokeStyle = "#d9dee3";
    ctx.strokeRect(pad, 4, w - pad - 4, h - pad);
    if (!points.length) return;
    const values = points.map((p) => p[1]);
    const max = Math.max(...values) * 1.1 || 1;
    ctx.fillStyle = "#69737d";
    ctx.font = "10px sans-serif";
    ctx.fillText(max >= 100 ? max.toFixed(0) : max.toPrecision(3), 0, 12);
    ctx.fillText("0", 0, h - pad + 4);
    ctx.strokeStyle = "#2b6cb0";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    const step = (w - pad - 8) / Math.max(values.length - 1, 1);
    values.forEach((v, i) => {
      const x = pad + 2 + i * step, y = 4 + (h - pad) * (1 - v / max);
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
    const sorted = [...values].sort((a, b) => a - b);
    const p50 = sorted[Math.floor(sorted.length / 2)];
    ctx.fillText("p50 " + p50.toPrecision(3) + " ms \u00b7 n=" + values.length, pad + 4, h - 6);
  }

  function renderCharts(state) {
    const box = $("#charts");
    const names = state.pools.map((p) => p.name);
    for (const name of names) {
      let wrap = box.querySelector(`[data-chart="${CSS.escape(name)}"]`);
      if (!wrap) {
        wrap = el("div", { class: "chart", "data-chart": name }, el("div", { class: "title" }, name),
          el("canvas", { class: "latency", width: 360, height: 120, "data-bridge": name }));
        box.append(wrap);
      }
      drawChart(wrap.querySelector("canvas"), state.latency[name] || []);
    }
    for (const wrap of [...box.children]) {
      if (!names.includes(wrap.getAttribute("data-chart"))) wrap.remove();
    }
  }

  function render(state) {
    $("#summary").textContent = state.pools.length + " bridges \u00b7 " +
      state.pools.reduce((n, p) => n + p.workers.length, 0) + " workers \u00b7 restarts " +
      state.restarts + " \u00b7 resources " + state.resources + " \u00b7 sessions " +
      state.sessions + " \u00b7 host up " + dur(state.uptime);
    renderBroken(state);
    renderPools(state);
    renderCharts(state);
    renderTable("#recent", state.recent_requests, (r) => [clock(r.time), r.bridge, r.command,
      r.latency_ms.toFixed(2) + " ms",
      el("span", { class: r.ok ? "ok" : "err" }, r.ok ? "ok" : r.error_code || "error"),
      r.worker_id || "-"]);
    renderTable("#events", state.worker_events, (e) => [clock(e.time), e.bridge, e.worker_id,
      e.pid ?? "-", el("span", { class: "err" }, e.event), e.reason || ""]);
    document.body.dataset.updated = String(state.time);
  }

  async function poll() {
    setStatus("polling", "polling");
    for (;;) {
      try {
        const r = await fetch("/dashboard/state", { headers, cache: "no-store" });
        if (!r.ok) throw new Error("HTTP " + r.status);
        render(await r.json());
        setStatus("polling", "polling");
      } catch (err) {
        setStatus("down", "unreachable: " + err.message);
      }
      await new Promise((ok) => setTimeout(ok, 2000));
    }
  }

  async function stream() {
    let failures = 0;
    while (failures < 3) {
      try {
        const r = await fetch("/dashboard/events?interval=1", { headers, cache: "no-store" });
        if (!r.ok || !r.body) throw new Error("HTTP " + r.status);
        setStatus("live", "live");
        failures = 0;
        const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value;
          let cut;
          while ((cut = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, cut);
            buf = buf.slice(cut + 2);
            const data = block.split("\n").filter((l) => l.startsWith("data:"))
              .map((l) => l.slice(5).trimStart()).join("\n");
            if (data) render(JSON.parse(data));
          }
        }
      } catch (err) {
        failures += 1;
        setStatus("down", "reconnecting: " + err.message);
        await new Promise((ok) => setTimeout(ok, 1000));
      }
    }
    poll();
  }

  stream();
})();
