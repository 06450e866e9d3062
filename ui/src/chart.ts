// The loss curve as SVG: training loss as a line over the steps, eval loss as marked points, axes with round
// ticks, and a guide that follows the pointer. No chart library: the page must stay one self-contained file.

import { s } from "./dom";
import { loss as fmtLoss } from "./format";

export interface Point {
  step: number;
  loss?: number;
  eval_loss?: number;
  learning_rate?: number;
  tokens_per_second?: number;
}

const HEIGHT = 240;
const M = { left: 54, right: 18, top: 18, bottom: 34 };

/** About `count` round tick values (1, 2 or 5 times a power of ten) covering [lo, hi]. */
export function ticks(lo: number, hi: number, count: number): number[] {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / Math.max(1, count);
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((f) => f * power).find((f) => f >= raw) ?? raw;
  const out: number[] = [];
  for (let v = Math.ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

function label(value: number): string {
  return Math.abs(value) >= 1000 ? value.toLocaleString("en-US") : String(Number(value.toPrecision(4)));
}

/** At most about `most` points: each run of consecutive points becomes one at their mean step and loss. */
export function thin(points: Point[], most: number): Point[] {
  if (points.length <= most) return points;
  const size = Math.ceil(points.length / most);
  const out: Point[] = [];
  for (let i = 0; i < points.length; i += size) {
    const run = points.slice(i, i + size);
    out.push({ step: Math.round(run.reduce((a, p) => a + p.step, 0) / run.length),
      loss: run.reduce((a, p) => a + (p.loss as number), 0) / run.length });
  }
  out[out.length - 1] = points[points.length - 1]; // the latest figure as logged
  return out;
}

export function lossChart(points: Point[], totalSteps: number | null, width: number): SVGElement {
  const W = Math.max(320, Math.round(width));
  const logged = points.filter((p) => typeof p.loss === "number").sort((a, b) => a.step - b.step);
  const train = thin(logged, Math.max(200, Math.round(W)));
  const evals = points.filter((p) => typeof p.eval_loss === "number").sort((a, b) => a.step - b.step);
  const svg = s("svg", {
    class: "chart", width: W, height: HEIGHT, viewBox: `0 0 ${W} ${HEIGHT}`, role: "img",
    "aria-label": `Loss curve: ${logged.length} training points, ${evals.length} eval points`,
    "data-points": logged.length, "data-eval-points": evals.length,
  });
  const plotW = W - M.left - M.right;
  const plotH = HEIGHT - M.top - M.bottom;
  if (!train.length && !evals.length) {
    svg.append(s("rect", { x: M.left, y: M.top, width: plotW, height: plotH, class: "plot-empty", rx: 8 }),
      s("text", { x: M.left + plotW / 2, y: M.top + plotH / 2, class: "empty-note", "text-anchor": "middle" },
        "The curve appears with the first logged step"));
    return svg;
  }
  const values = [...train.map((p) => p.loss as number), ...evals.map((p) => p.eval_loss as number)];
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  const pad = (hi - lo || Math.abs(hi) || 1) * 0.08;
  lo = Math.max(0, lo - pad);
  hi += pad;
  const lastStep = Math.max(...points.map((p) => p.step), 1);
  // the whole run once a good part of it is in; before that, the steps so far (and a margin), or the start of a
  // long run would be a line squeezed against the axis
  const xMax = totalSteps && lastStep >= totalSteps * 0.3 ? Math.max(totalSteps, lastStep)
    : Math.max(lastStep + 1, Math.ceil(lastStep * 1.15));
  const x = (step: number) => M.left + (step / xMax) * plotW;
  const y = (v: number) => M.top + (1 - (v - lo) / (hi - lo)) * plotH;

  const defs = s("defs", {}, s("linearGradient", { id: "fts-area", x1: 0, y1: 0, x2: 0, y2: 1 },
    s("stop", { offset: "0%", class: "area-top" }), s("stop", { offset: "100%", class: "area-bottom" })));
  svg.append(defs);
  const grid = s("g", { class: "grid" });
  const yTicks = ticks(lo, hi, 5).filter((t) => t >= lo && t <= hi);
  for (const t of yTicks) {
    grid.append(s("line", { x1: M.left, x2: W - M.right, y1: y(t), y2: y(t) }),
      s("text", { x: M.left - 8, y: y(t) + 4, "text-anchor": "end", class: "tick" }, label(t)));
  }
  const xTicks = ticks(0, xMax, Math.max(2, Math.floor(plotW / 90))).filter((t) => Number.isInteger(t));
  for (const t of xTicks) {
    grid.append(s("line", { x1: x(t), x2: x(t), y1: HEIGHT - M.bottom, y2: HEIGHT - M.bottom + 4, class: "tick-mark" }),
      s("text", { x: x(t), y: HEIGHT - M.bottom + 17, "text-anchor": "middle", class: "tick" }, label(t)));
  }
  grid.append(s("line", { x1: M.left, x2: W - M.right, y1: HEIGHT - M.bottom, y2: HEIGHT - M.bottom, class: "axis" }),
    s("text", { x: W - M.right, y: HEIGHT - 4, "text-anchor": "end", class: "axis-label" }, "step"),
    s("text", { x: 12, y: M.top + plotH / 2, class: "axis-label", "text-anchor": "middle",
      transform: `rotate(-90 12 ${M.top + plotH / 2})` }, "loss"));
  svg.append(grid);

  if (train.length) {
    const line = train.map((p, i) => `${i ? "L" : "M"}${x(p.step).toFixed(1)},${y(p.loss as number).toFixed(1)}`).join("");
    const base = y(lo);
    svg.append(s("path", { d: `${line}L${x(train[train.length - 1].step).toFixed(1)},${base}L${x(train[0].step).toFixed(1)},${base}Z`,
      class: "area", fill: "url(#fts-area)" }),
    s("path", { d: line, class: "line train" }));
    const last = train[train.length - 1];
    svg.append(s("circle", { cx: x(last.step), cy: y(last.loss as number), r: 3.5, class: "dot train" }));
  }
  if (evals.length) {
    const line = evals.map((p, i) => `${i ? "L" : "M"}${x(p.step).toFixed(1)},${y(p.eval_loss as number).toFixed(1)}`).join("");
    if (evals.length > 1) svg.append(s("path", { d: line, class: "line eval" }));
    for (const p of evals) svg.append(s("circle", { cx: x(p.step), cy: y(p.eval_loss as number), r: 4, class: "dot eval" }));
  }
  const legend = s("g", { class: "legend", transform: `translate(${W - M.right - 190},${M.top - 6})` });
  legend.append(s("line", { x1: 0, x2: 18, y1: 0, y2: 0, class: "line train" }),
    s("text", { x: 24, y: 4 }, "training loss"));
  if (evals.length) {
    legend.append(s("circle", { cx: 112, cy: 0, r: 4, class: "dot eval" }), s("text", { x: 122, y: 4 }, "eval loss"));
  }
  svg.append(legend);
  svg.append(pointerGuide(train, evals, x, y, { W, plotH }));
  return svg;
}

/** A vertical guide and a label with the nearest logged step's figures, following the pointer. */
function pointerGuide(train: Point[], evals: Point[], x: (n: number) => number, y: (n: number) => number,
  size: { W: number; plotH: number }): SVGElement {
  const group = s("g", { class: "guide", visibility: "hidden" });
  const rule = s("line", { y1: M.top, y2: M.top + size.plotH });
  const dot = s("circle", { r: 4.5, class: "dot train" });
  const box = s("rect", { rx: 6, height: 22, class: "guide-box" });
  const text = s("text", { class: "guide-text" });
  group.append(rule, dot, box, text);
  const all = [...train, ...evals];
  const overlay = s("rect", { x: M.left, y: M.top, width: size.W - M.left - M.right, height: size.plotH,
    class: "overlay" });
  overlay.addEventListener("mouseleave", () => group.setAttribute("visibility", "hidden"));
  overlay.addEventListener("mousemove", (event) => {
    const rect = (overlay.ownerSVGElement as SVGSVGElement).getBoundingClientRect();
    const px = ((event as MouseEvent).clientX - rect.left) * (size.W / rect.width);
    let best = all[0];
    for (const p of all) if (Math.abs(x(p.step) - px) < Math.abs(x(best.step) - px)) best = p;
    const near = train.find((p) => p.step === best.step);
    const ev = evals.find((p) => p.step === best.step);
    const parts = [`step ${best.step}`];
    if (near) parts.push(`loss ${fmtLoss(near.loss)}`);
    if (ev) parts.push(`eval ${fmtLoss(ev.eval_loss)}`);
    const cx = x(best.step);
    const cy = y((near?.loss ?? ev?.eval_loss) as number);
    rule.setAttribute("x1", String(cx));
    rule.setAttribute("x2", String(cx));
    dot.setAttribute("cx", String(cx));
    dot.setAttribute("cy", String(cy));
    text.textContent = parts.join(" · ");
    const width = parts.join(" · ").length * 6.6 + 16;
    const left = Math.min(Math.max(cx - width / 2, M.left), size.W - M.right - width);
    box.setAttribute("x", String(left));
    box.setAttribute("y", String(M.top + 2));
    box.setAttribute("width", String(width));
    text.setAttribute("x", String(left + 8));
    text.setAttribute("y", String(M.top + 17));
    group.setAttribute("visibility", "visible");
  });
  return s("g", {}, group, overlay);
}
