// The job view and the jobs list. State comes from tool results (the host's, or the view's own calls) and from
// polling job_status while a job runs; the loss history from fts://jobs/{id}/metrics, an evaluation's full report
// from fts://jobs/{id}/eval. Buttons call the same tools an agent would, with the arguments the job's `next`
// steps suggest.

import { lossChart, type Point } from "./chart";
import { h } from "./dom";
import * as f from "./format";
import { Unauthorized } from "./http";
import { resultText, type Server, type ToolResult } from "./server";

const TERMINAL = new Set(["succeeded", "failed", "cancelled", "interrupted"]);
const POLL_MS = 1500;
const RETRY_MS = 5000;
const STATE_LABEL: Record<string, string> = {
  validating: "Validating", queued: "Queued", running: "Running", succeeded: "Succeeded", failed: "Failed",
  cancelled: "Cancelled", interrupted: "Interrupted",
};
const KIND_LABEL: Record<string, string> = {
  train: "Fine-tuning", eval: "Evaluation", merge: "Merge", generate: "Generation", runtime: "Runtime",
};
const EVAL_ROWS: [string, string, "low" | "high", (v: unknown) => string][] = [
  ["Loss", "loss", "low", f.loss],
  ["Perplexity", "perplexity", "low", f.loss],
  ["Exact match", "exact_match", "high", f.percent],
  ["Prefers the chosen answer", "preference_accuracy", "high", f.percent],
  ["Log-likelihood margin", "logp_margin", "high", f.margin],
  ["Format OK", "format_ok", "high", f.percent],
  ["General-text perplexity", "general_text_perplexity", "low", f.loss],
];

type Job = Record<string, any>;
interface Notice {
  kind: "ok" | "error" | "info";
  text: string;
}
export interface Options {
  mode: "host" | "browser";
  /** Browser mode: the job shown changed (the page keeps it in its address). */
  onRoute?: (jobId: string | null) => void;
  /** Browser mode: the server refused the token (or none was given). */
  onUnauthorized?: () => void;
}

/** What an evaluation scores, by name: a training job's adapter by its job, else the folder. */
function subject(spec: Record<string, any>): string {
  const path = String(spec.adapter_dir ?? spec.merged_dir ?? "");
  const parts = path.split(/[\\/]/).filter(Boolean);
  const last = parts[parts.length - 1] ?? "the adapter";
  return last === "adapter" && parts.length > 1 ? parts[parts.length - 2] : last;
}

const placeholder = (v: unknown) => typeof v === "string" && v.startsWith("<") && v.endsWith(">");

export class Controller {
  private jobId: string | null = null;
  private job: Job | null = null;
  private failure: string | null = null; // a tool refused (e.g. start_qlora_job's arguments): its message
  private points: Point[] = [];
  private pointsAt = -1; // the step at which the metrics were last read
  private pointsRead = 0; // when (ms)
  private evalReport: any = null;
  private logTail: string[] = [];
  private jobs: any[] | null = null;
  private notice: Notice | null = null;
  private busy: string | null = null;
  private trail: string[] = [];
  private inputs: Record<string, string> = {};
  private timer: number | undefined;
  private generation = 0;
  private width = 640;

  constructor(private root: HTMLElement, private server: Server, private options: Options) {
    new ResizeObserver(() => {
      const width = this.chartWidth();
      if (Math.abs(width - this.width) > 8) {
        this.width = width;
        this.render();
      }
    }).observe(root);
    this.width = this.chartWidth();
  }

  private chartWidth(): number {
    return Math.max(320, Math.min(this.root.clientWidth || 640, 1100) - 34);
  }

  // ---- what arrives -----------------------------------------------------------------------------------------

  waiting(text: string): void {
    this.root.replaceChildren(h("p", { class: "muted waiting" }, text));
  }

  /** The host passed the tool's arguments: a job id is enough to start watching. */
  toolInput(args: Record<string, unknown> | undefined): void {
    const id = args?.job_id;
    if (typeof id === "string" && !this.job) this.open(id);
    else if (!this.job) this.waiting("Waiting for the tool's answer…");
  }

