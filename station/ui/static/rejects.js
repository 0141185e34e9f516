// Rejects: the gallery with its filters, the detail view ("why was this rejected"), and the review queue.
import { dateTime, el, getJSON, num, outcomeText, score, svg, time } from "./dom.js";

const TOKEN_KEY = "station-review-token";
const PAGE = 60;
const REASONS = {
  defect_class: (m) => `Classifier: ${m.class.label} at ${num(m.class.confidence * 100, 1)} % (a defect class at or above the class confidence).`,
  anomaly: (m) => `Anomaly score ${score(m.anomaly.score)} above the threshold ${score(m.anomaly.threshold)} (${num(m.anomaly.score / m.anomaly.threshold, 2)}×)` +
    (m.anomaly.region && m.anomaly.region.area_px ? `, over ${num(m.anomaly.region.area_px)} px (${num(m.anomaly.region.area_fraction * 100, 2)} % of the view).` : "."),
  error: (m) => `Could not be inspected: ${m.error ? `${m.error.reason}: ${m.error.detail}` : "error"}.`,
};

export class Rejects {
  constructor(state) {
    this.state = state;
    this.filters = document.getElementById("filters");
    this.gallery = document.getElementById("gallery");
    this.shown = PAGE;
    this.archiveVersion = null;
    this.reviewVersion = null;
    this.current = null;
    this.queue = false;
    this.overlay = true;
    this.writable = null;
    this.filters.addEventListener("change", () => { this.shown = PAGE; this.loadGallery(); });
    document.getElementById("more").addEventListener("click", () => { this.shown += PAGE; this.loadGallery(); });
    document.getElementById("newer").addEventListener("click", () => this.go("newer"));
    document.getElementById("older").addEventListener("click", () => this.go("older"));
    document.getElementById("token-bar").addEventListener("submit", (event) => {
      event.preventDefault();
      const input = document.getElementById("token");
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      input.blur();  // the review keys work at once
      this.renderTokenBar();
      if (this.current) this.renderDetail(this.current);
    });
  }

  query(extra = {}) {
    const params = new URLSearchParams();
    for (const [key, value] of new FormData(this.filters)) {
      if (!value) continue;
      // datetime-local is the browser's local time; the server compares UTC instants.
      params.set(key, key === "since" || key === "until" ? new Date(value).toISOString() : value);
    }
    for (const [key, value] of Object.entries(extra)) params.set(key, value);
    return params;
  }

  onSummary(summary) {
    const writable = Boolean(summary.reviews?.writable);
    if (writable !== this.writable) {
      // The first summary can come after a detail was drawn: draw its review controls now they are known.
      this.writable = writable;
      this.renderTokenBar();
      if (this.current && !document.getElementById("view-detail").hidden) this.renderDetail(this.current);
    }
    const a = summary.archive || {};
    const visible = !document.getElementById("view-rejects").hidden;
    const changed = a.version !== this.archiveVersion || summary.reviews?.confirmed + summary.reviews?.false_reject !== this.reviewVersion;
    this.archiveVersion = a.version;
    this.reviewVersion = summary.reviews?.confirmed + summary.reviews?.false_reject;
    if (visible && changed) this.loadGallery();
  }

  showGallery() { this.queue = false; this.current = null; this.loadGallery(); }

  async loadGallery() {
    const info = document.getElementById("gallery-info");
    let data;
    try {
      data = await getJSON(`/api/rejects?${this.query({ limit: this.shown })}`);
    } catch (error) {
      info.textContent = error.message;
      this.gallery.replaceChildren();
      return;
    }
    this.fillSelect("label", data.labels);
    this.fillSelect("reason", data.reasons);
    info.textContent = `${num(data.total)} rejects${data.total > data.items.length ? `, newest ${data.items.length} shown` : ""}`;
    this.gallery.replaceChildren(...data.items.map((r) => this.card(r)));
    document.getElementById("more").hidden = data.total <= data.items.length;
  }

  fillSelect(name, counts) {
    const select = this.filters.elements[name];
    const keep = select.value;
    const options = [el("option", { value: "", text: "all" }),
      ...Object.entries(counts).map(([k, n]) => el("option", { value: k, text: `${k} (${n})` }))];
    const key = JSON.stringify(counts);
    if (select.dataset.key === key) return;
    select.dataset.key = key;
    select.replaceChildren(...options);
    select.value = keep;
  }

  card(r) {
    const picture = r.has_image ? el("img", { src: `/archive/${r.id}.jpg?thumb=1`, alt: r.frame_id, loading: "lazy" })
      : el("div", { class: "noimg", text: r.error || "no image" });
    const outcome = r.review ? r.review.outcome : "unreviewed";
    return el("a", { class: "card", href: `#/reject/${r.id}`, "data-seq": r.seq, "data-id": r.id }, picture,
      el("div", { class: "cap" },
        el("strong", { text: `#${r.seq} ${r.label}` }),
        el("span", { class: "muted", text: `${time(r.captured_at)} · ${r.reasons.join(", ")}` }),
        el("span", { text: typeof r.score === "number" ? `anomaly ${score(r.score)} / ${score(r.threshold)}` : "" }),
        el("span", {}, el("span", { class: `badge ${outcome}`, text: outcomeText(outcome) + (r.review?.true_class ? `: ${r.review.true_class}` : "") }))));
  }

