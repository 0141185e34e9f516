// What-if: for a threshold and class confidence typed in, what the last N verdicts and the reviewed rejects would do.
import { el, getJSON, num, score } from "./dom.js";

export class WhatIf {
  constructor(state) {
    this.state = state;
    this.form = document.getElementById("whatif-form");
    this.out = document.getElementById("whatif");
    this.form.addEventListener("submit", (event) => { event.preventDefault(); this.compute(); });
  }

  onSummary(summary) {
    // Start from the threshold the station runs with, once, so an engineer edits from there.
    const input = this.form.elements.threshold;
    const t = summary.trends?.scores?.threshold;
    if (!input.value && typeof t === "number") input.value = String(t);
  }

  show() {}

  async compute() {
    const params = new URLSearchParams();
    for (const [key, value] of new FormData(this.form)) if (value) params.set(key, value);
    let r;
    try {
      r = await getJSON(`/api/whatif?${params}`);
    } catch (error) {
      this.out.replaceChildren(el("p", { class: "msg error", text: error.message }));
      return;
    }
    const figure = (n, text, id) => el("div", { "data-testid": id }, el("strong", { text: num(n) }), text);
    this.out.replaceChildren(
      el("p", { text: `Of the last ${num(r.verdicts)} verdicts this page received (${num(r.inspected)} inspected), at threshold ${score(r.threshold)}` +
        (r.class_confidence === null ? " with the class check as the station made it:" : ` and class confidence ${r.class_confidence} (${r.defect_rule === "top_class" ? "top class" : "defect classes' sum"}):`) }),
      el("div", { class: "whatif-figures" },
        figure(r.fail_to_pass, "would pass instead of fail", "fail-to-pass"),
        figure(r.pass_to_fail, "would fail instead of pass", "pass-to-fail"),
        figure(r.false_rejects_passed.length, `of ${r.reviewed.false_reject} reviewed false rejects would pass`, "false-rejects-passed"),
        figure(r.confirmed_let_through.length, `of ${r.reviewed.confirmed} confirmed defects would be let through`, "confirmed-let-through")),
      this.table("Reviewed false rejects it would have passed", r.false_rejects_passed, "list-passed"),
      this.table("Confirmed defects it would have let through", r.confirmed_let_through, "list-let-through"));
  }

  table(title, items, testid) {
    const rows = items.map((i) => el("tr", {},
      el("td", {}, el("a", { href: `#/reject/${i.id}`, text: `#${i.seq}` })), el("td", { text: i.frame_id }),
      el("td", { text: `${i.label ?? "–"} ${typeof i.confidence === "number" ? num(i.confidence * 100) + " %" : ""}` }),
      el("td", { text: score(i.score) }), el("td", { text: i.true_class ?? "" })));
    return el("div", { class: "panel", "data-testid": testid }, el("h2", { text: `${title} (${items.length})` }),
      rows.length ? el("table", {}, el("thead", {}, el("tr", {}, ["seq", "frame", "class", "score", "true class"].map((h) => el("th", { text: h })))), el("tbody", {}, rows))
        : el("p", { class: "muted", text: "none" }));
  }
}