  /** A tool's answer (the host's, or one of the view's buttons). */
  toolResult(result: ToolResult): void {
    const view = result.structuredContent;
    if (result.isError || !view) {
      this.failure = resultText(result) || "the tool refused";
      this.render();
      return;
    }
    if (typeof view.job_id === "string" && typeof view.state === "string") this.show(view);
  }

  open(jobId: string, from?: string): void {
    if (from && from !== jobId) this.trail.push(from);
    this.reset(jobId);
    this.options.onRoute?.(jobId);
    this.render();
    void this.poll();
  }

  async showList(): Promise<void> {
    this.reset(null);
    this.trail = [];
    this.options.onRoute?.(null);
    this.render();
    const generation = this.generation;
    try {
      const result = await this.server.callTool("list_jobs", { limit: 50 });
      if (generation !== this.generation) return;
      if (result.isError) this.notice = { kind: "error", text: resultText(result) };
      else this.jobs = result.structuredContent?.jobs ?? [];
      this.notice = result.isError ? this.notice : null;
    } catch (error) {
      if (!this.unauthorized(error)) this.notice = { kind: "error", text: `Could not list the jobs: ${error}` };
    }
    if (generation !== this.generation) return;
    this.render();
    if (this.jobs?.some((j) => !TERMINAL.has(j.state))) {
      this.timer = window.setTimeout(() => void this.refreshList(generation), RETRY_MS);
    }
  }

  private async refreshList(generation: number): Promise<void> {
    if (generation === this.generation && this.jobId === null) await this.showList();
  }

  stop(): void {
    this.generation++;
    window.clearTimeout(this.timer);
  }

  private reset(jobId: string | null): void {
    this.stop();
    this.jobId = jobId;
    this.job = null;
    this.failure = null;
    this.points = [];
    this.pointsAt = -1;
    this.pointsRead = 0;
    this.evalReport = null;
    this.logTail = [];
    this.jobs = null;
    this.notice = null;
    this.inputs = {};
  }

  private unauthorized(error: unknown): boolean {
    if (!(error instanceof Unauthorized)) return false;
    this.options.onUnauthorized?.();
    return true;
  }

  // ---- following a job ----------------------------------------------------------------------------------------

  private show(view: Job): void {
    if (view.job_id !== this.jobId) {
      this.reset(view.job_id);
      this.options.onRoute?.(view.job_id);
    }
    this.job = view;
    this.failure = null;
    if (view.log_tail?.length) this.logTail = view.log_tail;
    this.render();
    void this.details(this.generation);
    this.schedule();
  }

  private schedule(): void {
    window.clearTimeout(this.timer);
    if (this.job && !TERMINAL.has(this.job.state)) {
      const generation = this.generation;
      this.timer = window.setTimeout(() => generation === this.generation && void this.poll(), POLL_MS);
    }
  }

  private async poll(): Promise<void> {
    const id = this.jobId;
    if (!id) return;
    const generation = this.generation;
    const failed = this.job?.state === "failed";
    try {
      const result = await this.server.callTool("job_status", { job_id: id, ...(failed ? { log_lines: 20 } : {}) });
      if (generation !== this.generation) return;
      if (result.isError) {
        this.failure = resultText(result);
        this.render();
        return;
      }
      this.show(result.structuredContent);
    } catch (error) {
      if (generation !== this.generation || this.unauthorized(error)) return;
      this.notice = { kind: "error", text: `Lost touch with the server (${error}); trying again` };
      this.render();
      this.timer = window.setTimeout(() => generation === this.generation && void this.poll(), RETRY_MS);
    }
  }