  showQueue() { this.queue = true; this.showDetail(null, true); }

  async showDetail(id, queue) {
    this.queue = queue;
    const box = document.getElementById("detail");
    const params = queue ? new URLSearchParams({ review: "unreviewed" }) : this.query();
    document.getElementById("back").hidden = queue;
    this.renderTokenBar();
    try {
      if (queue && !id) {
        const first = await getJSON(`/api/rejects?${params}&limit=1`);
        if (!first.items.length) {
          this.current = null;
          document.getElementById("queue-info").textContent = "";
          box.replaceChildren(el("p", { class: "panel", "data-testid": "queue-empty", text: "Nothing to review: every archived reject has been reviewed." }));
          return;
        }
        id = first.items[0].id;
      }
      this.current = await getJSON(`/api/rejects/${id}?${params}`);
    } catch (error) {
      this.current = null;
      box.replaceChildren(el("p", { class: "msg error", text: error.message }));
      return;
    }
    this.renderDetail(this.current);
  }

  renderTokenBar() {
    const reviews = this.state.summary?.reviews || {};
    document.getElementById("token-bar").hidden = !reviews.writable || Boolean(sessionStorage.getItem(TOKEN_KEY));
  }

  renderDetail(r) {
    const m = r.message;
    document.getElementById("queue-info").textContent = this.queue ? `Review queue: ${r.position ?? "–"} of ${r.of} unreviewed` : (r.position ? `${r.position} of ${r.of}` : "");
    document.getElementById("newer").disabled = !r.newer;
    document.getElementById("older").disabled = !r.older;
    const figure = r.has_image ? this.figure(r, m) : el("div", { class: "panel", text: `No image: ${m.error ? m.error.detail : "not kept"}` });
    const reasons = (m.reasons || []).filter((x) => REASONS[x]).map((x) => el("li", { "data-reason": x, text: REASONS[x](m) }));
    const side = el("div", {},
      this.reviewBox(r),
      el("h2", { text: `Why #${m.seq} was rejected` }), el("ul", { class: "why-list", "data-testid": "why" }, reasons),
      m.anomaly ? this.meter(m.anomaly) : null,
      m.class ? this.probabilities(m.class) : null,
      this.facts(m), this.latencies(m.latency_ms || {}));
    const detail = document.getElementById("detail");
    detail.dataset.id = r.id;
    detail.replaceChildren(el("div", {}, figure), side);
  }

  figure(r, m) {
    const img = el("img", { id: "detail-img", src: `/archive/${r.id}${this.overlay && r.has_overlay ? ".overlay" : ""}.jpg`, alt: m.frame_id, "data-view": this.overlay && r.has_overlay ? "overlay" : "clean" });
    const box = svg("svg", { viewBox: "0 0 900 900", "aria-hidden": "true" });
    const bbox = m.anomaly?.region?.bbox;
    if (bbox) box.append(svg("rect", { class: "box", x: bbox[0], y: bbox[1], width: bbox[2], height: bbox[3], "data-testid": "region" }));
    const toggle = el("button", { type: "button", id: "toggle-overlay", disabled: !r.has_overlay, onclick: () => this.toggleOverlay() },
      this.overlay && r.has_overlay ? "Show clean image" : "Show anomaly overlay", el("kbd", { text: "o" }));
    return el("div", {}, el("div", { class: "figure" }, img, box),
      el("div", { class: "figure-tools" }, toggle, el("span", { class: "muted small", text: bbox ? `region ${bbox.join(", ")} (x, y, w, h in the 900×900 view)` : "no anomalous region" })));
  }

  toggleOverlay() {
    this.overlay = !this.overlay;
    if (this.current) this.renderDetail(this.current);
  }

  meter(a) {
    const top = Math.max(a.score, a.threshold) * 1.25 || 1;
    const fill = el("div", { class: a.score > a.threshold ? "fill over" : "fill" });
    const mark = el("div", { class: "mark", title: `threshold ${a.threshold}` });
    fill.style.width = `${Math.max(0, (a.score / top) * 100)}%`;
    mark.style.left = `${(a.threshold / top) * 100}%`;
    return el("div", {}, el("div", { text: `Anomaly score ${score(a.score)} against threshold ${score(a.threshold)}` }),
      el("div", { class: "meter", "data-testid": "score-meter" }, fill, mark));
  }

  probabilities(c) {
    const rows = Object.entries(c.scores || {}).sort((a, b) => b[1] - a[1]).map(([k, p]) => {
      const bar = el("div", { class: "bar" });
      bar.style.width = `${Math.max(1, p * 100)}%`;
      return el("tr", { class: k === c.label ? "best" : "" }, el("th", { text: k }), el("td", { text: `${num(p * 100, 1)} %` }), el("td", {}, bar));
    });
    return el("table", { class: "probs", "data-testid": "probabilities" }, el("tbody", {}, rows));
  }

