// The page's core: the event stream from the UI server, the tabs, and the live view.
import { scoreChart, yieldChart } from "./charts.js";
import { el, num, pct, score, setText, time } from "./dom.js";
import { Rejects } from "./rejects.js";
import { WhatIf } from "./whatif.js";

const MAX_ROWS = 200;
const state = { summary: null, streamUp: false };
const rejects = new Rejects(state);
const whatif = new WhatIf(state);

function route() {
  const hash = location.hash || "#/live";
  const [, view, ...rest] = hash.split("/");
  const tab = { live: "live", rejects: "rejects", reject: "rejects", review: "review", whatif: "whatif" }[view] || "live";
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.tab === tab));
  const show = (id) => document.querySelectorAll(".view").forEach((v) => { v.hidden = v.id !== id; });
  if (view === "rejects") { show("view-rejects"); rejects.showGallery(); }
  else if (view === "reject") { show("view-detail"); rejects.showDetail(decodeURIComponent(rest.join("/")), false); }
  else if (view === "review") { show("view-detail"); rejects.showQueue(); }
  else if (view === "whatif") { show("view-whatif"); whatif.show(); }
  else show("view-live");
}

function stateText(s) {
  if (!s.contact || s.contact.lost) return s.state === "stopped" ? "stopped" : "lost";
  return s.state || "connecting";
}

function renderHeader(s) {
  setText("#station-name", s.station || "station");
  setText("#run-id", s.run_id ? s.run_id.slice(0, 8) : "–");
  const pill = document.getElementById("state-pill");
  const text = state.streamUp ? stateText(s) : "page offline";
  pill.textContent = text;
  pill.className = `pill ${text.replace(/\s/g, "-")}`;
  const cam = document.getElementById("camera-pill");
  cam.hidden = !s.camera;
  if (s.camera) {
    cam.textContent = `camera ${s.camera.state}`;
    cam.className = `pill ${s.camera.state}`;
    cam.title = s.camera.last_error || "";
  }
  setText("#reject-count", s.archive && s.archive.enabled ? String(s.archive.count) : "");
  setText("#queue-count", s.reviews && s.reviews.unreviewed ? String(s.reviews.unreviewed) : "");
}

function renderBanners(s) {
  const banners = [...(s.banners || [])];
  if (!state.streamUp) banners.unshift({ level: "error", kind: "page", text: "Lost contact with the page's server (station ui); retrying." });
  const box = document.getElementById("banners");
  const key = JSON.stringify(banners);
  if (box.dataset.key === key) return;
  box.dataset.key = key;
  box.replaceChildren(...banners.map((b) => el("div", { class: `banner ${b.level}`, "data-kind": b.kind, text: b.text })));
}

function fill(prefix, c) {
  setText(`[data-testid=${prefix}-inspected]`, num(c.inspected));
  setText(`[data-testid=${prefix}-passed]`, num(c.passed));
  setText(`[data-testid=${prefix}-failed]`, num(c.failed));
  setText(`[data-testid=${prefix}-skipped]`, num(c.skipped));
  setText(`[data-testid=${prefix}-errors]`, num(c.errors));
  setText(`[data-testid=${prefix}-yield]`, pct(c.yield_pct));
}

function breakdown(testid, run, hour) {
  const keys = [...new Set([...Object.keys(run), ...Object.keys(hour)])].sort();
  const rows = keys.map((k) => el("tr", { "data-key": k }, el("th", { text: k }), el("td", { text: num(run[k] || 0) }),
                                  el("td", { text: num(hour[k] || 0) })));
  if (!rows.length) rows.push(el("tr", {}, el("td", { class: "muted", colspan: 3, text: "no fails" })));
  document.querySelector(`[data-testid=${testid}] tbody`).replaceChildren(...rows);
}

function renderCounters(s) {
  fill("run", s.run);
  fill("hour", s.hour);
  setText("[data-testid=run-fps]", s.fps === null || s.fps === undefined ? "–" : `${num(s.fps, 1)} /s`);
  setText("[data-testid=hour-rate]", s.hour.rate_per_min === null ? "–" : `${num(s.hour.rate_per_min)} /min`);
  setText("[data-testid=hour-latency]", `${num(s.hour.latency_p50_ms, 1)} / ${num(s.hour.latency_p99_ms, 1)} ms`);
  const w = s.hour.window_s;
  setText("#hour-window", w < 3600 ? `(page open ${Math.round(w / 60)} min)` : "");
  breakdown("by-class", s.run.seen.failed_by_class, s.hour.failed_by_class);
  breakdown("by-reason", s.run.seen.failed_by_reason, s.hour.failed_by_reason);
  const unseen = s.run.failed - s.run.seen.failed;
  setText("#seen-note", unseen > 0 ? `The breakdown covers the ${s.run.seen.failed} fails this page received; ${unseen} earlier fails of this run went by before it joined or in gaps.` : "");
  yieldChart(document.getElementById("chart-yield"), s.trends.hours);
  scoreChart(document.getElementById("chart-scores"), s.trends.scores);
}

function verdictRow(v, fresh) {
  const what = v.error ? `error: ${v.error}` : v.label ? `${v.label} ${num(v.confidence * 100)}%` : v.reasons.join(", ");
  const why = [v.reasons.length ? v.reasons.join(", ") : null,
               typeof v.score === "number" ? `anomaly ${score(v.score)} / ${score(v.threshold)}` : null,
               typeof v.latency_ms === "number" ? `${num(v.latency_ms, 1)} ms` : null, v.frame_id].filter(Boolean).join(" · ");
  return el("li", { class: fresh ? "new" : "", "data-seq": v.seq, "data-verdict": v.verdict },
    el("span", { text: `#${v.seq}` }), el("span", { class: `badge ${v.verdict}`, text: v.verdict }),
    el("span", { class: "muted", text: time(v.published_at) }), el("span", { text: what }),
    el("span", { class: "why", text: why, title: why }));
}

function renderVerdicts(rows, first) {
  if (!rows.length) return;
  const list = document.getElementById("verdicts");
  if (first) list.replaceChildren();
  const items = rows.slice().reverse().map((v) => verdictRow(v, !first));
  list.prepend(...items);
  while (list.children.length > MAX_ROWS) list.lastElementChild.remove();
}

function connect() {
  const source = new EventSource("/api/events");
  let first = true;
  source.addEventListener("state", (event) => {
    const data = JSON.parse(event.data);
    state.streamUp = true;
    state.summary = data.summary;
    renderHeader(data.summary);
    renderBanners(data.summary);
    renderCounters(data.summary);
    renderVerdicts(data.verdicts, first);
    first = false;
    rejects.onSummary(data.summary);
    whatif.onSummary(data.summary);
  });
  source.addEventListener("error", () => {
    // EventSource reconnects by itself; say so meanwhile, and start the list afresh once back.
    state.streamUp = false;
    first = true;
    if (state.summary) renderHeader(state.summary);
    renderBanners(state.summary || {});
  });
}

window.addEventListener("hashchange", route);
document.addEventListener("keydown", (event) => rejects.onKey(event));
route();
connect();