  /** The loss history when the step moved, an evaluation's full report, a failed job's log. */
  private async details(generation: number): Promise<void> {
    const job = this.job;
    if (!job) return;
    const id = job.job_id;
    const step = job.progress?.step ?? 0;
    const wanted: Promise<void>[] = [];
    // a long run's history is read less often: about 4 ms a point apart, between every poll and every 30 s
    const due = Date.now() - this.pointsRead >= Math.min(30_000, Math.max(POLL_MS - 100, this.points.length * 4));
    if (job.kind === "train" && ((step !== this.pointsAt && due) || (TERMINAL.has(job.state) && this.pointsAt !== -2))) {
      this.pointsAt = TERMINAL.has(job.state) ? -2 : step;
      this.pointsRead = Date.now();
      wanted.push(this.server.readResource(`fts://jobs/${id}/metrics`).then((text) => {
        if (text && generation === this.generation) this.points = JSON.parse(text).points ?? [];
      }));
    }
    if (job.kind === "eval" && job.state === "succeeded" && !this.evalReport) {
      this.evalReport = job.artifacts?.evaluation ?? {};
      wanted.push(this.server.readResource(`fts://jobs/${id}/eval`).then((text) => {
        if (text && generation === this.generation) this.evalReport = JSON.parse(text);
      }));
    }
    if (job.state === "failed" && !this.logTail.length) {
      this.logTail = ["…"];
      wanted.push(this.server.callTool("job_status", { job_id: id, log_lines: 20 }).then((r) => {
        if (!r.isError && generation === this.generation) this.logTail = r.structuredContent?.log_tail ?? [];
      }));
    }
    if (!wanted.length) return;
    const results = await Promise.allSettled(wanted);
    if (generation !== this.generation) return;
    const refused = results.find((r) => r.status === "rejected") as PromiseRejectedResult | undefined;
    if (refused && !this.unauthorized(refused.reason)) {
      this.notice = { kind: "error", text: `Could not read the job's figures: ${refused.reason}` };
    }
    this.render();
  }

  // ---- buttons -------------------------------------------------------------------------------------------------

  private async act(action: string, tool: string, args: Record<string, unknown>): Promise<void> {
    if (this.busy) return;
    const from = this.jobId;
    this.busy = action;
    this.notice = null;
    this.render();
    try {
      const result = await this.server.callTool(tool, args);
      const view = result.structuredContent;
      if (result.isError) {
        this.notice = { kind: "error", text: resultText(result) };
      } else if (tool === "deploy_adapter") {
        this.notice = { kind: "ok", text: `Published ${view?.model}${view?.created === false ? " (the same bytes were "
          + "already published: that version)" : ""}. Ask for it as model "${view?.model}".` };
      } else if (view?.job_id) {
        if (view.job_id !== from && from) this.trail.push(from);
        this.busy = null;
        this.show(view);
        if (view.job_id !== from) this.notice = { kind: "info", text: `Started ${view.job_id} from ${from}` };
        this.render();
        return;
      }
    } catch (error) {
      if (!this.unauthorized(error)) this.notice = { kind: "error", text: `${tool} failed: ${error}` };
    }
    this.busy = null;
    this.render();
  }

  private button(action: string, label: string, tool: string, args: () => Record<string, unknown> | null,
    style = "secondary"): HTMLElement {
    const busy = this.busy === action;
    return h("button", {
      type: "button", class: `btn ${style}`, "data-action": action, disabled: !!this.busy,
      onclick: () => {
        const given = args();
        if (given) void this.act(action, tool, given);
      },
    }, busy ? `${label}…` : label);
  }

  private field(key: string, label: string, initial: string, hint: string): HTMLElement {
    this.inputs[key] ??= initial;
    return h("label", { class: "field" }, h("span", {}, label),
      h("input", { type: "text", value: this.inputs[key], placeholder: hint, spellcheck: "false", "data-field": key,
        oninput: (e: Event) => (this.inputs[key] = (e.target as HTMLInputElement).value) }));
  }

  private need(key: string, what: string): string | null {
    const value = (this.inputs[key] ?? "").trim();
    if (!value) {
      this.notice = { kind: "error", text: `Give ${what} first` };
      this.render();
      return null;
    }
    return value;
  }

