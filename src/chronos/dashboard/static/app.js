// Chronos dashboard: polls /api/state and redraws; read-only, no framework, no network
// beyond this server. Every node is built with the DOM API (no innerHTML), so nothing in
// the data (user names, commands) can inject markup, and the strict CSP holds.
"use strict";
(function () {
  const POLL_MS = Number(document.body.dataset.pollMs) || 1500;
  const params = new URLSearchParams(location.search);
  const HOURS = Number(params.get("hours")) || 0; // ?hours=N fixes the timeline's span
  const PALETTE = ["#4e79a7", "#e8833a", "#59a14f", "#8e6bbf", "#c49a1a", "#2a9d8f",
                   "#d4609a", "#9c755f"];
  const REDRAW_MS = 30000; // redraw the timeline this often even when nothing changed

  let state = null;
  let colors = new Map(); // user -> colour, distinct while users are fewer than colours
  let offset = 0; // server clock minus this browser's, in seconds
  let lastKey = "";
  let lastDraw = 0;

  // ------------------------------------------------------------------ helpers
  function h(tag, props, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "style") for (const [sk, sv] of Object.entries(v)) e.style.setProperty(sk, sv);
      else if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else e.setAttribute(k, v === true ? "" : String(v));
    }
    for (const kid of kids.flat()) {
      if (kid === null || kid === undefined || kid === false) continue;
      e.append(kid instanceof Node ? kid : String(kid));
    }
    return e;
  }
  const $ = (id) => document.getElementById(id);
  const now = () => Date.now() / 1000 + offset;
  const narrow = () => window.matchMedia("(max-width: 640px)").matches;

  function hashOf(text) {
    let hash = 2166136261;
    for (const ch of String(text)) hash = Math.imul(hash ^ ch.codePointAt(0), 16777619) >>> 0;
    return hash;
  }
  function assignColors(s) {
    // Each user's own colour (from a hash of the name, so it stays put), moved to the next
    // free one on a clash: two users on screen never share a colour (up to eight of them).
    const users = [...new Set([...s.partitions, ...s.queue, ...s.processes]
      .map((x) => x.user).filter(Boolean))].sort();
    const taken = new Set();
    colors = new Map();
    for (const user of users) {
      let i = hashOf(user) % PALETTE.length;
      for (let n = 0; n < PALETTE.length && taken.has(i); n += 1) i = (i + 1) % PALETTE.length;
      taken.add(i);
      colors.set(user, PALETTE[i]);
    }
  }
  function color(user) {
    return colors.get(user) || PALETTE[hashOf(user) % PALETTE.length];
  }

  function bytes(n) {
    if (n === null || n === undefined) return "n/a";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let v = n, i = 0;
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    const text = i === 0 || v >= 100 ? v.toFixed(0) : v.toFixed(1).replace(/\.0$/, "");
    return `${text} ${units[i]}`;
  }

  const pct = (f) => `${(f * 100).toFixed(f < 0.1 && f > 0 ? 1 : 0).replace(/\.0$/, "")}%`;

  function dur(s) {
    s = Math.max(0, Math.round(s));
    const d = Math.floor(s / 86400), hh = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60), sec = s % 60;
    const two = (x) => String(x).padStart(2, "0");
    if (d) return `${d}d ${hh}h`;
    if (hh) return `${hh}h ${two(m)}m`;
    if (m) return `${m}m ${two(sec)}s`;
    return `${sec}s`;
  }

  function clock(ts) {
    return new Date(ts * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit",
                                                        hour12: false });
  }

  function countdown(until, prefix) {
    const span = h("span", { class: "countdown", "data-until": until, "data-prefix": prefix });
    span.textContent = countdownText(until, prefix);
    return span;
  }
  function countdownText(until, prefix) {
    if (until === null || until === undefined || until === "") return "no estimate";
    const left = Number(until) - now();
    return left <= 0 ? (prefix === "ends in" ? "ending" : "now") : `${prefix} ${dur(left)}`;
  }

  function swatch(user, extra) {
    return h("span", { class: `sw ${extra || ""}`, style: { "--c": color(user) } });
  }
  function owner(user) {
    return h("span", { class: "owner" }, swatch(user), h("span", { text: user }));
  }

  // ------------------------------------------------------------------- GPUs
  function timing(item) {
    // [start, end, countdown until, countdown prefix, kind] of a partition or queued request
    if (item.ticket) {
      const start = item.estimated_start;
      return [start, start === null ? null : start + item.duration_s, start, "est. in", "queued"];
    }
    if (item.state === "booked") return [item.starts_at, item.expires_at, item.starts_at, "starts in", "booked"];
    return [item.starts_at, item.expires_at, item.expires_at, "ends in", "active"];
  }

  function memoryBar(d, s, active) {
    const total = d.total_bytes || 1;
    const w = (v) => `${Math.max(0, Math.min(100, (100 * v) / total))}%`;
    const onDevice = s.processes.filter((p) => p.device === d.index);
    const procUsed = onDevice.reduce((a, p) => a + (p.used_bytes || 0), 0);
    const unpart = onDevice.filter((p) => !p.partition_id).reduce((a, p) => a + (p.used_bytes || 0), 0);
    const other = Math.max(0, (d.used_bytes || 0) - procUsed);
    const committed = active.reduce((a, p) => a + p.memory_bytes, 0);
    const free = Math.max(0, total - committed - unpart - other);
    const segs = active.map((p) => {
      const used = p.used_bytes || 0;
      const over = p.used_bytes !== null && used > p.memory_bytes;
      const title = `${p.user} · ${bytes(p.memory_bytes)} reserved · ` +
        `${p.used_bytes === null ? "use unknown" : bytes(used) + " used"} · ${p.id}`;
      return h("div", { class: `seg part${over ? " over" : ""}`, title,
                        "data-partition-id": p.id, style: { width: w(p.memory_bytes), "--c": color(p.user) } },
        h("div", { class: "fill", style: { width: `${Math.min(100, (100 * used) / p.memory_bytes)}%` } }),
        (100 * p.memory_bytes) / total >= 9 ? h("span", { class: "lbl", text: p.user }) : null);
    });
    if (unpart > 0) segs.push(h("div", { class: "seg unpart", style: { width: w(unpart) },
                                         title: `${bytes(unpart)} used outside any partition` }));
    if (other > 0) segs.push(h("div", { class: "seg other", style: { width: w(other) },
                                        title: `${bytes(other)} in use, not attributed to a process` }));
    const bar = h("div", { class: "membar", role: "img",
                           "aria-label": `GPU ${d.index}: ${bytes(committed)} reserved, ${bytes(d.used_bytes)} used, ${bytes(free)} free of ${bytes(total)}` },
      segs);
    if (d.reservable_bytes < total) {
      bar.append(h("div", { class: "limit", style: { left: w(d.reservable_bytes) },
                            title: `partitions may reserve up to ${bytes(d.reservable_bytes)}` }));
    }
    const usedInParts = active.reduce((a, p) => a + (p.used_bytes || 0), 0);
    const nums = h("div", { class: "memnums" },
      h("span", { class: "key" }, h("span", { class: "sw reserved", style: { "--c": "var(--muted)" } }),
        "reserved ", h("b", { text: `${bytes(committed)} (${pct(committed / total)})` })),
      h("span", { class: "key" }, h("span", { class: "sw", style: { "--c": "var(--muted)" } }),
        "used in partitions ", h("b", { text: s.per_process_memory ? bytes(usedInParts) : "n/a" })),
      unpart > 0 ? h("span", { class: "key" }, h("span", { class: "sw unpart" }),
        "unpartitioned ", h("b", { text: bytes(unpart) })) : null,
      h("span", { class: "key" }, h("span", { class: "sw free" }), "free ", h("b", { text: bytes(free) })),
      d.reservable_bytes < total ? h("span", { text: `reservable ${bytes(d.reservable_bytes)}` }) : null);
    return [bar, nums];
  }

  function ticks(t0, t1) {
    const spanH = (t1 - t0) / 3600;
    const step = spanH <= 6 ? 1 : spanH <= 12 ? 2 : spanH <= 24 ? 3 : spanH <= 72 ? 12 : 24;
    const d = new Date(t0 * 1000);
    d.setMinutes(0, 0, 0);
    d.setHours(d.getHours() + 1);
    while (d.getHours() % step) d.setHours(d.getHours() + 1);
    const out = [];
    for (; d.getTime() / 1000 < t1; d.setHours(d.getHours() + step)) {
      const ts = d.getTime() / 1000;
      const day = d.getHours() === 0 ? d.toLocaleDateString([], { weekday: "short" }) + " " : "";
      out.push([ts, day + clock(ts)]);
    }
    return out;
  }

  function spanHours(s, t0) {
    // The next day at most; less when everything ends sooner, so short bars stay readable.
    if (HOURS > 0) return Math.min(HOURS, 24 * 14);
    let last = t0;
    for (const p of s.partitions) last = Math.max(last, p.expires_at);
    for (const q of s.queue) {
      if (q.estimated_start !== null) last = Math.max(last, q.estimated_start + q.duration_s);
    }
    return Math.min(24, Math.max(6, Math.ceil((last - t0) / 3600 / 3) * 3));
  }

  // A group (one id) is on each of its GPUs; entries of older daemons name one device.
  const gpusOf = (x) => x.devices || [x.device];
  const onGpu = (x, index) => gpusOf(x).includes(index);

  function timeline(d, s, t0, spanH) {
    const t1 = t0 + spanH * 3600;
    const items = [
      ...s.partitions.filter((p) => onGpu(p, d.index) && p.state === "active")
        .sort((a, b) => a.expires_at - b.expires_at),
      ...s.partitions.filter((p) => onGpu(p, d.index) && p.state === "booked")
        .sort((a, b) => a.starts_at - b.starts_at),
      ...s.queue.filter((q) => onGpu(q, d.index)).sort((a, b) => a.position - b.position),
    ];
    const pos = (t) => `${Math.max(0, Math.min(100, (100 * (t - t0)) / (t1 - t0)))}%`;
    const grid = h("div", { class: "tl" });
    const marks = ticks(t0, t1);
    const axis = h("div", { class: "tl-axis", style: { "grid-column": "2", "grid-row": "1" } },
      h("span", { class: "now", style: { left: "0" }, text: "now" }),
      marks.map(([ts, label], i) => ((ts - t0) / (t1 - t0) > (narrow() ? 0.16 : 0.09) ?
        h("span", { class: i % 2 ? "odd" : "", style: { left: pos(ts) }, text: label }) : null)));
    grid.append(h("div", { style: { "grid-column": "1", "grid-row": "1" } }), axis);
    grid.append(h("div", { class: "tl-grid", style: { "grid-column": "2", "grid-row": `1 / span ${items.length + 1}` } },
      h("i", { class: "now", style: { left: "0" } }),
      marks.map(([ts]) => h("i", { style: { left: pos(ts) } }))));
    if (!items.length) {
      grid.append(h("div", { class: "tl-empty", style: { "grid-row": "2" },
                             text: "nothing active, booked or waiting" }));
    }
    items.forEach((item, i) => {
      const row = `${i + 2}`;
      const [start, end, until, prefix, kind] = timing(item);
      const id = item.ticket || item.id;
      const frac = item.memory_fraction;
      const label = h("div", { class: "tl-label", style: { "grid-column": "1", "grid-row": row },
                               "data-item": id },
        swatch(item.user, kind === "queued" ? "reserved" : ""),
        h("div", { style: { "min-width": "0" } },
          h("div", { class: "who", text: item.user }),
          h("div", { class: "what" }, h("span", { class: "pct", text: `${pct(frac)} · ` }),
            countdown(until, prefix))));
      const track = h("div", { class: "tl-track", style: { "grid-column": "2", "grid-row": row } });
      if (start !== null && start < t1) {
        const a = Math.max(start, t0), b = Math.min(end, t1);
        const text = kind === "queued" ? `queued · ${bytes(item.memory_bytes)}` :
          `${item.user} · ${bytes(item.memory_bytes)}`;
        track.append(h("div", {
          class: `bar ${kind}`, style: { left: pos(a), width: `max(5px, ${pos(b - a + t0)})`, "--c": color(item.user) },
          title: `${item.user} · ${bytes(item.memory_bytes)} (${pct(frac)}) · ${kind} · ${clock(start)}–${clock(end)} · ${id}`,
        }, h("span", { class: "bar-text", text, "data-full": text,
                       "data-short": bytes(item.memory_bytes) })));
      } else {
        track.append(h("div", { class: "tl-empty", text: start === null ? "no estimated start yet" : "later" }));
      }
      grid.append(label, track);
    });
    const title = h("div", { class: "tl-title" }, h("span", { text: `Next ${spanH} h` }),
      h("span", { text: "█ active  ▨ booked  ┅ queued" }));
    return [title, grid];
  }

  function renderGpus(s) {
    const t0 = now();
    const spanH = spanHours(s, t0);
    const cards = s.devices.map((d) => {
      const active = s.partitions.filter((p) => onGpu(p, d.index) && p.state === "active");
      const util = d.utilization_pct === null ? "" : ` · util ${Math.round(d.utilization_pct)}%`;
      return h("article", { class: "gpu", "data-gpu": d.index },
        h("header", {},
          h("h2", { text: `GPU ${d.index}` }),
          h("span", { class: "name", text: d.name }),
          h("span", { class: "meta", text: `${bytes(d.total_bytes)}${util} · ${active.length} active` })),
        memoryBar(d, s, active),
        timeline(d, s, t0, spanH));
    });
    $("gpus").replaceChildren(...cards);
    fitBarTexts();
  }

  function fitBarTexts() {
    // A bar's label in full where it fits, else just its size, else nothing (never "…").
    const range = document.createRange();
    const fits = (t) => {
      range.selectNodeContents(t);
      return range.getBoundingClientRect().width <= t.getBoundingClientRect().width + 1;
    };
    for (const t of document.querySelectorAll(".bar-text")) {
      for (const text of [t.dataset.full, t.dataset.short, ""]) {
        if (t.textContent !== text) t.textContent = text;
        if (!text || fits(t)) break;
      }
    }
  }

  // ----------------------------------------------------------------- tables
  function fill(id, rows, empty, columns) {
    const body = document.querySelector(`#${id} tbody`);
    body.replaceChildren(...(rows.length ? rows :
      [h("tr", { class: "empty" }, h("td", { colspan: columns, text: empty }))]));
    $(`n-${id}`).textContent = rows.length;
  }

  function renderTables(s) {
    const byId = Object.fromEntries(s.partitions.map((p) => [p.id, p]));
    fill("partitions", s.partitions.map((p) => {
      const [, , until, prefix] = timing(p);
      const over = p.used_bytes !== null && p.used_bytes > p.memory_bytes;
      return h("tr", { "data-partition-id": p.id },
        h("td", {}, owner(p.user)),
        h("td", { class: "num", text: gpusOf(p).join(",") }),
        h("td", { class: "num", text: `${bytes(p.memory_bytes)} (${pct(p.memory_fraction)})` }),
        h("td", { class: "num wide" }, p.state !== "active" || p.used_bytes === null ? "—" : bytes(p.used_bytes),
          over ? h("span", { class: "badge over", text: " over" }) : null,
          p.counted_bytes === null || p.counted_bytes === undefined ? null :
            h("span", { class: "cap-counted", title: "counted at allocation time by the cap library",
                        text: ` · cap ${bytes(p.counted_bytes)}` })),
        h("td", { class: "wide" }, h("span", { class: `badge ${p.state}`, text: p.state })),
        h("td", {}, countdown(until, prefix)),
        h("td", { class: "mono wide", text: p.id }));
    }), "no active or booked partitions", 7);

    fill("queue", s.queue.map((q) => h("tr", { "data-ticket": q.ticket },
      h("td", { class: "num", text: q.position }),
      h("td", {}, owner(q.user)),
      h("td", { class: "num", text: gpusOf(q).join(",") }),
      h("td", { class: "num", text: `${bytes(q.memory_bytes)} (${pct(q.memory_fraction)})` }),
      h("td", { class: "num wide", text: dur(q.duration_s) }),
      h("td", {}, q.estimated_start === null ? "unknown" : countdown(q.estimated_start, "in")),
      h("td", { class: "mono wide", text: q.ticket }))), "no waiting requests", 7);

    const procNote = s.per_process_memory ? "no process holds GPU memory" :
      "per-process GPU memory is not available on this machine";
    fill("processes", s.processes.map((p) => {
      const part = p.partition_id && byId[p.partition_id];
      return h("tr", { "data-pid": p.pid },
        h("td", { class: "num mono", text: p.pid }),
        h("td", { text: p.user || "?" }),
        h("td", { class: "num", text: p.device }),
        h("td", { class: "num", text: bytes(p.used_bytes) }),
        h("td", {}, p.partition_id ?
          h("span", { class: "owner" }, swatch(part ? part.user : p.user), h("span", { class: "mono", text: p.partition_id })) :
          h("span", { class: "badge unpartitioned", text: "unpartitioned" })),
        h("td", { class: "cmd wide mono", text: p.command || "?" }));
    }), procNote, 6);
  }

  // ------------------------------------------------------------------- loop
  function render(s, force) {
    const key = JSON.stringify({ ...s, now: 0 });
    if (!force && key === lastKey && Date.now() - lastDraw < REDRAW_MS) return;
    lastKey = key;
    lastDraw = Date.now();
    if (s.host) { $("host").textContent = `on ${s.host}`; document.title = `Chronos · ${s.host}`; }
    assignColors(s);
    renderGpus(s);
    renderTables(s);
  }

  function tick() {
    for (const e of document.querySelectorAll("[data-until]")) {
      e.textContent = countdownText(e.dataset.until, e.dataset.prefix);
    }
  }

  function status(ok, text) {
    $("status").className = `status ${ok ? "live" : "down"}`;
    $("status-text").textContent = text;
  }

  // /api/state writes its times in ISO-8601 (as every --json does); the page computes with
  // epoch seconds, so each is read back once, here.
  const TIME_FIELDS = ["created_at", "starts_at", "expires_at", "estimated_start", "enqueued_at"];
  const seconds = (v) => (typeof v === "string" ? Date.parse(v) / 1000 : v);
  function epochTimes(s) {
    const items = (list) => (list || []).map((item) => {
      const out = { ...item };
      for (const k of TIME_FIELDS) if (k in out) out[k] = seconds(out[k]);
      return out;
    });
    return { ...s, now: seconds(s.now), partitions: items(s.partitions), queue: items(s.queue) };
  }

  function accept(wire) {
    const s = epochTimes(wire);
    offset = s.now - Date.now() / 1000;
    state = s;
    render(s, false);
    $("banner").hidden = true;
    status(true, `live · ${clock(s.now)}`);
  }

  function fail(message) {
    status(false, "offline · retrying");
    const banner = $("banner");
    banner.textContent = `Cannot read the state: ${message}`;
    banner.hidden = false;
  }

  async function poll() {
    try {
      const reply = await fetch("/api/state", { cache: "no-store", credentials: "omit" });
      const s = await reply.json();
      if (!reply.ok || s.error) fail(s.error || `HTTP ${reply.status}`);
      else accept(s);
    } catch (err) {
      fail(err && err.message ? err.message : String(err));
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  $("every").textContent = String(POLL_MS / 1000);
  try {
    const initial = JSON.parse($("initial-state").textContent || "null");
    if (initial && !initial.error && initial.devices) accept(initial);
    else if (initial && initial.error) fail(initial.error);
  } catch (err) {
    fail(String(err));
  }
  setInterval(tick, 1000);
  window.addEventListener("resize", () => { if (state) render(state, true); });
  setTimeout(poll, state ? POLL_MS : 0);
})();
