// The page served at /ui talks MCP to the same server: JSON-RPC POSTed to /mcp on its own origin, with the bearer
// token in the Authorization header (never in a URL). Streamable HTTP's handshake protocol (2025-11-25): one
// `initialize`, then requests carrying the session id; a session the server has closed (404) is opened again.

import type { Server, ToolResult } from "./server";

export class Unauthorized extends Error {}

const PROTOCOL = "2025-11-25";

interface Message {
  id?: number;
  result?: any;
  error?: { code: number; message: string };
}

/** The JSON-RPC response with `id` from a JSON body or from the events of an SSE body. */
async function responseTo(response: Response, id: number): Promise<Message> {
  const text = await response.text();
  if (!(response.headers.get("content-type") ?? "").includes("text/event-stream")) return JSON.parse(text);
  for (const event of text.split(/\r?\n\r?\n/)) {
    const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
    if (!data) continue;
    const message = JSON.parse(data) as Message;
    if (message.id === id) return message;
  }
  throw new Error("the server's answer carried no response");
}

export class HttpServer implements Server {
  private session: string | null = null;
  private opening: Promise<void> | null = null;
  private nextId = 1;

  constructor(private endpoint: string, private token: () => string | null) {}

  private async post(body: object): Promise<Response> {
    const headers: Record<string, string> = {
      "Content-Type": "application/json",
      Accept: "application/json, text/event-stream",
    };
    const token = this.token();
    if (token) headers.Authorization = `Bearer ${token}`;
    if (this.session) {
      headers["Mcp-Session-Id"] = this.session;
      headers["MCP-Protocol-Version"] = PROTOCOL;
    }
    const response = await fetch(this.endpoint, { method: "POST", headers, body: JSON.stringify(body),
      credentials: "omit", cache: "no-store" });
    if (response.status === 401) throw new Unauthorized("the server wants its bearer token");
    return response;
  }

  private async open(): Promise<void> {
    this.session = null;
    const id = this.nextId++;
    const response = await this.post({ jsonrpc: "2.0", id, method: "initialize", params: {
      protocolVersion: PROTOCOL, capabilities: {}, clientInfo: { name: "fts-mcp /ui", version: "1" } } });
    if (!response.ok) throw new Error(`initialize: HTTP ${response.status}: ${(await response.text()).slice(0, 300)}`);
    const session = response.headers.get("mcp-session-id");
    const message = await responseTo(response, id);
    if (message.error) throw new Error(message.error.message);
    this.session = session;
    await this.post({ jsonrpc: "2.0", method: "notifications/initialized" });
  }

  private async request(method: string, params: object, again = true): Promise<any> {
    if (!this.session) {
      this.opening ??= this.open().finally(() => (this.opening = null));
      await this.opening;
    }
    const id = this.nextId++;
    const response = await this.post({ jsonrpc: "2.0", id, method, params });
    if (response.status === 404 && again) {
      this.session = null; // closed by the server (idle, or the session bound): open a new one once
      return this.request(method, params, false);
    }
    if (!response.ok) throw new Error(`${method}: HTTP ${response.status}: ${(await response.text()).slice(0, 300)}`);
    const message = await responseTo(response, id);
    if (message.error) throw new Error(message.error.message);
    return message.result;
  }

  callTool(name: string, args: Record<string, unknown>): Promise<ToolResult> {
    return this.request("tools/call", { name, arguments: args });
  }

  async readResource(uri: string): Promise<string | null> {
    const result = await this.request("resources/read", { uri });
    const first = result?.contents?.[0];
    return first && typeof first.text === "string" ? first.text : null;
  }
}