  private actions(job: Job): HTMLElement | null {
    const next: any[] = job.next ?? [];
    const suggested = (tool: string) => next.find((s) => s.tool === tool)?.arguments as Record<string, unknown>;
    const row: HTMLElement[] = [];
    const fields: HTMLElement[] = [];
    if (!TERMINAL.has(job.state)) {
      const asked = job.process?.cancel_requested;
      row.push(this.button("cancel", asked ? "Cancelling" : "Cancel", "cancel_job", () => ({ job_id: job.job_id }),
        "danger"));
    }
    if (job.resumable) {
      row.push(this.button("resume", "Resume", "resume_job", () => ({ job_id: job.job_id }), "primary"));
    }
    if (job.kind === "train" && job.state === "succeeded") {
      // the server's suggestion names the held-out split when the job kept one, else a placeholder to fill
      const evaluate = suggested("evaluate_adapter") ?? { adapter: job.job_id, dataset: "<held-out JSONL>" };
      const needsData = placeholder(evaluate.dataset);
      if (needsData) fields.push(this.field("dataset", "Held-out data", "", "held-out JSONL (a path in the roots)"));
      row.push(this.button("evaluate", "Evaluate", "evaluate_adapter", () => {
        if (!needsData) return evaluate;
        const dataset = this.need("dataset", "a held-out JSONL file to evaluate on");
        return dataset ? { ...evaluate, dataset } : null;
      }, "primary"));
      row.push(this.button("merge", "Merge", "merge_adapter", () => ({ adapter: job.job_id })));
    }
    const deploy = suggested("deploy_adapter");
    if (deploy && job.state === "succeeded" && !placeholder(deploy.adapter)) {
      fields.push(this.field("name", "Store name", placeholder(deploy.name) ? "" : String(deploy.name ?? ""),
        "lowercase name"));
      row.push(this.button("deploy", "Deploy", "deploy_adapter", () => {
        const name = this.need("name", "a store name");
        return name ? { ...deploy, name } : null;
      }));
    }
    const merge = suggested("merge_adapter");
    if (job.kind === "eval" && merge && !placeholder(merge.adapter)) {
      row.push(this.button("merge", "Merge", "merge_adapter", () => merge));
    }
    if (!row.length) return null;
    const hint = job.error ? null : next.find((s) => s.why && s.tool !== "job_status");
    return h("section", { class: "actions card" }, fields.length ? h("div", { class: "fields" }, ...fields) : null,
      h("div", { class: "buttons" }, ...row),
      hint ? h("p", { class: "hint muted" }, "Suggested next: ", h("span", { class: "mono" }, hint.tool), ` — ${hint.why}`)
        : null);
  }

  // ---- rendering ---------------------------------------------------------------------------------------------------

  render(): void {
    const body: Node[] = [this.nav()];
    if (this.notice) body.push(h("p", { class: `notice ${this.notice.kind}`, role: "status" }, this.notice.text));
    if (this.jobId === null && this.jobs !== null) body.push(...this.listView());
    else if (this.job) body.push(...this.jobView(this.job));
    else if (this.failure) body.push(h("section", { class: "card error" }, h("h2", {}, "The tool refused"),
      h("p", { class: "message" }, this.failure)));
    else body.push(h("p", { class: "muted waiting" }, this.jobId ? `Loading ${this.jobId}…` : "Loading…"));
    const scrollY = window.scrollY;
    this.root.replaceChildren(...body);
    window.scrollTo({ top: scrollY });
  }

  private nav(): HTMLElement {
    const back = this.trail[this.trail.length - 1];
    return h("nav", { class: "nav" },
      h("span", { class: "brand" }, "fts-mcp"),
      h("span", { class: "spacer" }),
      back ? h("a", { href: "#", "data-action": "back", onclick: (e: Event) => {
        e.preventDefault();
        this.trail.pop();
        this.open(back);
        this.options.onRoute?.(back);
      } }, `← ${back}`) : null,
      this.jobId !== null || this.jobs === null ? h("a", { href: "#", "data-action": "list", onclick: (e: Event) => {
        e.preventDefault();
        void this.showList();
      } }, "All jobs") : null);
  }

