// The trend charts, drawn as inline SVG: yield per hour, and the anomaly-score distribution against the threshold.
import { svg } from "./dom.js";

const W = 420, H = 170, PAD_L = 30, PAD_B = 22, PAD_T = 8;

function frame(container, key) {
  // Redraw only when the data changed: the summary arrives every second.
  if (container.dataset.key === key) return null;
  container.dataset.key = key;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  container.replaceChildren(root);
  return root;
}

function axes(root, yLabel) {
  root.append(svg("line", { class: "axis", x1: PAD_L, y1: H - PAD_B, x2: W - 4, y2: H - PAD_B }));
  root.append(svg("line", { class: "axis", x1: PAD_L, y1: PAD_T, x2: PAD_L, y2: H - PAD_B }));
  root.append(svg("text", { x: 2, y: PAD_T + 8, text: yLabel }));
}

export function yieldChart(container, hours) {
  const root = frame(container, JSON.stringify(hours));
  if (!root) return;
  axes(root, "100%");
  root.append(svg("text", { x: 2, y: H - PAD_B, text: "0%" }));
  if (!hours.length) {
    root.append(svg("text", { x: W / 2 - 60, y: H / 2, text: "no bottles seen yet" }));
    return;
  }
  const slot = (W - PAD_L - 8) / Math.max(hours.length, 6);
  const plotH = H - PAD_B - PAD_T;
  hours.forEach((h, i) => {
    const x = PAD_L + 4 + i * slot;
    const y = h.yield_pct === null ? 0 : (h.yield_pct / 100) * plotH;
    const bar = svg("rect", { class: "bar good", x, y: H - PAD_B - y, width: Math.max(2, slot - 4), height: y });
    const hour = new Date(h.hour * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hour12: false });
    bar.append(svg("title", { text: `${hour}: yield ${h.yield_pct ?? "–"} % (${h.passed} passed, ${h.failed} failed, ${h.skipped} skipped)` }));
    root.append(bar);
    if (h.yield_pct !== null) root.append(svg("text", { x: x + 1, y: H - PAD_B - y - 3, text: `${Math.round(h.yield_pct)}` }));
    if (hours.length <= 12 || i % 3 === 0) root.append(svg("text", { x, y: H - 6, text: hour.slice(0, 2) + "h" }));
  });
}

export function scoreChart(container, hist) {
  const root = frame(container, JSON.stringify(hist));
  if (!root) return;
  axes(root, "n");
  if (!hist.n) {
    root.append(svg("text", { x: W / 2 - 60, y: H / 2, text: "no scores yet" }));
    return;
  }
  const bins = hist.bins, top = Math.max(...bins, 1);
  const plotW = W - PAD_L - 8, plotH = H - PAD_B - PAD_T;
  const width = plotW / bins.length;
  const span = hist.hi - hist.lo || 1;
  const xOf = (value) => PAD_L + 4 + ((value - hist.lo) / span) * plotW;
  bins.forEach((count, i) => {
    const lo = hist.lo + (i * span) / bins.length;
    const h = (count / top) * plotH;
    const over = hist.threshold !== null && lo >= hist.threshold;
    const bar = svg("rect", { class: over ? "bar over" : "bar", x: PAD_L + 4 + i * width, y: H - PAD_B - h,
                              width: Math.max(1, width - 1), height: h });
    bar.append(svg("title", { text: `${count} bottles scored ${lo.toPrecision(3)}…${(lo + span / bins.length).toPrecision(3)}` }));
    root.append(bar);
  });
  root.append(svg("text", { x: PAD_L, y: H - 6, text: hist.lo.toPrecision(2) }));
  root.append(svg("text", { x: W - 40, y: H - 6, text: hist.hi.toPrecision(2) }));
  if (hist.threshold !== null) {
    const x = xOf(hist.threshold);
    root.append(svg("line", { class: "threshold", x1: x, y1: PAD_T, x2: x, y2: H - PAD_B }));
    root.append(svg("text", { x: Math.min(x + 4, W - 150), y: PAD_T + 10,
                              text: `threshold ${hist.threshold.toPrecision(3)}: ${hist.above} of ${hist.n} above` }));
  }
}