  facts(m) {
    const trigger = m.trigger ? Object.entries(m.trigger).map(([k, v]) => `${k} ${v ?? "–"}`).join(", ") : "none (file source)";
    const rows = [["seq", m.seq], ["frame", m.frame_id], ["run", m.run_id], ["captured", dateTime(m.captured_at)],
      ["published", dateTime(m.published_at)], ["source", m.source], ["camera trigger", trigger],
      ["model", m.model ? `${m.model.name} ${m.model.version}` : "–"], ["truth (replay)", m.truth ?? "–"]];
    return el("table", { class: "facts", "data-testid": "facts" }, el("tbody", {}, rows.map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", { text: String(v ?? "–") })))));
  }

  latencies(l) {
    const keys = Object.keys(l);
    return el("table", { class: "facts" }, el("tbody", {}, keys.map((k) => el("tr", {}, el("th", { text: `latency ${k}` }), el("td", { text: `${num(l[k], 1)} ms` })))));
  }

  reviewBox(r) {
    const reviews = this.state.summary?.reviews || {};
    const status = el("div", { class: "status", "data-testid": "review-status" },
      el("span", { class: `badge ${r.review ? r.review.outcome : "unreviewed"}`, text: outcomeText(r.review?.outcome) + (r.review?.true_class ? `: ${r.review.true_class}` : "") }),
      r.review ? el("span", { class: "muted small", text: ` ${dateTime(r.review.reviewed_at)}` }) : null);
    if (!reviews.enabled || !reviews.writable) {
      return el("div", { class: "review-box" }, status, el("p", { class: "muted small", text: reviews.enabled ? "Read-only page: reviewing needs station ui --review-token-file." : "Reviews are off (station ui --reviews FILE)." }));
    }
    const predicted = r.classes.includes(r.label) ? r.label : null;
    const buttons = [el("button", { type: "button", class: "good", "data-action": "false_reject", onclick: () => this.review("false_reject") }, "False reject", el("kbd", { text: "f" }))];
    if (predicted) buttons.push(el("button", { type: "button", class: "danger", "data-action": "confirm", onclick: () => this.review("confirmed", predicted) }, `Confirm: ${predicted}`, el("kbd", { text: "c" })));
    r.classes.forEach((k, i) => buttons.push(el("button", { type: "button", "data-class": k, onclick: () => this.review("confirmed", k) }, k, el("kbd", { text: String(i + 1) }))));
    if (r.review) buttons.push(el("button", { type: "button", onclick: () => this.review(null) }, "Undo", el("kbd", { text: "u" })));
    return el("div", { class: "review-box" }, status, el("div", { class: "buttons" }, buttons),
      el("p", { class: "muted small", text: "Keys: f false reject · c confirm as predicted · 1–9 confirm as class · u undo · o overlay · j/k older/newer" }),
      el("p", { id: "review-msg", class: "msg" }));
  }

  async review(outcome, trueClass) {
    const r = this.current;
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (!r || !this.state.summary?.reviews?.writable) return;
    if (!token) { this.renderTokenBar(); document.getElementById("token").focus(); return; }
    const response = await fetch(`/api/reviews/${r.id}`, {
      method: "POST", headers: { "Content-Type": "application/json", "X-Review-Token": token },
      body: JSON.stringify({ outcome, true_class: trueClass ?? null }),
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      if (response.status === 403) sessionStorage.removeItem(TOKEN_KEY);
      this.renderTokenBar();
      const msg = document.getElementById("review-msg");
      if (msg) { msg.textContent = body.error || response.statusText; msg.classList.add("error"); }
      return;
    }
    // In the queue a reviewed reject leaves it: on to the next one (older first, as a pass through it goes).
    if (this.queue && outcome !== null) {
      const next = r.older || r.newer;
      if (next) this.showDetail(next, true); else this.showDetail(null, true);
    } else {
      this.showDetail(r.id, this.queue);
    }
  }

  go(direction) {
    const target = this.current?.[direction];
    if (!target) return;
    if (this.queue) this.showDetail(target, true); else location.hash = `#/reject/${target}`;
  }

  onKey(event) {
    if (document.getElementById("view-detail").hidden || !this.current) return;
    if (event.target.closest("input, select, textarea") || event.ctrlKey || event.metaKey || event.altKey) return;
    const r = this.current;
    const key = event.key;
    if (key === "o") this.toggleOverlay();
    else if (key === "j" || key === "ArrowRight") this.go("older");
    else if (key === "k" || key === "ArrowLeft") this.go("newer");
    else if (key === "f") this.review("false_reject");
    else if (key === "c" && r.classes.includes(r.label)) this.review("confirmed", r.label);
    else if (key === "u" && r.review) this.review(null);
    else if (/^[1-9]$/.test(key) && r.classes[Number(key) - 1]) this.review("confirmed", r.classes[Number(key) - 1]);
    else if (key === "Escape" && !this.queue) location.hash = "#/rejects";
    else return;
    event.preventDefault();
  }
}