  private listView(): Node[] {
    const jobs = this.jobs ?? [];
    const rows = jobs.map((j) => h("tr", { class: "row", tabindex: 0, "data-job": j.job_id,
      onclick: () => this.open(j.job_id),
      onkeydown: (e: Event) => (e as KeyboardEvent).key === "Enter" && this.open(j.job_id) },
    h("td", {}, h("div", { class: "name" }, j.name ?? KIND_LABEL[j.kind] ?? j.kind), h("div", { class: "mono muted" }, j.job_id)),
    h("td", {}, KIND_LABEL[j.kind] ?? j.kind),
    h("td", {}, h("span", { class: `pill ${j.state}` }, STATE_LABEL[j.state] ?? j.state)),
    h("td", { class: "num" }, j.step ?? "–"),
    h("td", { class: "num" }, f.loss(j.loss)),
    h("td", { class: "muted" }, f.when(j.created_at))));
    return [
      h("header", { class: "head" }, h("div", { class: "title" }, h("h1", {}, "Jobs")),
        h("div", { class: "sub" }, `${jobs.length} on this host, newest first`)),
      jobs.length
        ? h("section", { class: "card flush" }, h("table", { class: "jobs" },
          h("thead", {}, h("tr", {}, ...["Job", "Kind", "State", "Step", "Loss", "Created"].map((t) =>
            h("th", { class: t === "Step" || t === "Loss" ? "num" : "" }, t)))),
          h("tbody", {}, ...rows)))
        : h("section", { class: "card" }, h("p", { class: "muted" },
          "No jobs yet. An agent starts one with start_qlora_job; it appears here as it runs.")),
    ];
  }

  private jobView(job: Job): Node[] {
    const p = job.progress ?? {};
    const spec = job.spec ?? {};
    const title = spec.output_name ?? (job.kind === "eval" ? `Evaluation of ${subject(spec)}`
      : KIND_LABEL[job.kind] ?? job.kind);
    const out: Node[] = [
      h("header", { class: "head" },
        h("div", { class: "title" },
          h("h1", {}, title),
          h("span", { class: `pill ${job.state}`, "data-state": job.state }, STATE_LABEL[job.state] ?? job.state)),
        h("div", { class: "sub" }, h("span", { class: "kind" }, KIND_LABEL[job.kind] ?? job.kind),
          h("span", { class: "mono" }, job.job_id),
          spec.base_model ? h("span", { title: spec.base_model }, `on ${f.short(spec.base_model)}`) : null,
          spec.dataset ? h("span", { title: spec.dataset }, `with ${f.short(spec.dataset)}`) : null)),
    ];
    if (job.kind === "train") out.push(...this.trainingView(job, p));
    else if (job.kind === "eval") out.push(...this.evalView(job, p));
    else out.push(this.progressLine(job, p));
    if (job.error) out.push(this.errorCard(job));
    const actions = this.actions(job);
    if (actions) out.push(actions);
    out.push(this.detailsCard(job));
    return out;
  }

  private progressLine(job: Job, p: Record<string, any>): HTMLElement {
    const total = f.num(p.total_steps);
    const step = f.num(p.step) ?? 0;
    const share = total ? Math.min(1, step / total) : job.state === "succeeded" ? 1 : 0;
    const running = job.state === "running";
    const bits: (string | null)[] = [];
    if (total) bits.push(`step ${step} of ${total}`);
    if (running && p.phase && p.phase !== "training") bits.push(p.phase.replace(/_/g, " "));
    if (running && f.num(p.eta_seconds) !== null) bits.push(`about ${f.duration(p.eta_seconds)} left`);
    if (job.times?.started) bits.push(`${TERMINAL.has(job.state) ? "took" : "running for"} ${f.since(job.times.started, job.times.finished)}`);
    if (job.state === "queued" && p.waiting) bits.push(String(p.waiting));
    return h("section", { class: "progress" },
      h("div", { class: `bar ${job.state}`, role: "progressbar", "aria-valuemin": 0, "aria-valuemax": total ?? 1,
        "aria-valuenow": total ? step : share },
      h("div", { class: "fill", style: `width:${(share * 100).toFixed(1)}%` })),
      h("div", { class: "progress-text muted" }, bits.filter(Boolean).join(" · ") || STATE_LABEL[job.state]));
  }

