// How figures read: losses to four significant digits, rates with separators, durations in words.

export function num(value: unknown): number | null {
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

export function loss(value: unknown): string {
  const v = num(value);
  return v === null ? "–" : v.toPrecision(4);
}

export function rate(value: unknown): string {
  const v = num(value);
  if (v === null) return "–";
  return v >= 100 ? Math.round(v).toLocaleString("en-US") : v.toPrecision(3);
}

export function lr(value: unknown): string {
  const v = num(value);
  if (v === null) return "–";
  if (v === 0) return "0";
  return v >= 0.01 ? v.toPrecision(3) : v.toExponential(2).replace("e-", "e−");
}

export function margin(value: unknown): string {
  const v = num(value);
  return v === null ? "–" : `${v > 0 ? "+" : v < 0 ? "−" : ""}${Math.abs(v).toFixed(2)}`;
}

export function percent(value: unknown): string {
  const v = num(value);
  return v === null ? "–" : `${(v * 100).toFixed(v === 1 || v === 0 ? 0 : 1)}%`;
}

export function duration(seconds: unknown): string {
  const v = num(seconds);
  if (v === null) return "–";
  const s = Math.max(0, Math.round(v));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${s % 60 ? `${s % 60} s` : ""}`.trim();
  const hours = Math.floor(m / 60);
  return `${hours} h ${m % 60 ? `${m % 60} min` : ""}`.trim();
}

export function when(iso: unknown): string {
  if (typeof iso !== "string" || !iso) return "–";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return iso;
  return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

export function since(startIso: unknown, endIso: unknown): string {
  if (typeof startIso !== "string") return "–";
  const end = typeof endIso === "string" ? new Date(endIso).getTime() : Date.now();
  return duration((end - new Date(startIso).getTime()) / 1000);
}

/** The last part of a path or reference, for headings (the whole value stays in a title attribute). */
export function short(value: unknown): string {
  if (typeof value !== "string") return "";
  const parts = value.split(/[\\/]/).filter(Boolean);
  return parts[parts.length - 1] ?? value;
}