  private trainingView(job: Job, p: Record<string, any>): Node[] {
    const lastLogged = [...this.points].reverse().find((pt) => typeof pt.loss === "number");
    const stat = (label: string, value: string, key: string) =>
      h("div", { class: "stat", "data-stat": key }, h("div", { class: "label" }, label), h("div", { class: "value" }, value));
    const tracking = p.tracking as Record<string, any> | undefined;
    const cards: Node[] = [
      this.progressLine(job, p),
      h("section", { class: "stats" },
        stat("Loss", f.loss(p.loss ?? lastLogged?.loss), "loss"),
        stat("Eval loss", f.loss(p.eval_loss), "eval_loss"),
        stat("Learning rate", f.lr(p.learning_rate ?? lastLogged?.learning_rate), "learning_rate"),
        stat("Tokens / s", f.rate(p.tokens_per_second), "tokens_per_second"),
        stat("Epoch", f.num(p.epoch) === null ? "–" : (p.epoch as number).toFixed(2), "epoch"),
        // preference tuning (method "dpo"): how often the chosen answer is rewarded above the rejected one
        ...(f.num(p.preference_accuracy) === null ? [] : [
          stat("Preference accuracy", f.percent(p.preference_accuracy), "preference_accuracy"),
          stat("Reward margin", f.margin(p.reward_margin), "reward_margin")]),
        ...(f.num(p.eval_preference_accuracy) === null ? [] : [
          stat("Held-out preference", f.percent(p.eval_preference_accuracy), "eval_preference_accuracy"),
          stat("Held-out margin", f.margin(p.eval_reward_margin), "eval_reward_margin")])),
      h("section", { class: "card chart-card" },
        h("div", { class: "card-head" }, h("h2", {}, "Loss"), h("span", { class: "muted" },
          this.points.length ? `${this.points.filter((pt) => typeof pt.loss === "number").length} logged steps` : "")),
        lossChart(this.points, f.num(p.total_steps), this.width)),
    ];
    const choices: string[] = job.spec?.choices ?? [];
    if (p.plan || choices.length) {
      cards.push(h("section", { class: "card plan" }, h("h2", {}, "The plan this job chose"),
        p.plan ? h("p", { class: "mono plan-line" }, p.plan) : null,
        choices.length ? h("ul", {}, ...choices.map((c) => h("li", {}, c))) : null));
    }
    if (tracking && Object.keys(tracking).length) {
      cards.push(h("section", { class: "card" }, h("h2", {}, "Experiment tracking"),
        h("dl", { class: "kv" }, ...Object.entries(tracking).flatMap(([name, info]) => [
          h("dt", {}, name), h("dd", { class: "mono" }, typeof info === "object" && info
            ? Object.entries(info).map(([k, v]) => `${k}: ${v}`).join(" · ") : String(info))]))));
    }
    return cards;
  }

  private evalView(job: Job, p: Record<string, any>): Node[] {
    const report = this.evalReport ?? job.artifacts?.evaluation;
    if (!report || !report.base) return [this.progressLine(job, p)];
    const better = !!report.better;
    const out: Node[] = [
      h("section", { class: `verdict ${better ? "better" : "worse"}`, "data-better": String(better) },
        h("div", { class: "verdict-title" }, better ? "Better than the base" : "Not better than the base"),
        h("div", { class: "verdict-text" }, report.summary ?? ""),
        report.examples ? h("div", { class: "muted" }, `${report.examples} held-out examples`) : null),
    ];
    const rows = EVAL_ROWS.filter(([, key]) => report.base?.[key] != null || report.adapter?.[key] != null).map(
      ([label, key, goal, fmt]) => {
        const a = f.num(report.base?.[key]);
        const b = f.num(report.adapter?.[key]);
        const win = a === null || b === null || a === b ? null : (goal === "low" ? b < a : b > a) ? "adapter" : "base";
        return h("tr", {}, h("th", {}, label),
          h("td", { class: `num ${win === "base" ? "win" : ""}` }, fmt(a)),
          h("td", { class: `num ${win === "adapter" ? "win" : ""}` }, fmt(b)));
      });
    out.push(h("section", { class: "card flush" }, h("table", { class: "compare", "data-testid": "eval-table" },
      h("thead", {}, h("tr", {}, h("th", {}, ""), h("th", { class: "num" }, "Base"), h("th", { class: "num" }, "Adapter"))),
      h("tbody", {}, ...rows))));
    const advice: string[] = Array.isArray(report.advice) ? report.advice : report.advice ? [String(report.advice)] : [];
    if (advice.length) out.push(h("section", { class: "card advice" }, h("h2", {}, "Advice"),
      h("ul", {}, ...advice.map((a) => h("li", {}, a)))));
    const samples: any[] = report.samples ?? [];
    if (samples.length && samples[0].chosen !== undefined) {  // preference pairs: which answer each model favours
      const favours = (m: unknown) => (f.num(m) ?? 0) > 0 ? "chosen ✓" : "rejected";
      out.push(h("section", { class: "samples" }, h("h2", {}, "Sample pairs"),
        ...samples.map((sample) => h("article", { class: "card sample" },
          h("div", { class: "prompt" }, h("span", { class: "label" }, "Prompt"), h("pre", {}, sample.prompt)),
          h("div", { class: "answers" },
            h("div", { class: "answer right" }, h("span", { class: "label" }, "Chosen"), h("pre", {}, sample.chosen)),
            h("div", { class: "answer" }, h("span", { class: "label" }, "Rejected"), h("pre", {}, sample.rejected))),
          h("div", { class: "muted" }, `log-likelihood margin: base ${f.margin(sample.base_logp_margin)} (favours `
            + `${favours(sample.base_logp_margin)}), adapter ${f.margin(sample.adapter_logp_margin)} (favours `
            + `${favours(sample.adapter_logp_margin)})`)))));
    } else if (samples.length) {
      const same = (answer: unknown, expected: unknown) => String(answer ?? "").trim() === String(expected ?? "").trim();
      out.push(h("section", { class: "samples" }, h("h2", {}, "Sample answers"),
        ...samples.map((sample) => h("article", { class: "card sample" },
          h("div", { class: "prompt" }, h("span", { class: "label" }, "Prompt"), h("pre", {}, sample.prompt)),
          h("div", { class: "expected" }, h("span", { class: "label" }, "Expected"), h("pre", {}, sample.expected)),
          h("div", { class: "answers" },
            ...(["base", "adapter"] as const).map((side) => h("div", { class: `answer ${same(sample[side], sample.expected) ? "right" : ""}` },
              h("span", { class: "label" }, side === "base" ? "Base" : "Adapter", same(sample[side], sample.expected) ? " ✓" : ""),
              h("pre", {}, sample[side] || "(empty)"))))))));
    }
    return out;
  }

  private errorCard(job: Job): HTMLElement {
    const error = job.error ?? {};
    const fixes = (job.next ?? []).filter((s: any) => s.why);
    const log = this.logTail.filter((l) => l !== "…");
    return h("section", { class: "card error", "data-testid": "error" },
      h("h2", {}, "What went wrong"),
      h("p", { class: "message" }, h("span", { class: "mono code" }, error.code ?? "error"), " ", error.message ?? ""),
      error.param ? h("p", { class: "muted" }, `argument: ${error.param}`) : null,
      fixes.length ? h("div", { class: "fix" }, h("h3", {}, "How to fix it"), h("ul", {},
        ...fixes.map((s: any) => h("li", {}, h("span", { class: "mono" }, s.tool), ": ", s.why)))) : null,
      log.length ? h("details", {}, h("summary", {}, "Last lines of the log"), h("pre", { class: "log" }, log.join("\n"))) : null);
  }

  private detailsCard(job: Job): HTMLElement {
    const spec = job.spec ?? {};
    const art = job.artifacts ?? {};
    const rows: [string, unknown][] = [
      ["Created", f.when(job.times?.created)], ["Started", f.when(job.times?.started)],
      ["Finished", f.when(job.times?.finished)],
      ["Method", spec.method === "dpo" ? "preference tuning (DPO)" : spec.method === "sft" ? "supervised (SFT)" : undefined],
      ["Quantization", spec.quantization], ["LoRA rank", spec.lora_r],
      ["Max steps", spec.max_steps], ["Epochs", spec.epochs], ["Batch size", spec.batch_size],
      ["Base model", spec.base_model], ["Dataset", spec.dataset], ["Adapter", art.adapter_dir ?? spec.adapter_dir],
      ["Merged model", art.output_dir ?? spec.merged_dir], ["Checkpoint", art.checkpoint_dir],
      ["Device", job.process?.slot],
    ];
    return h("section", { class: "card details" }, h("h2", {}, "Details"),
      h("dl", { class: "kv" }, ...rows.filter(([, v]) => v !== undefined && v !== null && v !== "" && v !== "–")
        .flatMap(([k, v]) => [h("dt", {}, k), h("dd", { class: typeof v === "string" && v.includes("/") ? "mono" : "" }, String(v))])));
  }
}
